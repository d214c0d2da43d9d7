"""The verdict's statistics, pure functions on arrays: the hierarchical bootstrap, Student-t
quantiles, variance components and normal-approximation power. docs/verdict.md gives the formulas.

A Δ is measured on *units*, one per replicate (an independent loop, or a pair of loops that share
sampling seeds). A unit is a list of signed samples whose means add up to that replicate's Δ:
`[(+1, d)]` for paired rollout differences, `[(+1, a), (-1, b)]` for two unpaired samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

Unit = Sequence[tuple[float, np.ndarray]]


@dataclass(frozen=True)
class Interval:
    value: float  # the mean over units of each unit's Δ
    lo: float
    hi: float
    se: float  # hierarchical-bootstrap standard error, small-K corrected
    df: float  # degrees of freedom of the critical value: units − 1 (inf for one unit)


NAN_INTERVAL = Interval(math.nan, math.nan, math.nan, math.nan, math.nan)


def t_quantile(p: float, df: float) -> float:
    """The Student-t quantile (the normal one for df = inf), by bisection on the integrated density."""
    if math.isinf(df):
        return NormalDist().inv_cdf(p)
    if p < 0.5:
        return -t_quantile(1 - p, df)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, 4001)
        dens = np.exp(log_c - (df + 1) / 2 * np.log1p(grid**2 / df))
        return 0.5 + float(np.sum((dens[1:] + dens[:-1]) / 2) * (grid[1] - grid[0]))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def unit_value(unit: Unit) -> float:
    return float(sum(sign * np.mean(x) for sign, x in unit))


def unit_draws(unit: Unit, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """(n_boot,) the unit's Δ with every sample's rollouts resampled with replacement."""
    out = np.zeros(n_boot)
    for sign, x in unit:
        x = np.asarray(x, dtype=float)
        out += sign * x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    return out


def hierarchical(units: Sequence[Unit], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Interval:
    """Resample replicates with their rollouts; the interval is value ± t_{K−1} · se.

    Only the top level is resampled when there are several replicates: a replicate's Δ already
    carries its rollouts' noise, so resampling rollouts inside each drawn replicate as well counts
    that noise twice (the interval came out about twice too wide: no false positive in 200
    simulated null experiments, and no power either). The bootstrap variance of a mean of K units
    is (K−1)/K of the unbiased one, so se is corrected by √(K/(K−1)), and a Student-t quantile at
    K−1 degrees of freedom gives the width. One replicate has no between-loop variance to sample,
    so it gets its point and no interval: resampling its rollouts alone excluded zero in 27% of 200
    simulated null experiments (tests/test_stats.py). The report says it is a demonstration.
    """
    units = [u for u in units if u and all(len(x) for _, x in u)]
    if not units:
        return NAN_INTERVAL
    rng = np.random.default_rng(seed)
    k = len(units)
    values = np.array([unit_value(u) for u in units])
    value = float(values.mean())
    if k == 1:
        return Interval(value, math.nan, math.nan, math.nan, math.nan)
    dist = values[rng.integers(0, k, size=(n_boot, k))].mean(axis=1)
    se, df = float(np.std(dist, ddof=1)) * math.sqrt(k / (k - 1)), float(k - 1)
    crit = t_quantile(1 - (1 - level) / 2, df)
    return Interval(value, value - crit * se, value + crit * se, se, df)


def variance_components(groups: Sequence[np.ndarray], blocks: Sequence[int]) -> tuple[float, float]:
    """(within, between): the pooled variance of rollouts inside a group (one loop's round) and the
    variance of group means beyond what the within variance explains (method of moments, ≥ 0),
    comparing only groups of the same block (round), so a trend over rounds is not counted."""
    groups = [np.asarray(g, dtype=float) for g in groups]
    ss = sum(float(np.sum((g - g.mean()) ** 2)) for g in groups if len(g) > 1)
    dof = sum(len(g) - 1 for g in groups if len(g) > 1)
    within = ss / dof if dof else math.nan
    between = []
    for b in sorted(set(blocks)):
        mine = [g for g, bb in zip(groups, blocks) if bb == b and len(g)]
        if len(mine) > 1 and math.isfinite(within):
            means = np.array([g.mean() for g in mine])
            noise = within * float(np.mean([1 / len(g) for g in mine]))
            between.append((float(np.var(means, ddof=1)) - noise, len(mine) - 1))
    if not between:
        return within, math.nan
    pooled = sum(v * d for v, d in between) / sum(d for _, d in between)
    return within, max(0.0, pooled)


def se_of_delta(within: float, between: float, rollouts_per_loop: int, k: int) -> float:
    """Standard error of a Δ between two lines, K replicates each, m rollouts per loop pooled:
    √2 · √(τ²/K + σ²/(K m)), i.e. σ²/(K m) times the design effect 1 + m τ²/σ². The covariance that
    paired seeds add is left out, so the figure errs on the safe (larger) side."""
    return math.sqrt(2 * (between / k + within / (k * rollouts_per_loop)))


def power(effect: float, se: float, df: float, alpha: float = 0.05) -> float:
    """Two-sided power of value ± t_df · se against zero when the true Δ is `effect` (normal approximation)."""
    if se <= 0:
        return 1.0
    crit, z = t_quantile(1 - alpha / 2, df), NormalDist()
    return z.cdf(effect / se - crit) + z.cdf(-effect / se - crit)
