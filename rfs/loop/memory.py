"""CTRL's memory: the experience a gold loop puts into weights, put into the prompt instead.

Built by rfs from CTRL's own past rounds (what was tried, the diff, the outcome), bounded by
`loop.ctrl_memory_chars` so the context stays within the server's window. The budget goes to the
best runs first (what worked), then to the most recent failures (what not to repeat).
"""

from __future__ import annotations

import math
from typing import Any

HEADER = "## Memory of your past experiments (best first; val_bpb lower is better)\n"
DIFF_LINES = 12  # enough to show an hparams change or a small code edit, not a whole file


def _entry(row: dict[str, Any]) -> str:
    bpb = row["val_bpb"]
    outcome = f"val_bpb={bpb:.4f}" if isinstance(bpb, float) and math.isfinite(bpb) else "no val_bpb"
    changed = [l for l in row["diff"].splitlines() if l[:1] in "+-" and l[:3] not in ("+++", "---")]
    body = "\n".join(changed[:DIFF_LINES]) or "(no change to train.py)"
    return f"- round {row['round']}: {outcome}, status={row['status']}, steps={row['steps']}\n{body}\n"


def build_memory(rows: list[dict[str, Any]], budget_chars: int) -> str:
    """Rows are trace rows from earlier rounds; infra errors carry no experience and are left out."""
    usable = [r for r in rows if r["status"] != "infra_error"]
    ok = sorted((r for r in usable if r["status"] == "success"), key=lambda r: r["val_bpb"])
    failed = sorted((r for r in usable if r["status"] != "success"), key=lambda r: -r["round"])
    text = HEADER
    for row in ok + failed:
        entry = _entry(row)
        if len(text) + len(entry) > budget_chars:
            break
        text += entry
    return text if text != HEADER else ""
