"""Round aggregates: one row per (loop, round) in metrics/round_aggregates.parquet.

Seed-control rows (seed_control=True: the unmodified starting train.py run beside the wave) are
never the researcher's: every figure below leaves them out; `controls()` summarises them apart.

Definitions (rates are over the rows the researcher is answerable for: infra_error rows are
counted in `n` and `infra_error_rate` only, because a dead slot says nothing about the researcher):

- mean/std/median/best_val_bpb: over successful rows; std is the population std; NaN if none.
- compile_rate: the final train.py compiles (`compile()`, no execution).
- run_rate: a training run happened (status success, crash or timeout).
- ast_diversity: (k - 1) / (m - 1) where k is the number of distinct normalised ASTs among the m
  final train.py files that parse; normalised = `ast.dump` without positions, so comments and
  formatting do not count as diversity. 0 when every file is the same (collapse), 1 when all differ.
- reasoning_density: characters of free-text thought / characters of thought + action, over
  assistant turns (token counts are not reported by every server; characters always exist).
- valid_action_rate: valid actions / all actions the researcher emitted.
- action_diversity: distinct actions / actions, an action being its canonical JSON (for the
  hparams space that is the distinct (name, value) pairs).
- anomaly_rate: share of rows with at least one anomaly flag.
- data_quality_score = success_rate * ast_diversity * (1 - anomaly_rate): how much a round can teach
  (it is zero for a round that failed, a round that collapsed onto one file, or a round of hacks).
"""

from __future__ import annotations

import ast
import json
import math
import statistics
from typing import Any

import pyarrow as pa

from rfs import tables
from rfs.rundir import RunDir

SCHEMA = pa.schema(
    [
        ("loop", pa.string()),
        ("round", pa.int32()),
        ("version", pa.int32()),
        ("n", pa.int32()),
        ("infra_error_rate", pa.float64()),
        ("mean_val_bpb", pa.float64()),
        ("std_val_bpb", pa.float64()),
        ("median_val_bpb", pa.float64()),
        ("best_val_bpb", pa.float64()),
        ("compile_rate", pa.float64()),
        ("run_rate", pa.float64()),
        ("success_rate", pa.float64()),
        ("ast_diversity", pa.float64()),
        ("reasoning_density", pa.float64()),
        ("valid_action_rate", pa.float64()),
        ("action_diversity", pa.float64()),
        ("anomaly_rate", pa.float64()),
        ("data_quality_score", pa.float64()),
    ]
)

KEY = ("loop", "round")

RAN = ("success", "crash", "timeout")


def _rate(hits: int, total: int) -> float:
    return hits / total if total else math.nan


def _normalised_ast(src: str) -> str | None:
    try:
        return ast.dump(ast.parse(src), include_attributes=False)
    except (SyntaxError, ValueError):
        return None


def _compiles(src: str) -> bool:
    try:
        compile(src, "train.py", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


def ast_diversity(sources: list[str]) -> float:
    trees = [t for t in map(_normalised_ast, sources) if t is not None]
    return (len(set(trees)) - 1) / (len(trees) - 1) if len(trees) > 1 else 0.0


def _actions(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for row in rows:
        for m in row["messages"]:
            if m["role"] != "assistant":
                continue
            try:
                action = json.loads(m["content"] or "")
            except json.JSONDecodeError:
                continue
            if isinstance(action, dict):
                out.append(json.dumps(action, sort_keys=True))
    return out


def _reasoning_density(rows: list[dict[str, Any]]) -> float:
    turns = [m for r in rows for m in r["messages"] if m["role"] == "assistant"]
    thought = sum(len(m["reasoning"] or "") for m in turns)
    return _rate(thought, thought + sum(len(m["content"] or "") for m in turns))


def researchers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows the researcher is answerable for: all but the seed controls."""
    return [r for r in rows if not r["seed_control"]]


def controls(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The wave's seed controls: how many ran, and mean/std (sample std) of their successful val_bpb."""
    bpb = [r["val_bpb"] for r in rows if r["seed_control"] and r["status"] == "success"]
    return {
        "control_n": len(bpb),
        "control_mean_val_bpb": statistics.fmean(bpb) if bpb else math.nan,
        "control_std_val_bpb": statistics.stdev(bpb) if len(bpb) > 1 else math.nan,
    }


def outcomes(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The part of the aggregate that only counts statuses and val_bpb: cheap, for a wave's end event."""
    rows = researchers(rows)
    n = len(rows)
    scored = [r for r in rows if r["status"] != "infra_error"]
    bpb = [r["val_bpb"] for r in scored if r["status"] == "success"]
    return {
        "n": n,
        "infra_error_rate": (n - len(scored)) / n,
        "mean_val_bpb": statistics.fmean(bpb) if bpb else math.nan,
        "std_val_bpb": statistics.pstdev(bpb) if bpb else math.nan,
        "median_val_bpb": statistics.median(bpb) if bpb else math.nan,
        "best_val_bpb": min(bpb) if bpb else math.nan,
        "success_rate": _rate(len(bpb), len(scored)),
    }


def aggregate(loop: str, round_: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The aggregate row for one loop's round (a shared round 1 is aggregated under each loop's name)."""
    rows = researchers(rows)
    if not rows:
        raise ValueError(f"aggregate: no rows for {loop} round {round_}")
    scored = [r for r in rows if r["status"] != "infra_error"]
    m = len(scored)
    out = outcomes(rows)
    success = out["success_rate"]
    diversity = ast_diversity([r["final_train_py"] for r in scored])
    anomalous = _rate(sum(1 for r in scored if len(r["anomaly_flags"]) > 0), m)
    valid = sum(r["valid_actions"] for r in scored)
    actions = _actions(scored)
    return {
        "loop": loop,
        "round": round_,
        "version": rows[0]["version"],
        **out,
        "compile_rate": _rate(sum(_compiles(r["final_train_py"]) for r in scored), m),
        "run_rate": _rate(sum(r["status"] in RAN for r in scored), m),
        "ast_diversity": diversity,
        "reasoning_density": _reasoning_density(scored),
        "valid_action_rate": _rate(valid, valid + sum(r["invalid_actions"] for r in scored)),
        "action_diversity": _rate(len(set(actions)), len(actions)),
        "anomaly_rate": anomalous,
        "data_quality_score": (success * diversity * (1 - anomalous)) if m else math.nan,
    }


def aggregate_round(run: RunDir, loop: str, round_: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Compute the round's aggregate and put it in round_aggregates, replacing any earlier one."""
    agg = aggregate(loop, round_, rows)
    tables.upsert(run.metrics("round_aggregates"), SCHEMA, KEY, [agg])
    return agg
