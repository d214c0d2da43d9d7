"""The verdict: the declared primary metric, and each Δ of the decomposition with a hierarchical
bootstrap interval (rfs/evals/stats.py), paired where the design is paired. docs/verdict.md says
what each row means and how its interval is computed.

Every Δ is an *improvement* (positive = better).

| row | compared with |
|---|---|
| headline Δ (A-S) | its round's start: the primary metric itself |
| CTRL Δ | the same for the arc's matched CTRL (CTRL for arc A, CTRL-B for arc B) |
| weight-attributable Δ (A-S − CTRL) | what consolidating into weights adds over context |
| A-S − placebo | arm S against itself trained on permuted stamps (line "A-S-placebo") |
| goal hint (A-S − no-prefill) | the stamp prefill's own effect (line "A-S-noprefill") |
| zero-shot / overfit rows | the held-out probes, V0 against the loop's last probed version |

Rollouts of rounds ≥ 2 are pooled, up to the last round both sides of a Δ reached. Seed-control
and infra_error rows are never scored (an infra_error is the slot's fault, not the researcher's).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from rfs.config import PRIMARY_METRICS
from rfs.evals import load, metrics, stats
from rfs.rundir import RunDir
from rfs.trace import CTRL, PROBE, SHARED

DEFINITIONS = {
    "mean_improvement": "mean improvement per rollout over its round's start (start − val_bpb for a "
    "success; a failed run scores 0, never missing; infra_error and seed-control rows excluded), "
    "pooled over rounds ≥ 2, averaged over replicates",
    "success_rate": "share of rollouts whose training run succeeded (infra_error and seed-control rows "
    "excluded), pooled over rounds ≥ 2, averaged over replicates",
}
assert set(DEFINITIONS) == set(PRIMARY_METRICS)  # one definition per metric the config accepts
CTRL_B = "CTRL-B"
GOLD = ("A-S", "A-F", "B-S", "B-F")

Key = tuple[int, int, int]  # (round, thread, n-th rollout of the thread in that round)
Line = dict[int, dict[Key, float]]  # replicate -> rollout -> score


@dataclass(frozen=True)
class Estimate:
    name: str
    baseline: str  # what the Δ is measured against
    value: float  # NaN when it could not be measured
    lo: float
    hi: float
    replicates: int
    rounds: int
    rollouts: int
    note: str  # how it was measured, or "missing: why"


@dataclass(frozen=True)
class Scored:
    metric: str
    lines: dict[str, Line]
    arcs: dict[str, str]  # line -> arc
    start: str  # where the round's start came from
    seed_controls: list[float]  # every successful seed-control val_bpb
    waves_with_controls: int


def score(metric: str, row: Mapping[str, Any], start: float) -> float:
    ok = row["status"] == "success"
    if metric == "success_rate":
        return 1.0 if ok else 0.0
    return start - row["val_bpb"] if ok else 0.0


def scored(rows: Iterable[Mapping[str, Any]], metric: str, fallback_start: float) -> Scored:
    """Score every collected rollout of rounds ≥ 2 (rows in rollout order)."""
    rows = [r for r in rows if r["loop"] not in (SHARED, PROBE)]
    controls: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        if r["seed_control"] and r["status"] == "success":
            controls.setdefault((r["loop"], r["round"]), []).append(r["val_bpb"])
    lines: dict[str, Line] = {}
    arcs: dict[str, str] = {}
    seen: dict[tuple[str, int, int], int] = {}
    for r in rows:
        if r["seed_control"] or r["status"] == "infra_error" or r["round"] < 2:
            continue
        wave = controls.get((r["loop"], r["round"]))
        start = float(np.mean(wave)) if wave else r["start_val_bpb"]
        start = start if math.isfinite(start) else fallback_start
        if metric == "mean_improvement" and not math.isfinite(start):
            continue
        line = r["line"] or r["loop"]
        arcs[line] = r["arc"]
        j = seen[(r["loop"], r["round"], r["thread"])] = seen.get((r["loop"], r["round"], r["thread"]), -1) + 1
        lines.setdefault(line, {}).setdefault(r["replicate"], {})[(r["round"], r["thread"], j)] = score(metric, r, start)
    if controls:
        start = f"the mean seed-control val_bpb of the loop's round ({len(controls)} waves with seed controls)"
    else:
        start = "each row's start_val_bpb (no seed controls in this run), else the calibrated seed mean"
    values = [v for vs in controls.values() for v in vs]
    return Scored(metric, lines, arcs, start, values, len(controls))


def _last(rollouts: Mapping[Key, float]) -> int:
    return max((k[0] for k in rollouts), default=0)


def _unit(a: Mapping[Key, float], b: Mapping[Key, float] | None) -> tuple[stats.Unit, set[int]]:
    """One replicate's Δ (a alone, or a − b over the rounds both reached; rollouts paired by
    (round, thread) when both sides have them) and the rounds it used."""
    if b is None:
        return [(1.0, np.array(list(a.values())))], {k[0] for k in a}
    upto = min(_last(a), _last(b))
    a = {k: v for k, v in a.items() if k[0] <= upto}
    b = {k: v for k, v in b.items() if k[0] <= upto}
    both = sorted(a.keys() & b.keys())
    rounds = {k[0] for k in a} | {k[0] for k in b}
    if both:
        return [(1.0, np.array([a[k] - b[k] for k in both]))], rounds
    return [(1.0, np.array(list(a.values()))), (-1.0, np.array(list(b.values())))], rounds


def delta(name: str, baseline: str, a: Line, b: Line | None, seed: int = 0, n_boot: int = 2000) -> Estimate:
    """a's metric (b is None) or a − b, replicates paired by index (the design pairs them)."""
    reps = sorted(a.keys() & b.keys()) if b is not None else sorted(a)
    parts = [_unit(a[k], b[k] if b is not None else None) for k in reps]
    units = [u for u, _ in parts if all(len(x) for _, x in u)]
    if not units:
        return missing(name, baseline, "no rollouts of rounds ≥ 2 on both sides")
    iv = stats.hierarchical(units, n_boot=n_boot, seed=seed)
    rounds = set().union(*(r for _, r in parts))
    n = sum(len(x) for u in units for _, x in u)
    how = "paired rollouts" if all(len(u) == 1 for u in units) and b is not None else "unpaired rollouts"
    how = how if b is not None else "one line"
    extra = "; one replicate: no between-loop variance, so no interval (a demonstration, not a verdict)" if len(units) == 1 else ""
    return Estimate(name, baseline, iv.value, iv.lo, iv.hi, len(units), len(rounds), n, f"{how}{extra}")


