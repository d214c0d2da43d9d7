"""The hero plot: best val_bpb per round for every loop, against the seed's noise band and FLOOR.

Points are coloured by the round's solution diversity (round_aggregates.ast_diversity), so a curve
that improves while its colour drains toward zero is a loop collapsing onto one solution.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

from rfs import atomic  # noqa: E402
from rfs.trace import CTRL, FLOOR  # noqa: E402


@dataclass(frozen=True)
class Point:
    loop: str  # "A-S", "CTRL", "FLOOR" …
    round: int
    best_val_bpb: float  # NaN when no rollout of the round succeeded
    diversity: float  # NaN when the round has no aggregate row


def hero(points: list[Point], noise: dict[str, float] | None, title: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    if noise:
        mean, std = noise["mean"], noise["std"]
        ax.axhspan(mean - 2 * std, mean + 2 * std, color="0.5", alpha=0.15, lw=0)
        ax.axhline(mean, color="0.35", ls="--", lw=1.2, label=f"seed train.py {mean:.4f} (band: ±2σ noise)")
    floor = [p.best_val_bpb for p in points if p.loop == FLOOR and math.isfinite(p.best_val_bpb)]
    if floor:
        mid = sum(floor) / len(floor)
        ax.axhspan(min(floor), max(floor), color="tab:brown", alpha=0.12, lw=0)
        ax.axhline(mid, color="tab:brown", ls=":", lw=1.5, label=f"FLOOR: frozen V0, no memory ({len(floor)} waves, range)")
    norm, cmap = Normalize(0.0, 1.0), plt.get_cmap("viridis")
    lines = sorted({p.loop for p in points} - {FLOOR}, key=lambda l: (l == CTRL, l))
    for i, name in enumerate(lines):
        mine = sorted((p for p in points if p.loop == name and math.isfinite(p.best_val_bpb)), key=lambda p: p.round)
        if not mine:
            continue
        colour = "black" if name == CTRL else plt.get_cmap("tab10")(i)
        xs, ys = [p.round - 1 for p in mine], [p.best_val_bpb for p in mine]
        ax.plot(xs, ys, color=colour, lw=2, ls="--" if name == CTRL else "-", label=name, zorder=2)
        faces = [cmap(norm(p.diversity)) if math.isfinite(p.diversity) else "white" for p in mine]
        ax.scatter(xs, ys, c=faces, s=80, edgecolors=[colour], linewidths=1.8, zorder=3)
    if not lines:
        ax.text(0.5, 0.5, "no finished rounds yet", ha="center", va="center", transform=ax.transAxes, fontsize=14)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="solution diversity (AST; white: unknown)")
    ax.set_xlabel("researcher version V_n  (round n+1; CTRL is V0 with n rounds of memory)")
    ax.set_ylabel("best val_bpb of the round  (lower is better)")
    versions = sorted({p.round - 1 for p in points if p.loop != FLOOR})
    if versions:
        ax.set_xticks(versions)
        ax.set_xlim(versions[0] - 0.3, versions[-1] + 0.3)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())
    return path
