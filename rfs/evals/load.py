"""What the evals read from a run directory: every trace row, grouped by line and round.

A *line* is one curve of the experiment, named like the loop that makes it (rfs/loop/plan.py):
`A-S`, `B-F` … for the arms, `CTRL` and `FLOOR` for the baselines, and `shared` for round 1, which
every gold loop and CTRL share. The shared round's file is hard-linked into each loop's traces/
directory, so rows are de-duplicated by rollout_id. Probe rollouts (arm `probe`) are measured
through metrics/version_eval.parquet, not here.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rfs.rundir import RunDir
from rfs.trace import SCHEMA


def traces(run: RunDir) -> pa.Table:
    """All compacted trace files (traces/<loop>/round-<n>.parquet) as one table, each rollout once."""
    files = sorted((run.root / "traces").glob("*/round-*.parquet"))
    tables = [pq.read_table(f).select(SCHEMA.names).cast(SCHEMA) for f in files]
    if not tables:
        return SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    first = {rid: i for i, rid in reversed(list(enumerate(table.column("rollout_id").to_pylist())))}
    return table.take(sorted(first.values()))


def line(row: dict[str, Any]) -> str:
    """The line a row belongs to; accepts the arm as the loop name ("A-S") or bare ("S" with arc "A")."""
    return f"{row['arc']}-{row['arm']}" if row["arm"] in ("S", "F") else row["arm"]


def by_line_round(table: pa.Table) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Trace rows keyed by (line, round), probes left out, each group in rollout order."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in sorted(table.to_pylist(), key=lambda r: (r["started_at"], r["rollout_id"])):
        if r["arm"] != "probe":
            groups.setdefault((line(r), r["round"]), []).append(r)
    return groups


def round_key(groups: dict[tuple[str, int], list[dict[str, Any]]], line_: str, round_: int) -> tuple[str, int]:
    """Where a line's round lives: its own rows, or for round 1 the shared round every arm starts from."""
    return ("shared", 1) if round_ == 1 and (line_, 1) not in groups else (line_, round_)


def last_round(groups: dict[tuple[str, int], list[dict[str, Any]]], line_: str) -> int:
    """The line's last round with its own traces (0 when it has none)."""
    return max((r for (l, r) in groups if l == line_), default=0)
