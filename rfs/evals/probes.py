"""Held-out probes of a researcher version that the training loop itself never optimises.

- zero-shot: seeded first attempts from the pristine train.py, with no memory and no conditioning
  stamp, so a version is measured on what its weights know, not on what its prompt carries;
- transfer: the version's best train.py re-run at a larger depth (cfg.eval.transfer_depth), which
  separates "learned what helps a GPT train" from "memorised what helps this exact GPT";
- code: small Python tasks unrelated to the research task (rfs/evals/code_probe.py).

This module only says what to run; the loop runs it through its wave and records the values with
rfs.evals.metrics.version_eval_row.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

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


_BLOCK_START = re.compile(r"^# --- HYPERPARAMETERS\b.*$", re.M)
_BLOCK_END = re.compile(r"^# --- END HYPERPARAMETERS ---\s*$", re.M)


def set_hparam(train_py: str, name: str, value: Any) -> str:
    """train.py with `NAME = value` set inside its marked hyperparameter block, range comment kept.

    The declared range bounds the researcher's actions, not the harness: a probe may step past it.
    """
    start, end = _BLOCK_START.search(train_py), _BLOCK_END.search(train_py)
    if not start or not end or end.start() < start.end():
        raise ValueError("train.py has no '# --- HYPERPARAMETERS' ... '# --- END HYPERPARAMETERS ---' block")
    block = train_py[start.end() : end.start()]
    line = re.compile(rf"^({re.escape(name)}\s*=\s*)([^#\n]*?)(\s*(#.*)?)$", re.M)
    new_block, count = line.subn(lambda m: f"{m.group(1)}{value!r}{m.group(3)}", block)
    if count != 1:
        raise ValueError(f"train.py hyperparameter block defines {name} {count} times (expected once)")
    return train_py[: start.end()] + new_block + train_py[end.start() :]


def transfer_train_py(best_train_py: str, depth: int) -> str:
    """The transfer probe's train.py: the version's best train.py at the larger depth."""
    return set_hparam(best_train_py, "DEPTH", int(depth))


def best_train_py(rows: Sequence[dict[str, Any]]) -> str | None:
    """final_train_py of the best successful rollout (trace rows), or None when none succeeded."""
    ok = [r for r in rows if r["status"] == "success" and math.isfinite(r["val_bpb"])]
    return min(ok, key=lambda r: r["val_bpb"])["final_train_py"] if ok else None
