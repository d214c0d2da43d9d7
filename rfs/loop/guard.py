"""The collapse guard: pause a loop whose rounds show the signs of model collapse.

Per-round diagnostics (success rate, AST diversity of the final train.py files, mean val_bpb against
the loop's own best mean) are compared with configured thresholds; a loop that stays below them
for `guard.patience` consecutive rounds is paused, the others go on.
"""

from __future__ import annotations

import math

from rfs.config import GuardCfg
from rfs.loop.state import LoopState, RoundStats


def strikes(stats: RoundStats, history: list[RoundStats], cfg: GuardCfg) -> list[str]:
    """What this round violates, given the loop's earlier rounds."""
    out = []
    if stats.success_rate < cfg.min_success_rate:
        out.append(f"success rate {stats.success_rate:.2f} < {cfg.min_success_rate}")
    if stats.ast_diversity < cfg.min_ast_diversity:
        out.append(f"AST diversity {stats.ast_diversity:.3f} < {cfg.min_ast_diversity}")
    past = [h.mean_val_bpb for h in history if math.isfinite(h.mean_val_bpb)]
    mean = stats.mean_val_bpb
    if past and math.isfinite(mean) and mean > min(past) + cfg.max_bpb_regression:
        out.append(f"mean val_bpb {mean:.4f} regressed past the best mean {min(past):.4f} + {cfg.max_bpb_regression}")
    return out


def judge(st: LoopState, stats: RoundStats, cfg: GuardCfg, guarded: bool = True) -> list[str]:
    """Add the round to the loop's history and count its strikes; pause after `patience` in a row.

    Only consecutive faulty rounds count: a clean round resets the count. An unguarded loop (FLOOR,
    which never trains and so cannot collapse) keeps its history but is never struck.
    """
    problems = strikes(stats, st.history, cfg) if guarded else []
    st.history.append(stats)
    st.strikes = st.strikes + 1 if problems else 0
    if st.strikes >= cfg.patience:
        st.status, st.reason = "paused", "collapse guard: " + "; ".join(problems)
    return problems
