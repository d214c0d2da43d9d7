"""What the evals read from a run directory: every trace row, grouped by loop and round.

Each loop (rfs/trace.py's vocabulary) is one curve: `A-S`, `B-F` … for the gold loops, `CTRL` and
`FLOOR` for the baselines, and `shared` for round 1, which every gold loop and CTRL share. The
shared round's file is hard-linked into each loop's traces/ directory, so rows are de-duplicated by rollout_id. Probe rollouts (loop `probe`) are measured
through metrics/version_eval.parquet, not here.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from rfs.rundir import RunDir
from rfs import trace
from rfs.trace import PROBE, SCHEMA, SHARED


def traces(run: RunDir) -> pa.Table:
    """All compacted trace files (traces/<loop>/round-<n>.parquet) as one table, each rollout once."""
    tables = [trace.read(f) for f in run.trace_files()]
    if not tables:
        return SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    first = {rid: i for i, rid in reversed(list(enumerate(table.column("rollout_id").to_pylist())))}
    return table.take(sorted(first.values()))


def by_loop_round(table: pa.Table) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Trace rows keyed by (loop, round), probes left out, each group in rollout order."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in sorted(table.to_pylist(), key=lambda r: (r["started_at"], r["rollout_id"])):
        if r["loop"] != PROBE:
            groups.setdefault((r["loop"], r["round"]), []).append(r)
    return groups


def round_key(groups: dict[tuple[str, int], list[dict[str, Any]]], loop: str, round_: int) -> tuple[str, int]:
    """Where a loop's round lives: its own rows, or for round 1 the shared round every loop starts from."""
    return (SHARED, 1) if round_ == 1 and (loop, 1) not in groups else (loop, round_)


def last_round(groups: dict[tuple[str, int], list[dict[str, Any]]], loop: str) -> int:
    """The loop's last round with its own traces (0 when it has none)."""
    return max((r for (l, r) in groups if l == loop), default=0)
