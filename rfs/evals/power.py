"""`rfs plan`: the rollouts × rounds × replicates a design needs to detect an effect at 80% power on
the declared primary metric, and what that costs in hours on the configured slots.

Variance comes from a run's traces when there are some (the within-round spread of rollout scores
and the spread between loops beyond it), else from the seed's calibrated noise with stated
assumptions. The formulas are in docs/verdict.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rfs.config import Config
from rfs.evals import stats, verdict
from rfs.loop.plan import plan as loop_plan
from rfs.trace import PROBE

ASSUMED_SUCCESS = 0.6  # issue 16's measured embedded success rate, used only without traces
ASSUMED_TAU = 0.5  # between-loop spread, in units of the within-rollout spread, only without traces


@dataclass(frozen=True)
class Variance:
    within: float  # σ²: one rollout's score around its loop-round mean
    between: float  # τ²: a loop's mean around its line's, beyond what σ² explains
    success: float  # share of successful rollouts
    wall_s: float  # one rollout's wall time (researcher + training)
    source: str  # measured from what, or assumed how


def assumed(cfg: Config, sigma: float) -> Variance:
    """Without traces: successful runs spread like the seed (optimistic: edits spread more), 60% succeed."""
    if cfg.experiment.primary_metric == "success_rate":
        within = ASSUMED_SUCCESS * (1 - ASSUMED_SUCCESS)
    else:
        within = ASSUMED_SUCCESS * sigma**2
    wall = cfg.env.timeout_s + cfg.researcher.max_turns * cfg.researcher.turn_timeout_s
    return Variance(within, ASSUMED_TAU**2 * within, ASSUMED_SUCCESS, wall,
                    f"assumed: {ASSUMED_SUCCESS:.0%} success, successes spread like the seed (σ={sigma:.4f}), "
                    f"τ = {ASSUMED_TAU}·σ_rollout; wall = env.timeout_s + max_turns × turn_timeout_s (upper bound)")


def measured(rows: Sequence[Mapping[str, Any]], metric: str, start: float, fallback: Variance) -> Variance:
    """From trace rows (round 1 included: its scores are against the same start)."""
    rows = [r for r in rows if r["loop"] != PROBE and not r["seed_control"] and r["status"] != "infra_error"]
    groups: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        s = verdict.score(metric, r, r["start_val_bpb"] if math.isfinite(r["start_val_bpb"]) else start)
        if math.isfinite(s):
            groups.setdefault((r["loop"], r["round"]), []).append(s)
    if not groups:
        return fallback
    within, between = stats.variance_components([np.array(g) for g in groups.values()], [k[1] for k in groups])
    if not math.isfinite(within):
        return fallback
    between_src = f"{len(groups)} loop-rounds" if math.isfinite(between) else "assumed τ = 0.5·σ_rollout (one loop per round)"
    between = between if math.isfinite(between) else ASSUMED_TAU**2 * within
    walls = [r["finished_at"] - r["started_at"] for r in rows if r["finished_at"] > r["started_at"]]
    wall = float(np.median(walls)) if walls else fallback.wall_s
    success = sum(r["status"] == "success" for r in rows) / len(rows)
    return Variance(within, between, success, wall,
                    f"measured on {len(rows)} rollouts; between-loop: {between_src}; wall: median of the rollouts")


def lines_per_replicate(cfg: Config) -> int:
    """Loops one replicate runs: each line of the experiment's plan once."""
    return len({getattr(l, "line", l.name) for l in loop_plan(cfg)})


def hours(cfg: Config, var: Variance, n: int, rounds: int, k: int, slots: int) -> float:
    """Rollout-slot time over the slots: K · lines · rounds · n rollouts, each `wall_s`, waves side by side."""
    return k * lines_per_replicate(cfg) * rounds * n * var.wall_s / max(1, slots) / 3600


def required_k(var: Variance, effect: float, n: int, rounds: int, target: float = 0.8, k_max: int = 1000) -> int | None:
    """The fewest replicates at which a Δ of `effect` on the metric reaches `target` power; None past k_max."""
    pooled = n * max(1, rounds - 1)  # rounds ≥ 2 are pooled
    for k in range(2, k_max + 1):
        if stats.power(effect, stats.se_of_delta(var.within, var.between, pooled, k), k - 1) >= target:
            return k
    return None


def metric_effect(cfg: Config, var: Variance, effect_bpb: float) -> float:
    """A shift of `effect_bpb` in successful val_bpb, on the primary metric (failures score 0)."""
    return var.success * effect_bpb if cfg.experiment.primary_metric == "mean_improvement" else effect_bpb


def table(cfg: Config, var: Variance, effect_bpb: float, slots: int) -> str:
    """The plan as text: the configured design's power, and the K needed at a few shapes."""
    n0, r0 = cfg.collect.rollouts, cfg.experiment.max_rounds or 8
    k0 = getattr(cfg.experiment, "replicates", 1)  # experiment.replicates: the design's K (issue 16)
    eff = metric_effect(cfg, var, effect_bpb)
    se0 = stats.se_of_delta(var.within, var.between, n0 * max(1, r0 - 1), max(k0, 1))
    lines = [
        f"primary metric: {cfg.experiment.primary_metric}; effect {effect_bpb:.4f} val_bpb on successes = "
        f"{eff:.4f} on the metric; 80% power, two-sided alpha 0.05",
        f"variance: σ_rollout = {math.sqrt(var.within):.4f}, τ_loop = {math.sqrt(var.between):.4f}, "
        f"success {var.success:.0%}, wall {var.wall_s:.0f} s per rollout ({var.source})",
        f"{lines_per_replicate(cfg)} lines per replicate, {slots} slots"
        + ("" if cfg.experiment.max_rounds else "; max_rounds = 0 (no cap): 8 rounds assumed"),
        f"configured: {n0} rollouts × {r0} rounds × {k0} replicates: "
        + (f"power {stats.power(eff, se0, k0 - 1):.2f}" if k0 > 1 else "no power (one replicate: no between-loop interval)")
        + f", {hours(cfg, var, n0, r0, max(k0, 1), slots):.1f} h",
        "",
        "rollouts | rounds | replicates needed | hours",
    ]
    for n in sorted({n0, 2 * n0, 4 * n0}):
        for r in sorted({r0, 2 * r0}):
            k = required_k(var, eff, n, r)
            lines.append(f"{n:8d} | {r:6d} | {k if k else '> 1000':>17} | "
                         + (f"{hours(cfg, var, n, r, k, slots):.1f}" if k else "—"))
    return "\n".join(lines) + "\n"
