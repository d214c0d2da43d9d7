"""Held-out probes of a researcher version that the training loop itself never optimises.

- zero-shot: seeded first attempts from the pristine train.py, with no memory and no conditioning
  stamp, so a version is measured on what its weights know, not on what its prompt carries;
- transfer: the version's best train.py re-run at a larger depth (cfg.eval.transfer_depth), which
  separates "learned what helps a GPT train" from "memorised what helps this exact GPT";
  cfg.eval.transfer_runs runs, each paired with the seed train.py at the same depth and seed;
- code: a fixed HumanEval subset, unrelated to the research task (rfs/evals/code_probe.py).

This module only says what to run; the loop runs it through its wave and records the values with
rfs.evals.metrics.version_eval_row.
"""

from __future__ import annotations

import ast
import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

from rfs.agent import hparams
from rfs.config import Config
from rfs.envs.calibrate import with_seed


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


def transfer_train_py(train_py: str, depth: int) -> str:
    """The transfer probe's train.py: `train_py` with its depth set to `depth`.

    The built-in environment's DEPTH lives in its hyperparameter block; autoresearch's (upstream's
    `DEPTH = 8` among its module-level hyperparameters) is a module-level assignment. ValueError,
    naming why, when the file has no depth the probe can recognise: the probe is then not applicable.
    """
    if hparams.BEGIN in train_py:
        return _block_depth(train_py, int(depth))
    return _module_depth(train_py, int(depth))


def _block_depth(train_py: str, depth: int) -> str:
    """The declared range bounds the researcher's actions, not the probe, so the DEPTH line's range is
    widened to include `depth`; the result still parses as a valid hyperparameter block."""
    current = {p.name: p for p in hparams.parse(train_py)}.get("DEPTH")
    if current is None or current.kind != "int":
        raise ValueError("train.py: the hyperparameter block has no integer DEPTH to set for the transfer probe")
    line = f"DEPTH = {depth}  # range: [{min(int(current.lo), depth)}, {max(int(current.hi), depth)}]"
    begin = train_py.index(hparams.BEGIN)
    end = train_py.index(hparams.END, begin)
    block = re.sub(r"(?m)^DEPTH\s*=.*$", line, train_py[begin:end], count=1)
    out = train_py[:begin] + block + train_py[end:]
    hparams.parse(out)  # what the probe runs is a valid train.py by the agent's own rules
    return out


def _module_depth(train_py: str, depth: int) -> str:
    """Upstream autoresearch's layout: exactly one assignment to DEPTH in the file, at module level,
    of an integer literal. Anything else (no DEPTH, a computed one, one set twice) is not
    recognisable: setting one line would not say what depth the run trains at."""
    try:
        tree = ast.parse(train_py)
    except SyntaxError as exc:
        raise ValueError(f"train.py does not parse (line {exc.lineno}: {exc.msg})") from None
    stores = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "DEPTH" and isinstance(n.ctx, ast.Store)]
    top = [n for n in tree.body if isinstance(n, ast.Assign) and len(n.targets) == 1
           and isinstance(n.targets[0], ast.Name) and n.targets[0].id == "DEPTH"]
    if len(stores) != 1 or len(top) != 1:
        why = "no" if not stores else f"{len(stores)} assignments to DEPTH, not one"
        raise ValueError(f"train.py has {why} module-level `DEPTH = <int>` line for the transfer probe to set")
    value = top[0].value
    if not (isinstance(value, ast.Constant) and type(value.value) is int and value.lineno == value.end_lineno):
        raise ValueError(f"train.py line {top[0].lineno}: DEPTH is not an integer literal the transfer probe can set")
    lines = train_py.splitlines(keepends=True)
    i = value.lineno - 1  # col offsets are in UTF-8 bytes
    raw = lines[i].encode()
    lines[i] = (raw[: value.col_offset] + str(depth).encode() + raw[value.end_col_offset :]).decode()
    return "".join(lines)


@dataclass(frozen=True)
class TransferRun:
    """One run of the transfer probe: the version's train.py, or the seed's (its paired baseline)."""

    index: int  # run i of each side trains with SEED + i where the file has a SEED line (paired)
    of_seed: bool
    train_py: str


def transfer_runs(cfg: Config, best: str, seed_train_py: str) -> list[TransferRun]:
    """cfg.eval.transfer_runs pairs at cfg.eval.transfer_depth: the version's best train.py and the
    seed train.py with the same seeds. ValueError (why) when either has no depth to set."""
    depth = cfg.eval.transfer_depth
    mine, seed = transfer_train_py(best, depth), transfer_train_py(seed_train_py, depth)
    return [TransferRun(i, of_seed, with_seed(src, i))
            for i in range(cfg.eval.transfer_runs) for of_seed, src in ((False, mine), (True, seed))]


def paired_delta(mine: Sequence[float], seed: Sequence[float]) -> tuple[float, int]:
    """Mean of (version - seed) over the pairs where both runs produced a number, and how many."""
    pairs = [a - b for a, b in zip(mine, seed) if math.isfinite(a) and math.isfinite(b)]
    return (sum(pairs) / len(pairs) if pairs else math.nan), len(pairs)


def best_train_py(rows: Sequence[dict[str, Any]]) -> str | None:
    """final_train_py of the best successful rollout (trace rows), or None when none succeeded."""
    ok = [r for r in rows if r["status"] == "success" and math.isfinite(r["val_bpb"])]
    return min(ok, key=lambda r: r["val_bpb"])["final_train_py"] if ok else None
