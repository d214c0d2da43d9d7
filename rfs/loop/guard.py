"""The collapse guard: pause a loop whose rounds show the signs of model collapse.

Per-round diagnostics (success rate, AST diversity of the final train.py files, mean val_bpb against
the loop's own best mean) are compared with configured thresholds; a loop that stays below them
for `guard.patience` consecutive rounds is paused, the others go on.
"""

from __future__ import annotations

import math
from typing import Any

from rfs.config import GuardCfg


def strikes(agg: dict[str, Any], history: list[dict[str, Any]], cfg: GuardCfg) -> list[str]:
    """What this round's aggregates violate, given the loop's earlier rounds."""
    out = []
    if agg.get("success_rate", 0.0) < cfg.min_success_rate:
        out.append(f"success rate {agg.get('success_rate', 0.0):.2f} < {cfg.min_success_rate}")
    if agg.get("ast_diversity", 1.0) < cfg.min_ast_diversity:
        out.append(f"AST diversity {agg.get('ast_diversity', 0.0):.3f} < {cfg.min_ast_diversity}")
    past = [h["mean_val_bpb"] for h in history if math.isfinite(h.get("mean_val_bpb", math.nan))]
    mean = agg.get("mean_val_bpb", math.nan)
    if past and math.isfinite(mean) and mean > min(past) + cfg.max_bpb_regression:
        out.append(f"mean val_bpb {mean:.4f} regressed past the best mean {min(past):.4f} + {cfg.max_bpb_regression}")
    return out


def should_pause(consecutive: int, cfg: GuardCfg) -> bool:
    return consecutive >= cfg.patience
