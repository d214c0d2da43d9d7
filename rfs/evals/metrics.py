"""The three metrics tables under `runs/<experiment>/metrics/`, and how they are written.

Each table is a Parquet file with a fixed pyarrow schema (documented for pandas/duckdb users in
docs/metrics.md). Writers upsert: rows whose key matches an incoming row are replaced and the file
is rewritten atomically, so a resumed step that records the same thing twice never duplicates it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rfs import atomic
from rfs.collect.aggregate import SCHEMA as ROUND_AGGREGATES  # noqa: F401  (re-exported: one row per (loop, round))
from rfs.rundir import RunDir

# One row per (arm, round, thread): how one thread of a wave went.
THREAD_ROUND_SAMPLE = pa.schema(
    [
        ("experiment", pa.string()),
        ("arc", pa.string()),
        ("arm", pa.string()),  # the trace rows' arm: the loop name ("A-S", "CTRL", "FLOOR") or "shared"
        ("round", pa.int32()),
        ("version", pa.int32()),  # n of the researcher V_n that collected the round
        ("thread", pa.int32()),
        ("n", pa.int32()),  # rollouts in this thread this round
        ("n_success", pa.int32()),
        ("best_val_bpb", pa.float64()),  # NaN when no rollout succeeded
        ("last_val_bpb", pa.float64()),  # the thread's last rollout (NaN unless it succeeded)
        ("last_status", pa.string()),
        ("statuses", pa.list_(pa.string())),  # every rollout's status, in rollout order
    ]
)
THREAD_ROUND_KEY = ("arc", "arm", "round", "thread")

# One row per (arm, version, probe): a held-out or zero-shot measurement of one researcher version.
VERSION_EVAL = pa.schema(
    [
        ("experiment", pa.string()),
        ("arc", pa.string()),
        ("arm", pa.string()),  # the loop ("A-S"), or "shared" for V0, which every loop starts from
        ("version", pa.int32()),
        ("probe", pa.string()),  # zero_shot | transfer | code
        ("n", pa.int32()),  # samples in `values`
        ("n_ok", pa.int32()),  # samples that produced a number (successful runs, scored tasks)
        ("best", pa.float64()),  # zero_shot/transfer: min val_bpb; code: max per-task pass
        ("mean", pa.float64()),  # zero_shot/transfer: mean val_bpb of successes; code: pass rate
        ("values", pa.list_(pa.float64())),  # per-sample raw values (NaN = failed run) for the bootstrap
        ("detail", pa.string()),  # one line: what ran, or why something is missing
    ]
)
VERSION_EVAL_KEY = ("arc", "arm", "version", "probe")
PROBES = ("zero_shot", "transfer", "code")



def read(path: Path, schema: pa.Schema) -> pa.Table:
    """The table at `path`, or an empty one with `schema` when the file does not exist yet."""
    if not Path(path).exists():
        return schema.empty_table()
    return pq.read_table(path)


def upsert(path: Path, schema: pa.Schema, key: Sequence[str], rows: list[dict[str, Any]]) -> pa.Table:
    """Add `rows`, replacing existing rows with the same key, and rewrite the file atomically."""
    new = pa.Table.from_pylist(rows, schema=schema)  # a wrong type or missing column fails here
    keys = {tuple(r[k] for k in key) for r in rows}
    old = [r for r in read(path, schema).to_pylist() if tuple(r[k] for k in key) not in keys]
    table = pa.concat_tables([pa.Table.from_pylist(old, schema=schema), new])
    atomic.write_parquet(path, table)
    return table


def thread_round_rows(traces: pa.Table) -> list[dict[str, Any]]:
    """Derive THREAD_ROUND_SAMPLE rows from one wave's trace rows (rfs.trace.SCHEMA)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in sorted(traces.to_pylist(), key=lambda r: (r["started_at"], r["rollout_id"])):
        groups.setdefault((r["arc"], r["arm"], r["round"], r["thread"]), []).append(r)
    out = []
    for (arc, arm, round_, thread), rs in sorted(groups.items()):
        ok = [r["val_bpb"] for r in rs if r["status"] == "success"]
        last = rs[-1]
        out.append(
            {
                "experiment": last["experiment"],
                "arc": arc,
                "arm": arm,
                "round": round_,
                "version": version_number(last["version"]),
                "thread": thread,
                "n": len(rs),
                "n_success": len(ok),
                "best_val_bpb": min(ok) if ok else math.nan,
                "last_val_bpb": last["val_bpb"] if last["status"] == "success" else math.nan,
                "last_status": last["status"],
                "statuses": [r["status"] for r in rs],
            }
        )
    return out


def record_thread_rounds(run: RunDir, traces: pa.Table) -> pa.Table:
    """Upsert one wave's THREAD_ROUND_SAMPLE rows into metrics/thread_round_sample.parquet."""
    return upsert(run.metrics("thread_round_sample"), THREAD_ROUND_SAMPLE, THREAD_ROUND_KEY, thread_round_rows(traces))


def record_version_eval(run: RunDir, rows: list[dict[str, Any]]) -> pa.Table:
    """Upsert VERSION_EVAL rows (see version_eval_row) into metrics/version_eval.parquet."""
    return upsert(run.metrics("version_eval"), VERSION_EVAL, VERSION_EVAL_KEY, rows)


def version_number(version: str | int) -> int:
    """'v3' -> 3 (trace rows name versions 'v<n>'; metrics tables store n)."""
    if isinstance(version, int):
        return version
    if not (version.startswith("v") and version[1:].isdigit()):
        raise ValueError(f"version {version!r}: expected 'v<n>'")
    return int(version[1:])


def version_eval_row(
    experiment: str, arc: str, arm: str, version: int, probe: str, values: Sequence[float], detail: str = ""
) -> dict[str, Any]:
    """A VERSION_EVAL row from raw per-sample values (val_bpb with NaN for failures, or 0/1 passes)."""
    if probe not in PROBES:
        raise ValueError(f"probe {probe!r}: expected one of {PROBES}")
    vals = [float(v) for v in values]
    ok = [v for v in vals if math.isfinite(v)]
    best = (max(ok) if probe == "code" else min(ok)) if ok else math.nan
    mean = sum(ok) / len(ok) if ok else math.nan
    return {
        "experiment": experiment,
        "arc": arc,
        "arm": arm,
        "version": version,
        "probe": probe,
        "n": len(vals),
        "n_ok": len(ok),
        "best": best,
        "mean": mean,
        "values": vals,
        "detail": detail,
    }


def rollout_values(rows: Sequence[dict[str, Any]]) -> list[float]:
    """Each rollout's val_bpb (NaN for a failed run), dropping infra_error rows.

    An infra_error is the slot's fault, not the researcher's, so it is neither a sample of the
    researcher's skill nor a failure to blame on it.
    """
    return [r["val_bpb"] if r["status"] == "success" else math.nan for r in rows if r["status"] != "infra_error"]
