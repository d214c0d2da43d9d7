"""The verdict: how much of arm S's improvement the weights earned, with bootstrap intervals.

Every Δ is an *improvement* (positive = better): for val_bpb, before − after; for the code probe's
pass rate, after − before.

| row | measured on |
|---|---|
| headline Δ | best val_bpb of the loop's round 1 (the shared round, V0) minus its round k |
| CTRL Δ | the same for CTRL (frozen V0, experience in the prompt), same round k |
| weight-attributable Δ | headline − CTRL: what consolidating into weights adds over context |
| zero-shot Δ | zero-shot best val_bpb (no memory, no stamp) of V0 minus V_last |
| overfit penalty (transfer, code) | the held-out probes' Δ from V0 to V_last; ≤ 0 means the gain did not transfer |

Round k is the last round both the loop and CTRL reached, so neither side gets more rounds. "Best"
is the minimum val_bpb over the round's rollouts (what a research round yields), failed runs
counting as no value and infra_error rows dropped. Intervals are percentile bootstraps: rollouts
are resampled with replacement within each (loop, round) or (version, probe) sample, the same
resample used wherever one sample appears twice (round 1 is shared), with a seeded generator.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from rfs.evals import load, metrics
from rfs.rundir import RunDir
from rfs.trace import CTRL, SHARED

Stat = Callable[[Mapping[str, np.ndarray]], np.ndarray]  # arrays (batch, n) -> (batch,)


@dataclass(frozen=True)
class Estimate:
    name: str
    value: float  # NaN when it could not be measured
    lo: float
    hi: float
    n: int  # samples (rollouts, tasks) behind it
    note: str  # how it was measured, or what is missing


def best(x: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-failed resample is NaN, not an error
        return np.nanmin(x, axis=-1)


def mean(x: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=-1)


def bootstrap(
    samples: Mapping[str, Sequence[float]], stat: Stat, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(point estimate, lo, hi): `stat` on the samples, and its percentile interval under resampling."""
    rng = np.random.default_rng(seed)
    data = {k: np.asarray(v, dtype=float) for k, v in samples.items()}
    if any(len(v) == 0 for v in data.values()):
        return math.nan, math.nan, math.nan
    point = float(stat({k: v[None, :] for k, v in data.items()})[0])
    resampled = {k: v[rng.integers(0, len(v), size=(n_boot, len(v)))] for k, v in sorted(data.items())}
    dist = stat(resampled)
    dist = dist[np.isfinite(dist)]
    if len(dist) == 0:
        return point, math.nan, math.nan
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(dist, [tail, 100 - tail])
    return point, float(lo), float(hi)


def _estimate(name: str, samples: dict[str, list[float]], stat: Stat, note: str, seed: int, n_boot: int) -> Estimate:
    value, lo, hi = bootstrap(samples, stat, n_boot, seed)
    if min(map(len, samples.values()), default=0) == 1:
        note += "; one sample on a side, so the interval omits run-to-run noise"
    return Estimate(name, value, lo, hi, sum(len(v) for v in samples.values()), note)


def _missing(name: str, why: str) -> Estimate:
    return Estimate(name, math.nan, math.nan, math.nan, 0, f"missing: {why}")


def decompose(run: RunDir, loop: str = "A-S", seed: int = 0, n_boot: int = 2000) -> list[Estimate]:
    """The decomposition table's rows for one gold loop (see the module docstring)."""
    return _round_rows(run, loop, seed, n_boot) + _probe_rows(run, loop, seed, n_boot)


def _round_rows(run: RunDir, loop: str, seed: int, n_boot: int) -> list[Estimate]:
    groups = load.by_loop_round(load.traces(run))
    names = (f"headline Δ ({loop})", "CTRL Δ", "weight-attributable Δ (headline − CTRL)")
    k_arm, k_ctrl = load.last_round(groups, loop), load.last_round(groups, CTRL)
    if k_arm == 0:
        why = "only the shared round 1 so far" if (SHARED, 1) in groups else "no traces"
        return [_missing(n, why) for n in names]
    k = min(k_arm, k_ctrl) if k_ctrl else k_arm
    keys = {
        "r1": load.round_key(groups, loop, 1),
        "loop": load.round_key(groups, loop, k),
        "ctrl_r1": load.round_key(groups, CTRL, 1),
        "ctrl": load.round_key(groups, CTRL, k),
    }
    # One entry per distinct (loop, round), so the shared round 1 is resampled once for both sides.
    samples = {f"{l}/{r}": metrics.rollout_values(groups.get((l, r), [])) for l, r in keys.values()}
    at = {name: f"{l}/{r}" for name, (l, r) in keys.items()}
    head = lambda d: best(d[at["r1"]]) - best(d[at["loop"]])  # noqa: E731
    ctrl = lambda d: best(d[at["ctrl_r1"]]) - best(d[at["ctrl"]])  # noqa: E731
    used = lambda *names: {at[n]: samples[at[n]] for n in names}  # noqa: E731
    note = f"round 1 → {k}, best val_bpb"
    rows = [_estimate(names[0], used("r1", "loop"), head, note, seed, n_boot)]
    if not k_ctrl:
        return rows + [_missing(n, "no CTRL traces") for n in names[1:]]
    return rows + [
        _estimate(names[1], used("ctrl_r1", "ctrl"), ctrl, note, seed, n_boot),
        _estimate(names[2], used("r1", "loop", "ctrl_r1", "ctrl"), lambda d: head(d) - ctrl(d), note, seed, n_boot),
    ]


def _probe_rows(run: RunDir, loop: str, seed: int, n_boot: int) -> list[Estimate]:
    table = metrics.read(run.metrics("version_eval"), metrics.VERSION_EVAL)
    out = []
    for probe, name, stat, unit in (
        ("zero_shot", f"zero-shot Δ ({loop})", best, "best val_bpb"),
        ("transfer", "overfit penalty: transfer Δ", best, "best val_bpb at the transfer depth"),
        ("code", "overfit penalty: code-probe Δ", mean, "pass rate"),
    ):
        v0, last, v_last = _version_values(table, loop, probe)
        if v0 is None or last is None:
            why = "no V0 measurement" if v0 is None else f"no {loop} version after V0"
            out.append(_missing(name, f"{probe} probe: {why}"))
            continue
        sign = 1.0 if probe == "code" else -1.0  # improvement: lower val_bpb, higher pass rate
        delta = lambda d, st=stat, sg=sign: sg * (st(d["last"]) - st(d["v0"]))  # noqa: E731
        out.append(_estimate(name, {"v0": v0, "last": last}, delta, f"V0 → V{v_last}, {unit}", seed, n_boot))
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
        "| quantity | Δ (positive = better) | 95% CI | n | measured on |",
        "|---|---:|---|---:|---|",
    ]
    for e in rows:
        value = "—" if math.isnan(e.value) else f"{e.value:+.4f}"
        ci = "—" if math.isnan(e.lo) else f"[{e.lo:+.4f}, {e.hi:+.4f}]"
        lines.append(f"| {e.name} | {value} | {ci} | {e.n} | {e.note} |")
    return "\n".join(lines) + "\n"
