"""A run directory written before trace schema 2 (the loop in a column named `arm`, versions as
"v3") still opens with `report` and `watch`: every reader upgrades what it reads."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from test_report import _full_run

from rfs import atomic
from rfs.evals.report import report
from rfs.events import iter_events
from rfs.rundir import RunDir
from rfs.tui.model import RunView
from rfs.tui import transcript
from rfs.tui.plain import describe


def _as_schema_1(path, versions_as_text: bool) -> None:
    """Rewrite a Parquet file as rfs wrote it before schema 2 (new inode: hard links are kept apart)."""
    table = pq.read_table(path)
    table = table.rename_columns(["arm" if n == "loop" else n for n in table.column_names])
    if versions_as_text and "version" in table.column_names:
        text = pc.binary_join_element_wise("v", pc.cast(table["version"], pa.string()), "")
        table = table.set_column(table.schema.get_field_index("version"), "version", text)
    if "schema_version" in table.column_names:
        table = table.set_column(0, "schema_version", pa.array([1] * len(table), pa.int32()))
    path.unlink()
    atomic.write_parquet(path, table)


def _downgrade(run: RunDir) -> None:
    for path in run.trace_files():
        _as_schema_1(path, versions_as_text=True)
    for path in (run.root / "metrics").glob("*.parquet"):
        _as_schema_1(path, versions_as_text=path.stem == "round_aggregates")
    lines = []
    for e in iter_events(run.events):
        if "loop" in e and e["kind"] != "scheduler":
            e["arm"] = e.pop("loop")
        lines.append(json.dumps(e))
    run.events.write_text("\n".join(lines) + "\n")


def test_a_schema_1_run_reports_as_the_same_run_written_today(tmp_path):
    new, old = _full_run(tmp_path / "new"), _full_run(tmp_path / "old")
    _downgrade(old)
    assert "arm" in pq.read_schema(old.traces("A-S", 2)).names  # the fixture really is the old layout
    report(new.root)
    report(old.root)
    for name in ("report.md", "decomposition.md", "results.tsv"):
        assert (old.report / name).read_text().replace("old", "new") == (new.report / name).read_text(), name


def test_a_schema_1_run_opens_in_watch(tmp_path):
    run = _full_run(tmp_path / "old")
    _downgrade(run)
    # events_sample.jsonl was recorded from an embedded run before schema 2: `arm`, `arm_paused`
    run.events.write_text(run.events.read_text() + (Path(__file__).parent / "data" / "events_sample.jsonl").read_text())
    events = list(iter_events(run.events))
    assert not any("arm" in e for e in events) and not any(e["kind"] == "arm_paused" for e in events)
    view = RunView().apply_all(events)
    assert {"A-S", "CTRL", "FLOOR"} <= set(view.loops) and view.trajectory("A-S")
    assert all(describe(e) for e in events)
    row = transcript.load_trace(run, "A-S", 2, "A-S-r2-001")
    assert (row["loop"], row["version"], row["val_bpb"]) == ("A-S", 1, 1.25)
    assert "researcher v1" in transcript.render(row)
