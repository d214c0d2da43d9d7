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


def row(line: str, rep: int, round_: int, thread: int, val: float, status: str = "success", **kw) -> dict[str, Any]:
    loop = line if rep == 0 else f"{line}.{rep}"
    base = dict(loop=loop, line=line, replicate=rep, arc=line[0] if line[0] in "AB" else "A", round=round_,
                thread=thread, seed_control=False, status=status, start_val_bpb=1.30,
                val_bpb=val if status == "success" else math.nan)
    return {**base, **kw}


def test_primary_metric_scores_failures_zero_and_drops_infra_and_seed_controls():
    rows = [row("A-S", 0, 2, 0, 1.20), row("A-S", 0, 2, 1, 0.0, "crash"), row("A-S", 0, 2, 2, 0.0, "infra_error"),
            row("A-S", 0, 1, 3, 1.00), row("A-S", 0, 2, 9, 1.28, seed_control=True)]
    s = verdict.scored(rows, "mean_improvement", math.nan)
    # the wave's seed control (1.28), not the row's 1.30, is the start; round 1 is not pooled
    assert s.lines["A-S"][0] == {(2, 0, 0): pytest.approx(0.08), (2, 1, 0): 0.0}
    assert s.seed_controls == [1.28] and "seed-control" in s.start
    assert verdict.scored(rows, "success_rate", math.nan).lines["A-S"][0] == {(2, 0, 0): 1.0, (2, 1, 0): 0.0}
    no_controls = verdict.scored(rows[:2], "mean_improvement", math.nan)
    assert no_controls.lines["A-S"][0][(2, 0, 0)] == pytest.approx(0.10) and "start_val_bpb" in no_controls.start


def test_weight_delta_pairs_replicates_and_rollouts():
    rows = []
    for rep, (a, c) in enumerate(((1.20, 1.25), (1.10, 1.22), (1.15, 1.19))):
        for t in range(3):
            rows += [row("A-S", rep, 2, t, a + 0.01 * t), row("CTRL", rep, 2, t, c + 0.01 * t)]
    est = {e.name: e for e in verdict.decompose_scored(verdict.scored(rows, "mean_improvement", math.nan), n_boot=500)}
    w = est["weight-attributable Δ (A-S − CTRL)"]
    assert w.value == pytest.approx((0.05 + 0.12 + 0.04) / 3) and (w.replicates, w.rounds, w.rollouts) == (3, 1, 9)
    assert w.note == "paired rollouts" and w.lo < w.value < w.hi
    # within each replicate the paired differences are constant, so the width is the replicates' spread alone
    spread = np.std([0.05, 0.12, 0.04], ddof=1) / math.sqrt(3)
    assert (w.hi - w.lo) / 2 == pytest.approx(4.303 * spread, rel=0.1)
    assert est["headline Δ (A-S)"].baseline == "its round's start"


def test_arc_b_is_compared_with_ctrl_b_only_and_controls_have_their_rows():
    rows = [row("B-S", 0, 2, 0, 1.20), row("CTRL", 0, 2, 0, 1.25), row("A-S", 0, 2, 0, 1.1),
            row("A-S-placebo", 0, 2, 0, 1.2, arc="A"), row("A-S-noprefill", 0, 2, 0, 1.15, arc="A")]
    est = {e.name: e for e in verdict.decompose_scored(verdict.scored(rows, "mean_improvement", math.nan), n_boot=50)}
    assert est["weight-attributable Δ (B-S − CTRL-B)"].note.startswith("missing: no CTRL-B of arc B")
    assert est["A-S − placebo"].value == pytest.approx(0.10)
    assert est["goal hint (A-S − no-prefill)"].value == pytest.approx(0.05)
    rows.append(row("CTRL-B", 0, 2, 0, 1.26, arc="B"))
    est = {e.name: e for e in verdict.decompose_scored(verdict.scored(rows, "mean_improvement", math.nan), n_boot=50)}
    assert est["weight-attributable Δ (B-S − CTRL-B)"].value == pytest.approx(0.06)
    assert est["weight-attributable Δ (A-S − CTRL)"].value == pytest.approx(0.15)


def test_decompose_a_run_with_known_answers(tmp_path: Path):
    run = RunDir(tmp_path)
    run.write_state({"noise": {"mean": 1.30, "std": 0.01, "k": 5}})
    write_round(run, "shared", 1, [1.30, 1.25, math.nan, 1.40])
    write_round(run, "A-S", 2, [1.20, 1.22, 1.28, math.nan])
    write_round(run, "A-S", 3, [1.10, 1.15, math.nan, 1.18])
    write_round(run, "CTRL", 2, [1.24, 1.27])
    write_round(run, "CTRL", 3, [1.21, math.nan, 1.26])
    rows = [
        metrics.version_eval_row("synthetic", "", "shared", 0, "zero_shot", [1.3, 1.35, math.nan]),
        metrics.version_eval_row("synthetic", "A", "A-S", 2, "zero_shot", [1.2, 1.25, 1.22]),
        metrics.version_eval_row("synthetic", "", "shared", 0, "code", [1, 1, 0, 0]),
        metrics.version_eval_row("synthetic", "A", "A-S", 2, "code", [1, 1, 1, 0]),
    ]
    metrics.upsert(run.metrics("version_eval"), metrics.VERSION_EVAL, metrics.VERSION_EVAL_KEY, rows)
    est = {e.name: e for e in verdict.decompose(run, n_boot=300)}
    head = est["headline Δ (A-S)"]
    assert head.value == pytest.approx((0.10 + 0.08 + 0.02 + 0 + 0.20 + 0.15 + 0 + 0.12) / 8)
    assert (head.replicates, head.rounds, head.rollouts) == (1, 2, 8) and "one replicate" in head.note
    assert est["CTRL Δ (CTRL)"].value == pytest.approx((0.06 + 0.03 + 0.09 + 0 + 0.04) / 5)
    assert est["zero-shot Δ (A-S)"].value == pytest.approx(1.325 - 1.22333333)
    assert est["overfit penalty: code-probe Δ (A-S)"].value == pytest.approx(0.25)
    assert est["overfit penalty: transfer Δ (A-S)"].note.startswith("missing: transfer probe")
    assert verdict.decompose(run, n_boot=300) == verdict.decompose(run, n_boot=300)
    md = verdict.to_markdown(list(est.values()))
    assert "| headline Δ (A-S) | its round's start | +0.0838 |" in md


def test_decompose_says_what_is_missing(tmp_path: Path):
    run = RunDir(tmp_path)
    assert verdict.decompose(run, n_boot=50) == []
    write_round(run, "shared", 1, [1.3, 1.25])
    write_round(run, "A-S", 2, [1.2])
    assert verdict.decompose(run, n_boot=50) == []  # no start known: no row can be scored
    run.write_state({"noise": {"mean": 1.30, "std": 0.01, "k": 5}})
    est = verdict.decompose(run, n_boot=50)
    assert est[0].note.startswith("one line") and est[1].note.startswith("missing: no CTRL of arc A")