def missing(name: str, baseline: str, why: str) -> Estimate:
    return Estimate(name, baseline, math.nan, math.nan, math.nan, 0, 0, 0, f"missing: {why}")


def absent(name: str, baseline: str) -> Estimate:
    """A control line this run's design did not include: a fact about the run, not missing data."""
    return Estimate(name, baseline, math.nan, math.nan, math.nan, 0, 0, 0, "not in this run")


def matched_ctrl(s: Scored, arc: str) -> str | None:
    """The CTRL of the gold line's arc: CTRL for arc A, CTRL-B for arc B (or a CTRL that ran arc B)."""
    for name in (CTRL, CTRL_B):
        if name in s.lines and s.arcs.get(name) == arc:
            return name
    return None


def decompose_scored(s: Scored, seed: int = 0, n_boot: int = 2000) -> list[Estimate]:
    out: dict[str, Estimate] = {}
    d = lambda name, base, a, b: delta(name, base, s.lines[a], s.lines[b] if b else None, seed, n_boot)  # noqa: E731
    for gold in [g for g in GOLD if g in s.lines]:
        arc = gold[0]
        ctrl = matched_ctrl(s, arc)
        c = ctrl or (CTRL if arc == "A" else CTRL_B)
        why = f"no {c} of arc {arc} in this run (a gold line is never compared with another arc's CTRL)"
        rows = [d(f"headline Δ ({gold})", "its round's start", gold, None)]
        rows += [d(f"CTRL Δ ({c})", "its round's start", ctrl, None),
                 d(f"weight-attributable Δ ({gold} − {c})", c, gold, ctrl)] if ctrl else [
            missing(f"CTRL Δ ({c})", "its round's start", why),
            missing(f"weight-attributable Δ ({gold} − {c})", c, why)]
        controls = [(f"{gold} − placebo", f"{gold}-placebo")]
        if gold.endswith("-S"):
            controls.append((f"goal hint ({gold} − no-prefill)", f"{gold}-noprefill"))
        for name, line in controls:
            rows.append(d(name, line, gold, line) if line in s.lines else absent(name, line))
        for e in rows:
            out.setdefault(e.name, e)
    return list(out.values())


