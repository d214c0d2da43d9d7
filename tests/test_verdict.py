"""The verdict: bootstrap intervals on synthetic samples with known answers, and the decomposition
of a synthetic run directory built from real trace and metrics Parquet files."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rfs import atomic, trace
from rfs.evals import metrics, verdict
from rfs.rundir import RunDir


def trace_row(loop: str, round_: int, i: int, val_bpb: float, status: str = "success", **extra: Any) -> dict[str, Any]:
    """A complete, valid trace row (rfs.trace.SCHEMA) for synthetic run directories."""
    return trace.new_row(
        experiment="synthetic", loop=loop, arc="A", round=round_,
        version=0 if loop in ("shared", "CTRL", "FLOOR") else round_ - 1, thread=i % 4,
        rollout_id=f"{loop}-r{round_}-{i:03d}", seed=i, schema_enforced=True, exit_code=0,
        status=status, val_bpb=val_bpb if status == "success" else math.nan, steps=100, tokens=1000,
        peak_vram_mb=2048.0, training_seconds=30.0, wall_seconds=40.0, prompt_tokens=10, completion_tokens=10,
        turns=3, tool_calls=2, valid_actions=3, edit_attempts=1,
        started_at=float(round_ * 1000 + i), finished_at=float(round_ * 1000 + i + 1), start_val_bpb=math.nan,
        diff="--- a/train.py\n+++ b/train.py\n@@\n-LR = 0.003\n+LR = 0.006\n",
        final_train_py=f"x = {i % max(1, 5 - round_)}  # {loop}\n",  # diversity drains round by round
        **extra,
    )


def write_round(run: RunDir, loop: str, round_: int, vals: list[float], **extra: Any) -> None:
    """Like the driver: traces/<loop>/round-<n>.parquet, the shared round hard-linked into the loops."""
    rows = [trace_row(loop, round_, i, v, "success" if math.isfinite(v) else "crash", **extra) for i, v in enumerate(vals)]
    atomic.write_parquet(run.traces(loop, round_), trace.to_table(rows))
    if loop == "shared":
        for gold in ("A-S", "CTRL"):
            run.traces(gold, 1).parent.mkdir(parents=True, exist_ok=True)
            os.link(run.traces(loop, 1), run.traces(gold, 1))


def test_bootstrap_point_estimate_is_exact_and_deterministic():
    s = {"a": [3.0, 1.0, 2.0], "b": [0.5, 4.0]}
    stat = lambda d: verdict.best(d["a"]) - verdict.best(d["b"])  # noqa: E731
    first = verdict.bootstrap(s, stat, seed=7)
    assert first[0] == 0.5 and first[1] <= first[2]
    assert verdict.bootstrap(s, stat, seed=7) == first
    assert verdict.bootstrap(s, stat, seed=8) != first
    assert math.isnan(verdict.bootstrap({"a": []}, lambda d: verdict.mean(d["a"]))[0])


def test_bootstrap_interval_covers_the_truth_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    truth = 0.05
    stat = lambda d: verdict.mean(d["before"]) - verdict.mean(d["after"])  # noqa: E731
    widths, covered = {}, 0
    for trial in range(40):
        s = {"before": rng.normal(1.00, 0.02, 32), "after": rng.normal(1.00 - truth, 0.02, 32)}
        _, lo, hi = verdict.bootstrap(s, stat, n_boot=400, seed=trial)
        covered += lo <= truth <= hi
    assert covered >= 33  # nominal 95%: 38/40 expected, 33 allows for chance
    for n in (8, 128):
        s = {"before": rng.normal(1.00, 0.02, n), "after": rng.normal(0.95, 0.02, n)}
        _, lo, hi = verdict.bootstrap(s, stat, n_boot=400, seed=1)
        widths[n] = hi - lo
    assert widths[128] < widths[8] / 2  # ~1/sqrt(n): 4x narrower expected


def test_failed_runs_count_as_no_value_not_as_zero():
    s = {"a": [math.nan, 1.2, math.nan]}
    assert verdict.bootstrap(s, lambda d: verdict.best(d["a"]), n_boot=50)[0] == 1.2


def test_decompose_a_run_with_known_answers(tmp_path: Path):
    run = RunDir(tmp_path)
    write_round(run, "shared", 1, [1.30, 1.25, math.nan, 1.40])
    write_round(run, "A-S", 2, [1.20, 1.22, 1.28, math.nan])
    write_round(run, "A-S", 3, [1.10, 1.15, math.nan, 1.18])
    write_round(run, "CTRL", 2, [1.24, 1.27])
    write_round(run, "CTRL", 3, [1.21, math.nan, 1.26])
    rows = [
        metrics.version_eval_row("synthetic", "", "shared", 0, "zero_shot", [1.3, 1.35, math.nan]),
        metrics.version_eval_row("synthetic", "A", "A-S", 2, "zero_shot", [1.2, 1.25, 1.22]),
        metrics.version_eval_row("synthetic", "", "shared", 0, "code", [1, 1, 0, 0]),
        metrics.version_eval_row("synthetic", "A", "A-S", 1, "code", [1, 0, 0, 0]),
        metrics.version_eval_row("synthetic", "A", "A-S", 2, "code", [1, 1, 1, 0]),
    ]
    metrics.upsert(run.metrics("version_eval"), metrics.VERSION_EVAL, metrics.VERSION_EVAL_KEY, rows)
    est = {e.name: e for e in verdict.decompose(run, n_boot=300)}
    head, ctrl, weight = est["headline Δ (A-S)"], est["CTRL Δ"], est["weight-attributable Δ (headline − CTRL)"]
    assert head.value == pytest.approx(1.25 - 1.10) and head.n == 4 + 4  # failed runs are samples too (of no value)
    assert ctrl.value == pytest.approx(1.25 - 1.21)
    assert weight.value == pytest.approx(1.21 - 1.10) and weight.lo <= weight.value <= weight.hi
    assert "round 1 → 3" in head.note
    assert est["zero-shot Δ (A-S)"].value == pytest.approx(0.10)
    assert est["overfit penalty: code-probe Δ"].value == pytest.approx(0.25)
    assert est["overfit penalty: transfer Δ"].note.startswith("missing: transfer probe")
    assert verdict.decompose(run, n_boot=300) == verdict.decompose(run, n_boot=300)
    md = verdict.to_markdown(list(est.values()))
    assert "| headline Δ (A-S) | +0.1500 |" in md and "| overfit penalty: transfer Δ | — | — | 0 |" in md


def test_decompose_matches_rounds_and_says_what_is_missing(tmp_path: Path):
    run = RunDir(tmp_path)
    assert all(e.note == "missing: no traces" for e in verdict.decompose(run, n_boot=50)[:3])
    write_round(run, "shared", 1, [1.3, 1.25])
    assert verdict.decompose(run, n_boot=50)[0].note == "missing: only the shared round 1 so far"
    write_round(run, "A-S", 2, [1.2])
    write_round(run, "A-S", 3, [1.0])
    est = verdict.decompose(run, n_boot=50)
    assert est[0].value == pytest.approx(0.25) and est[1].note == "missing: no CTRL traces"
    write_round(run, "CTRL", 2, [1.22])  # CTRL only reached round 2: compare at round 2
    est = verdict.decompose(run, n_boot=50)
    assert est[0].value == pytest.approx(0.05) and est[2].value == pytest.approx(0.02)
