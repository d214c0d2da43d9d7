"""The metrics tables of the evals under `runs/<experiment>/metrics/`, and their rows.

Each table is a Parquet file with a fixed pyarrow schema (documented for pandas/duckdb users in
docs/metrics.md), read and upserted by rfs.tables like every other metrics table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from rfs.collect.aggregate import SCHEMA as ROUND_AGGREGATES  # noqa: F401  (re-exported: one row per (loop, round))
from rfs.rundir import RunDir
from rfs.tables import read, upsert  # noqa: F401  (read re-exported: the evals' one way in)

# One row per (loop, round, thread): how one thread of a wave went.
THREAD_ROUND_SAMPLE = pa.schema(
    [
        ("experiment", pa.string()),
        ("arc", pa.string()),
        ("loop", pa.string()),  # the trace rows' loop: "A-S", CTRL, FLOOR or SHARED
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
THREAD_ROUND_KEY = ("arc", "loop", "round", "thread")

# One row per (loop, version, probe): a held-out or zero-shot measurement of one researcher version.
VERSION_EVAL = pa.schema(
    [
        ("experiment", pa.string()),
        ("arc", pa.string()),
        ("loop", pa.string()),  # the loop ("A-S"), or SHARED for V0, which every loop starts from
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
VERSION_EVAL_KEY = ("arc", "loop", "version", "probe")
PROBES = ("zero_shot", "transfer", "code")



def thread_round_rows(traces: pa.Table) -> list[dict[str, Any]]:
    """Derive THREAD_ROUND_SAMPLE rows from one wave's trace rows (rfs.trace.SCHEMA)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in sorted(traces.to_pylist(), key=lambda r: (r["started_at"], r["rollout_id"])):
        groups.setdefault((r["arc"], r["loop"], r["round"], r["thread"]), []).append(r)
    out = []
    for (arc, loop, round_, thread), rs in sorted(groups.items()):
        ok = [r["val_bpb"] for r in rs if r["status"] == "success"]
        last = rs[-1]
        out.append(
            {
                "experiment": last["experiment"],
                "arc": arc,
                "loop": loop,
                "round": round_,
                "version": last["version"],
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


def version_eval_row(
    experiment: str, arc: str, loop: str, version: int, probe: str, values: Sequence[float], detail: str = ""
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
        "loop": loop,
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
