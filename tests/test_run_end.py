"""The run's end prints its answer: each loop's bests, the decomposition table the report wrote,
where the report is, and the commands that look further."""

from __future__ import annotations

from test_report import _full_run

from rfs.loop.driver import summary


def test_the_end_prints_the_decomposition_where_the_report_is_and_what_to_run_next(tmp_path):
    run = _full_run(tmp_path / "run")
    text = summary(run)
    table = (run.report / "decomposition.md").read_text().rstrip()
    assert table and table in text  # the table report() wrote, as written
    assert "A-S    rounds=- status=running () best per round: nan nan nan" in text
    assert f"report: {run.report / 'report.md'}" in text
    for command in ("report", "watch", "plan"):
        assert f"python rfs.py {command}" in text
