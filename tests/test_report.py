"""The report on synthetic run directories built from real Parquet, JSON and TOML files."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_verdict import write_round

from rfs import atomic, config
from rfs.collect.aggregate import aggregate_round
from rfs.evals import metrics
from rfs.evals.report import report
from rfs.events import EventLog
from rfs.rundir import RunDir

LOOP_ROUNDS = (("A-S", 1), ("A-S", 2), ("A-S", 3), ("CTRL", 1), ("CTRL", 2), ("CTRL", 3), ("FLOOR", 1), ("FLOOR", 2))


def _full_run(root: Path) -> RunDir:
    run = RunDir(root)
    atomic.write_text(run.config, config.to_toml(config.load(overrides={"eval": {"drift_window": 2}})))
    run.write_state(
        {
            "noise": {"mean": 1.30, "std": 0.01, "k": 5},
            "loops": {"A-S": {"status": "running", "best_val_bpb": 1.1, "history": [{}, {}, {}]}},
        }
    )
    write_round(run, "shared", 1, [1.31, 1.29, math.nan, 1.33])
    write_round(run, "A-S", 2, [1.22, 1.25, 1.27, math.nan])
    write_round(run, "A-S", 3, [1.10, 1.16, math.nan, 1.18], anomaly_flags=["too_good_for_steps"])
    write_round(run, "CTRL", 2, [1.26, 1.28, 1.30, 1.27])
    write_round(run, "CTRL", 3, [1.24, math.nan, 1.29, 1.25])
    write_round(run, "FLOOR", 1, [1.30, 1.32, 1.29, math.nan])
    write_round(run, "FLOOR", 2, [1.28, 1.31, 1.33, 1.30])
    for loop, r in LOOP_ROUNDS:  # as the driver does, from each loop's own (or hard-linked) file
        aggregate_round(run, loop, r, pq.read_table(run.traces(loop, r)).to_pylist())
    rows = [
        metrics.version_eval_row("synthetic", "", "shared", 0, "zero_shot", [1.30, 1.32, math.nan, 1.31]),
        metrics.version_eval_row("synthetic", "", "shared", 0, "transfer", [1.20]),
        metrics.version_eval_row("synthetic", "", "shared", 0, "code", [1, 1, 0, 1, 0, 1, 0, 0]),
    ] + [
        metrics.version_eval_row("synthetic", "A", "A-S", v, probe, vals)
        for v, probe, vals in (
            (1, "zero_shot", [1.25, 1.27, 1.26, 1.30]),
            (2, "zero_shot", [1.15, 1.20, 1.22, math.nan]),
            (1, "transfer", [1.21]),
            (2, "transfer", [1.23]),
            (1, "code", [1, 1, 0, 1, 0, 0, 0, 0]),
            (2, "code", [1, 0, 0, 1, 0, 0, 0, 0]),
        )
    ]
    metrics.upsert(run.metrics("version_eval"), metrics.VERSION_EVAL, metrics.VERSION_EVAL_KEY, rows)
    log = EventLog(run.events)
    log.emit("alarm", loop="A-S", alarm="collapse", message="ast_diversity 0.01 below 0.02")
    log.close()
    return run


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_full_run_report(tmp_path: Path):
    run = _full_run(tmp_path / "run")
    out = report(run.root)
    md = out.read_text()
    assert out == run.report / "report.md"
    assert _png_size(run.report / "hero.png") == (1080, 660)
    assert "| experiment.preset | 'embedded' |" in md and "| collect.rollouts | 4 |" in md
    assert "| A-S | 3 | 4 | 3 | 0 | 1 |" in md  # statuses: success, syntax_error, crash …
    assert "| A-S | too_good_for_steps | 4 |" in md
    assert "A-S collapse: ast_diversity 0.01 below 0.02" in md
    assert "drift (computed now) A-S: proxy drift" in md and "transfer regressed 1.2000 -> 1.2300" in md
    assert md.startswith("# rfs report: run\n\n## Primary metric: mean_improvement\n")
    # start = the calibrated 1.30 (rows carry no start); rounds 2-3, a failure scoring 0: 0.62 / 8
    assert "| headline Δ (A-S) | its round's start | +0.0775 |" in md and "| 1 | 2 | 8 | one line;" in md
    assert "| weight-attributable Δ (A-S − CTRL) | CTRL | +0.0513 |" in md  # 0.0775 - 0.21 / 8
    assert "| A-S − placebo | A-S-placebo | — | — | 0 | 0 | 0 | not in this run |" in md
    assert "| goal hint (A-S − no-prefill) | A-S-noprefill | — |" in md and "Matched baselines: A-S → CTRL." in md
    assert "| overfit penalty: transfer Δ (A-S) | V0 | -0.0300 |" in md
    assert "A-S 1.2900 (round 1) → 1.1000 (round 3)" in md  # best-of-N, descriptive only
    assert "the calibration's 1.3000 ± 0.0100" in md and "replicates needed" in md
    assert md.split("## Missing")[1].strip() == "nothing"
    assert (run.report / "decomposition.md").read_text() in md


def test_results_tsv_is_autoresearch_format(tmp_path: Path):
    run = _full_run(tmp_path / "run")
    report(run.root)
    lines = (run.report / "results.tsv").read_text().splitlines()
    assert lines[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    rows = [l.split("\t") for l in lines[1:]]
    assert all(len(r) == 5 for r in rows) and len(rows) == 4 * 7
    by_id = {r[0]: r for r in rows}
    assert by_id["A-S-r3-000"][1:4] == ["1.100000", "2.0", "keep"]  # a new best for its loop
    assert by_id["A-S-r3-001"][3] == "discard"
    assert by_id["A-S-r2-000"][3] == "keep" and by_id["CTRL-r2-000"][3] == "keep"  # beat the shared 1.29
    assert by_id["FLOOR-r1-000"][3] == "keep" and by_id["FLOOR-r1-001"][3] == "discard"
    assert by_id["A-S-r3-002"][1:4] == ["0.000000", "0.0", "crash"]
    assert by_id["A-S-r3-002"][4] == "A-S r3 crash: LR = 0.006"


def test_partial_run_says_what_is_missing(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    write_round(run, "shared", 1, [1.31, math.nan])  # one round, no config, no probes, no calibration
    with open(run.events, "w") as f:
        f.write('{"t": 1, "kind": "alarm", "arm": "A-S", "alarm": "drift", "message": "m"}\n{"t": 2, "ki')  # torn tail
    md = report(run.root).read_text()
    missing = md.split("## Missing")[1]
    for what in ("experiment.toml: absent", "calibration", "round_aggregates", "version_eval", "verdict: no gold loop"):
        assert what in missing, what
    assert "| shared | 1 | 2 | 1 | 0 | 1 |" in md and "- A-S drift: m" in md
    assert _png_size(run.report / "hero.png")[0] > 0


def test_empty_and_absent_run_dirs(tmp_path: Path):
    md = report(tmp_path).read_text()
    assert "traces: no finished round yet" in md and "no traces yet" in md
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        report(tmp_path / "nope")


def test_metrics_tables_upsert_atomically_without_duplicates(tmp_path: Path):
    run = RunDir(tmp_path)
    write_round(run, "A-S", 2, [1.2, math.nan, 1.1, 1.3])  # threads 0..3, one rollout each
    wave = pq.read_table(run.traces("A-S", 2))
    first = metrics.record_thread_rounds(run, wave)
    again = metrics.record_thread_rounds(run, wave)  # a resumed step records the same wave again
    assert first.num_rows == again.num_rows == 4
    on_disk = pq.read_table(run.metrics("thread_round_sample")).to_pylist()
    t1 = next(r for r in on_disk if r["thread"] == 1)
    assert (t1["version"], t1["n"], t1["n_success"], t1["last_status"]) == (1, 1, 0, "crash")
    assert math.isnan(t1["best_val_bpb"])
    row = metrics.version_eval_row("synthetic", "A", "A-S", 1, "code", [1, 0])
    metrics.record_version_eval(run, [row])
    metrics.record_version_eval(run, [{**row, "n": 3, "values": [1.0, 0.0, 1.0]}])
    table = metrics.read(run.metrics("version_eval"), metrics.VERSION_EVAL)
    assert table.num_rows == 1 and table.column("n").to_pylist() == [3]
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):  # a wrong type is refused and the file is left as it was
        metrics.record_version_eval(run, [{**row, "version": "v1"}])
    assert metrics.read(run.metrics("version_eval"), metrics.VERSION_EVAL).equals(table)
    assert not list(run.root.glob("metrics/.*.tmp"))
