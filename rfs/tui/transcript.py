"""One rollout's trace row, found on disk and rendered as text for the transcript screen.

During a wave a finished rollout lives in its own file under `round-<n>.d/`; after compaction it
is a row of `round-<n>.parquet`. Either is read, never written: the watcher only observes.
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow.dataset as ds
import pyarrow.parquet as pq

from rfs import trace
from rfs.rundir import RunDir

_COLUMNS = ["rollout_id", "loop", "round", "version", "status", "detail", "val_bpb", "steps", "slot", "messages", "diff"]


def load_trace(run: RunDir, loop: str, round_: int, rollout_id: str) -> dict[str, Any] | None:
    """The rollout's trace row, or None while it is still in flight (no row written yet)."""
    own = run.pending_row(loop, round_, rollout_id)
    if own.exists():
        return trace.loads(own.read_bytes())
    compacted = run.traces(loop, round_)
    if compacted.exists():
        table = trace.upgrade(pq.read_table(compacted, filters=ds.field("rollout_id") == rollout_id))
        rows = table.select(_COLUMNS).to_pylist()
        return rows[0] if rows else None
    return None


def render(row: dict[str, Any]) -> str:
    """The conversation, then the diff, as plain text (the screen adds no markup of its own)."""
    bpb = row["val_bpb"]
    head = (
        f"{row['loop']} round {row['round']} {row['rollout_id']}  researcher v{row['version']}  "
        f"slot {row['slot']}\nstatus {row['status']}"
        + (f"  val_bpb {bpb:.4f}  steps {row['steps']}" if bpb is not None and math.isfinite(bpb) else "")
        + (f"\n{row['detail']}" if row["detail"] else "")
    )
    parts = [head]
    for m in row["messages"] or []:
        parts.append(f"── {m['role']} " + "─" * 40)
        if m.get("reasoning"):
            parts.append(f"(thought) {m['reasoning']}")
        parts.append(m.get("content") or "")
    parts.append("── diff " + "─" * 40)
    parts.append(row["diff"] or "(no diff)")
    return "\n".join(parts)