def decompose(run: RunDir, metric: str = "mean_improvement", seed: int = 0, n_boot: int = 2000) -> list[Estimate]:
    """The decomposition table's rows for every gold line of the run, then the probe rows."""
    return decompose_scored(scored_run(run, metric), seed, n_boot) + probe_rows(run, seed, n_boot)


def scored_run(run: RunDir, metric: str) -> Scored:
    rows = sum(load.by_loop_round(load.traces(run)).values(), [])
    noise = run.read_state().get("noise") or {}
    return scored(rows, metric, float(noise.get("mean", math.nan)))


def probe_rows(run: RunDir, seed: int, n_boot: int) -> list[Estimate]:
    """V0 against each gold loop's last probed version: mean val_bpb of successful probe runs (or the
    code probe's pass rate), one sample per version, so no between-loop variance in the interval."""
    table = metrics.read(run.metrics("version_eval"), metrics.VERSION_EVAL)
    loops = sorted({r["loop"] for r in table.to_pylist()} - {SHARED})
    out = []
    for loop in loops:
        for probe, name in (("zero_shot", f"zero-shot Δ ({loop})"), ("transfer", f"overfit penalty: transfer Δ ({loop})"),
                            ("code", f"overfit penalty: code-probe Δ ({loop})")):
            v0, last, v_last = _version_values(table, loop, probe)
            if v0 is None or last is None:
                why = "no V0 measurement" if v0 is None else f"no {loop} version after V0"
                out.append(missing(name, "V0", f"{probe} probe: {why}"))
                continue
            sign = 1.0 if probe == "code" else -1.0  # improvement: lower val_bpb, higher pass rate
            a, b = (np.array([v for v in x if math.isfinite(v)]) for x in (last, v0))
            iv = stats.hierarchical([[(sign, a), (-sign, b)]], n_boot=n_boot, seed=seed)
            out.append(Estimate(name, "V0", iv.value, iv.lo, iv.hi, 1, 0, len(a) + len(b), f"V0 → V{v_last}"))
    return out


def _version_values(table: pa.Table, loop: str, probe: str) -> tuple[list[float] | None, list[float] | None, int]:
    """(V0's values, the loop's last version's values, that version) for one probe."""
    rows = [r for r in table.to_pylist() if r["probe"] == probe]
    v0 = next((r["values"] for r in rows if r["version"] == 0 and r["loop"] in (SHARED, loop)), None)
    mine = [r for r in rows if r["loop"] == loop and r["version"] > 0]
    if not mine:
        return v0, None, 0
    last = max(mine, key=lambda r: r["version"])
    return v0, last["values"], last["version"]


def to_markdown(rows: Sequence[Estimate]) -> str:
    lines = [
        "| quantity | compared with | Δ (positive = better) | 95% CI | replicates | rounds | rollouts | how |",
        "|---|---|---:|---|---:|---:|---:|---|",
    ]
    for e in rows:
        value = "—" if math.isnan(e.value) else f"{e.value:+.4f}"
        ci = "—" if math.isnan(e.lo) else f"[{e.lo:+.4f}, {e.hi:+.4f}]"
        lines.append(f"| {e.name} | {e.baseline} | {value} | {ci} | {e.replicates} | {e.rounds} | {e.rollouts} | {e.note} |")
    return "\n".join(lines) + "\n"
