"""Held-out probes of a researcher version that the training loop itself never optimises.

- zero-shot: seeded first attempts from the pristine train.py, with no memory and no conditioning
  stamp, so a version is measured on what its weights know, not on what its prompt carries;
- transfer: the version's best train.py re-run at a larger depth (cfg.eval.transfer_depth), which
  separates "learned what helps a GPT train" from "memorised what helps this exact GPT";
- code: a fixed HumanEval subset, unrelated to the research task (rfs/evals/code_probe.py).

This module only says what to run; the loop runs it through its wave and records the values with
rfs.evals.metrics.version_eval_row.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

from rfs.agent import hparams
from rfs.config import Config


@dataclass(frozen=True)
class ProbeRollout:
    """One zero-shot rollout the loop runs like any other, from the pristine train.py."""

    version: int
    index: int
    seed: int
    conditioning_stamp: str = ""  # never conditioned: the probe measures the weights alone
    memory: str = ""  # never any in-context memory


def probe_seed(experiment_seed: int, index: int) -> int:
    """The same seeds for every version (common random numbers), so versions differ only by weights."""
    digest = hashlib.sha256(f"{experiment_seed}:zero_shot:{index}".encode()).hexdigest()
    return int(digest[:12], 16)


def zero_shot_rollouts(cfg: Config, version: int) -> list[ProbeRollout]:
    n = cfg.eval.zero_shot_rollouts
    return [ProbeRollout(version, i, probe_seed(cfg.experiment.seed, i)) for i in range(n)]


def transfer_train_py(best_train_py: str, depth: int) -> str:
    """The transfer probe's train.py: the version's best train.py with DEPTH = depth.

    The declared range bounds the researcher's actions, not the probe, so the DEPTH line's range is
    widened to include `depth`; the result still parses as a valid hyperparameter block.
    """
    depth = int(depth)
    current = {p.name: p for p in hparams.parse(best_train_py)}.get("DEPTH")
    if current is None or current.kind != "int":
        raise ValueError("train.py: the hyperparameter block has no integer DEPTH to set for the transfer probe")
    line = f"DEPTH = {depth}  # range: [{min(int(current.lo), depth)}, {max(int(current.hi), depth)}]"
    begin = best_train_py.index(hparams.BEGIN)
    end = best_train_py.index(hparams.END, begin)
    block = re.sub(r"(?m)^DEPTH\s*=.*$", line, best_train_py[begin:end], count=1)
    out = best_train_py[:begin] + block + best_train_py[end:]
    hparams.parse(out)  # what the probe runs is a valid train.py by the agent's own rules
    return out


def best_train_py(rows: Sequence[dict[str, Any]]) -> str | None:
    """final_train_py of the best successful rollout (trace rows), or None when none succeeded."""
    ok = [r for r in rows if r["status"] == "success" and math.isfinite(r["val_bpb"])]
    return min(ok, key=lambda r: r["val_bpb"])["final_train_py"] if ok else None
