"""The collapse guard: pause a gold loop whose rounds show the signs of model collapse.

Per-round diagnostics (success rate, AST diversity of the final train.py files, mean val_bpb against
the loop's own best mean) are compared with thresholds; a loop that stays past them for
`guard.patience` (≥ 2) consecutive rounds is paused, the others go on.

The regression rule knows the noise: a round's mean of n successful runs moves by s/√n by chance,
s the larger of the spread of the round's own runs (the researcher's choices scatter far more than
the seed: an embedded round of 3 ran 3.55 to 4.5) and the std of the seed controls run in that wave
(the calibration's when the wave has fewer than two), so a regression counts only past
z·√(s²/n + s_best²/n_best) — the noise of the difference of the two means. Baselines (CTRL, FLOOR and their arc-B and replicate loops) run the frozen V0, which
cannot collapse: they are never guarded, and stop only when their arms stop (rfs.loop.schedule).
"""

from __future__ import annotations

import math

from rfs.config import GuardCfg
from rfs.loop.state import LoopState, RoundStats


def sigma(stats: RoundStats, calibrated_std: float) -> float:
    """The run-to-run std this round ran under: its seed controls', else the calibration's."""
    if stats.control_n >= 2 and math.isfinite(stats.control_std_val_bpb):
        return stats.control_std_val_bpb
    return calibrated_std


def spread(stats: RoundStats, std: float) -> float:
    """One run's std in this round: its runs' own spread when it has one, never below the seed's."""
    return max(std, stats.std_val_bpb) if math.isfinite(stats.std_val_bpb) else std


def regression_threshold(stats: RoundStats, best: RoundStats, std: float, cfg: GuardCfg) -> float:
    """How far above the best mean this round's mean may lie by chance (z·√(s²/n + s_best²/n_best))."""
    n, m = max(stats.n, 1), max(best.n, 1)
    return cfg.regression_z * math.sqrt(spread(stats, std) ** 2 / n + spread(best, std) ** 2 / m)


def strikes(stats: RoundStats, history: list[RoundStats], cfg: GuardCfg, calibrated_std: float) -> list[str]:
    """What this round violates, given the loop's earlier rounds."""
    out = []
    if stats.success_rate < cfg.min_success_rate:
        out.append(f"success rate {stats.success_rate:.2f} < {cfg.min_success_rate}")
    if stats.ast_diversity < cfg.min_ast_diversity:
        out.append(f"AST diversity {stats.ast_diversity:.3f} < {cfg.min_ast_diversity}")
    past = [h for h in history if math.isfinite(h.mean_val_bpb)]
    mean = stats.mean_val_bpb
    if past and math.isfinite(mean):
        best = min(past, key=lambda h: h.mean_val_bpb)
        limit = regression_threshold(stats, best, sigma(stats, calibrated_std), cfg)
        if mean > best.mean_val_bpb + limit:
            out.append(f"mean val_bpb {mean:.4f} (n={stats.n}) regressed past the best mean "
                       f"{best.mean_val_bpb:.4f} (n={best.n}) + {limit:.4f} (z={cfg.regression_z} of the noise)")
    return out


def judge(st: LoopState, stats: RoundStats, cfg: GuardCfg, calibrated_std: float, guarded: bool = True) -> list[str]:
    """Add the round to the loop's history and count its strikes; pause after `patience` in a row.

    Only consecutive faulty rounds count: a clean round resets the count. An unguarded loop (a
    baseline, which never trains and so cannot collapse) keeps its history but is never struck.
    """
    problems = strikes(stats, st.history, cfg, calibrated_std) if guarded else []
    st.history.append(stats)
    st.strikes = st.strikes + 1 if problems else 0
    if st.strikes >= cfg.patience:
        st.status, st.reason = "paused", "collapse guard: " + "; ".join(problems)
    return problems
