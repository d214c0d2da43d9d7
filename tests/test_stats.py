"""The verdict's statistics: Student-t quantiles against table values, the hierarchical bootstrap
against known answers, and the Must-show simulation — simulated experiments of the embedded design
(no model), fed through the verdict's own scoring and decomposition, whose 95% interval for the
weight-attributable Δ must hold its false-positive rate and its coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rfs import config
from rfs.evals import stats, verdict

SIGMA, MEAN, P_SUCCESS = 0.09, 3.52, 0.60  # successful val_bpb ~ N(3.52, 0.09), 60% success (issue 16)
SEED_SIGMA = 0.012  # the unmodified seed's own run-to-run noise (issue 16: 3.475 ± 0.012): the seed controls
TAU = SIGMA / 2  # between-loop spread: a per-loop random effect on its successful val_bpb
RHO = 0.3  # the share of a rollout's noise that paired sampling seeds make common to arm and CTRL


def design() -> tuple[int, int, int]:
    """(replicates, rounds, rollouts): the embedded preset's rounds and rollouts, with the K = 3
    replicates of the smallest design the verdict gives an interval for (one replicate gets none)."""
    cfg = config.load(config.default_experiment())
    return 3, cfg.experiment.max_rounds, cfg.collect.rollouts


def simulate(rng: np.random.Generator, effect: float, k: int, rounds: int, n: int) -> list[dict]:
    """Trace-like rows of one experiment: A-S and CTRL, K replicates, rounds 2..R with n rollouts and
    one seed control per wave. A-S's successful val_bpb is `effect` lower (better) than CTRL's."""
    rows = []
    for rep in range(k):
        loop_effect = {line: rng.normal(0, TAU) for line in ("A-S", "CTRL")}
        for r in range(2, rounds + 1):
            shared = rng.normal(0, SIGMA * math.sqrt(RHO), n)  # same seed, same draw in both lines
            for line in ("A-S", "CTRL"):
                loop = line if rep == 0 else f"{line}.{rep}"
                base = dict(loop=loop, line=line, replicate=rep, arc="A", round=r, start_val_bpb=MEAN)
                rows.append({**base, "thread": n, "seed_control": True, "status": "success",
                             "val_bpb": float(rng.normal(MEAN, SEED_SIGMA))})
                shift = MEAN + loop_effect[line] - (effect if line == "A-S" else 0.0)
                for t in range(n):
                    ok = rng.random() < P_SUCCESS
                    v = shift + shared[t] + rng.normal(0, SIGMA * math.sqrt(1 - RHO))
                    rows.append({**base, "thread": t, "seed_control": False,
                                 "status": "success" if ok else "crash", "val_bpb": float(v) if ok else math.nan})
    return rows


def weight_delta(rows: list[dict], seed: int) -> verdict.Estimate:
    est = verdict.decompose_scored(verdict.scored(rows, "mean_improvement", math.nan), seed=seed, n_boot=400)
    return next(e for e in est if e.name.startswith("weight-attributable"))


def binomial_upper(n: int, p: float, q: float = 0.99) -> int:
    """The q-quantile of Binomial(n, p): the most hits chance alone allows at level q."""
    cum = 0.0
    for c in range(n + 1):
        cum += math.comb(n, c) * p**c * (1 - p) ** (n - c)
        if cum >= q:
            return c
    return n


@pytest.mark.parametrize("df,table", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (math.inf, 1.960)])
def test_t_quantile_matches_the_table(df, table):
    assert stats.t_quantile(0.975, df) == pytest.approx(table, abs=1e-3)
    assert stats.t_quantile(0.025, df) == pytest.approx(-table, abs=1e-3)


def test_hierarchical_point_is_the_mean_of_replicate_means_and_is_deterministic():
    units = [[(1.0, np.array([1.0, 3.0]))], [(1.0, np.array([4.0])), (-1.0, np.array([1.0, 2.0]))]]
    iv = stats.hierarchical(units, n_boot=300, seed=3)
    assert iv.value == pytest.approx((2.0 + 2.5) / 2) and iv.df == 1 and iv.lo < iv.value < iv.hi
    assert stats.hierarchical(units, n_boot=300, seed=3) == iv
    assert math.isnan(stats.hierarchical([[(1.0, np.array([]))]]).value)


def test_one_replicate_gets_its_point_and_no_interval():
    """A single loop has no between-loop variance to sample: no interval, never a verdict."""
    iv = stats.hierarchical([[(1.0, np.array([0.1, 0.3, 0.2]))]])
    assert iv.value == pytest.approx(0.2) and math.isnan(iv.lo) and math.isnan(iv.hi)


def test_hierarchical_interval_grows_with_between_replicate_spread():
    rng = np.random.default_rng(0)
    tight = [[(1.0, rng.normal(0.0, 0.1, 8))] for _ in range(4)]
    spread = [[(1.0, x + off)] for (_, x), off in zip((u[0] for u in tight), (-1.0, 1.0, -0.5, 0.5))]
    w = lambda units: (lambda iv: iv.hi - iv.lo)(stats.hierarchical(units, n_boot=500))  # noqa: E731
    assert w(spread) > 5 * w(tight)  # a one-level bootstrap of the pooled rollouts would barely widen


def test_variance_components_recover_known_values():
    rng = np.random.default_rng(1)
    groups = [rng.normal(rng.normal(0, 2.0), 1.0, 50) for _ in range(200)]
    within, between = stats.variance_components(groups, [0] * 200)
    assert within == pytest.approx(1.0, rel=0.05) and between == pytest.approx(4.0, rel=0.25)


def test_power_is_alpha_at_no_effect_and_rises_with_replicates():
    assert stats.power(0.0, 1.0, math.inf) == pytest.approx(0.05, abs=1e-6)
    se = [stats.se_of_delta(0.01, 0.002, 8, k) for k in (2, 8, 32)]
    assert se[0] > se[1] > se[2] and stats.power(0.1, se[2], 31) > stats.power(0.1, se[0], 1)


def rates(experiments: int, seed: int) -> tuple[float, float, float, float]:
    """(false-positive rate, coverage at 2σ, power at 2σ, the true Δ) over simulated experiments."""
    k, rounds, n = design()
    rng = np.random.default_rng(seed)
    truth = P_SUCCESS * 2 * SIGMA  # 2σ better successes; failures score 0 in both lines
    null = [weight_delta(simulate(rng, 0.0, k, rounds, n), i) for i in range(experiments)]
    alt = [weight_delta(simulate(rng, 2 * SIGMA, k, rounds, n), i) for i in range(experiments)]
    fp = sum(e.lo > 0 or e.hi < 0 for e in null) / experiments
    cover = sum(e.lo <= truth <= e.hi for e in alt) / experiments
    pw = sum(e.lo > 0 for e in alt) / experiments
    print(f"\nsimulated {experiments} experiments of the embedded design (K={k}, rounds={rounds}, rollouts={n}): "
          f"false-positive rate {fp:.3f} (nominal 0.05), coverage at 2σ {cover:.3f} (truth Δ={truth:.4f}), "
          f"power at 2σ {pw:.3f}")
    return fp, cover, pw, truth


def test_simulated_embedded_experiments_hold_false_positives_and_coverage():
    """Must show: ≤ 5% false positives and ≥ 90% coverage over 200 experiments, with a binomial
    tolerance (the 99% quantile of what chance allows at exactly 5% and 90%)."""
    fp, cover, _, _ = rates(200, seed=20240916)
    assert fp * 200 <= binomial_upper(200, 0.05)
    assert (1 - cover) * 200 <= binomial_upper(200, 0.10)
