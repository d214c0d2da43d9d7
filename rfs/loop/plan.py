"""Which loops an experiment runs, in what order, and how each seeds its rollouts.

A *loop* is one independent line of rounds: a gold loop per (arc, arm) — "A-S", "B-F" … — that
retrains the researcher, plus the two baselines on the frozen V0: CTRL (experience in context)
and FLOOR (no memory). Round 1 is collected once with V0 and shared by every loop except FLOOR,
which re-samples on its own.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from rfs.config import Config
from rfs.trace import CTRL, FLOOR



@dataclass(frozen=True)
class LoopSpec:
    name: str  # "A-S", "B-F", "CTRL", "FLOOR"; also the directory name under traces/ and models/
    kind: str  # gold | ctrl | floor
    arc: str  # A (reset to the pristine train.py) | B (continue from the best so far)
    arm: str  # S | F for gold loops; "" for the baselines

    @property
    def trains(self) -> bool:
        return self.kind == "gold"

    @property
    def conditioned(self) -> bool:
        """Arm S collects conditioned on a wanted outcome stamp once it has been trained on stamps."""
        return self.kind == "gold" and self.arm == "S"


def plan(cfg: Config) -> list[LoopSpec]:
    """The experiment's loops in scheduling priority order (config `loop.priority`)."""
    e = cfg.experiment
    loops = {f"{arc}-{arm}": LoopSpec(f"{arc}-{arm}", "gold", arc, arm) for arc in e.arcs for arm in e.arms}
    ctrl_arc = "A" if "A" in e.arcs else "B"  # CTRL is matched to the headline arm's arc
    if CTRL in e.baselines:
        loops[CTRL] = LoopSpec(CTRL, "ctrl", ctrl_arc, "")
    if FLOOR in e.baselines:
        loops[FLOOR] = LoopSpec(FLOOR, "floor", "A", "")
    rank = {name: i for i, name in enumerate(cfg.loop.priority)}
    return sorted(loops.values(), key=lambda l: rank.get(l.name, len(rank)))


def rollout_seed(experiment_seed: int, loop: str, round_: int, thread: int) -> int:
    """Deterministic per rollout, distinct across loops, rounds and threads, and spread out: the
    agent samples turn k with seed + k, so neighbouring rollouts must not share a sampling stream."""
    return zlib.crc32(f"{experiment_seed}:{loop}:{round_}".encode()) % 2**20 * 2**10 + thread * 64


def rollout_id(loop: str, round_: int, thread: int) -> str:
    return f"{loop}-r{round_}-t{thread:03d}"
