"""Which loops an experiment runs, in what order, and how each seeds its rollouts.

A *line* is one condition: a gold line per (arc, arm) — "A-S", "B-F" … — that retrains the
researcher; the control lines of arm S ("A-S-noprefill": collected without the stamp prefill;
"A-S-placebo": trained on stamps permuted across its round); and the baselines on the frozen V0
matched to each arc: CTRL (experience in context) and FLOOR (no memory) beside arc A, CTRL-B and
FLOOR-B beside arc B (they continue from their own best file, as arc B does). A *loop* is one
replicate of a line: "A-S" for replicate 0, "A-S.1" for replicate 1, each with its own seeds.

The design is paired: rollout t of round r draws the same sampling seed in every line of a
replicate (common random numbers), and round 1 is collected once per replicate with V0 (the loop
SHARED, "shared.<k>" for replicate k) and shared by every loop of that replicate but FLOOR's.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from rfs.config import Config
from rfs.trace import CTRL, FLOOR, SHARED

CONTROLS = ("placebo", "noprefill")  # the control lines of arm S, in experiment.controls


@dataclass(frozen=True)
class LoopSpec:
    name: str  # "A-S", "B-F.1", "CTRL-B" …; also the directory name under traces/ and models/
    kind: str  # gold | ctrl | floor
    arc: str  # A (reset to the pristine train.py) | B (continue from the best so far)
    arm: str  # S | F for gold loops; "" for the baselines
    line: str = ""  # the condition this loop replicates; "" means the loop's own name
    replicate: int = 0
    variant: str = ""  # "" | placebo | noprefill (arm S's control lines)

    @property
    def line_name(self) -> str:
        return self.line or self.name

    @property
    def trains(self) -> bool:
        return self.kind == "gold"

    @property
    def conditioned(self) -> bool:
        """Arm S collects conditioned on a wanted outcome stamp once trained on stamps; its
        no-prefill line is trained the same but collects without it."""
        return self.kind == "gold" and self.arm == "S" and self.variant != "noprefill"

    @property
    def shared(self) -> str:
        """The loop whose round 1 this loop shares: its replicate's SHARED."""
        return replicate_name(SHARED, self.replicate)


def replicate_name(line: str, k: int) -> str:
    """Replicate 0 is named like its line; replicate k > 0 "<line>.<k>"."""
    return line if k == 0 else f"{line}.{k}"


def lines(cfg: Config) -> list[LoopSpec]:
    """One LoopSpec per line (replicate 0)."""
    e = cfg.experiment
    out = [LoopSpec(f"{arc}-{arm}", "gold", arc, arm) for arc in e.arcs for arm in e.arms]
    if "S" in e.arms:
        arc = "A" if "A" in e.arcs else "B"  # the headline arc
        out += [LoopSpec(f"{arc}-S-{c}", "gold", arc, "S", variant=c) for c in CONTROLS if c in e.controls]
    for arc in e.arcs:  # a baseline per arc: a frozen model continuing from its best improves by itself
        suffix = "" if arc == "A" else "-B"
        out += [LoopSpec(b + suffix, b.lower(), arc, "") for b in (CTRL, FLOOR) if b in e.baselines]
    return out


def plan(cfg: Config) -> list[LoopSpec]:
    """Every loop of the experiment in scheduling order: replicate by replicate, each in the
    priority order of its lines (config `loop.priority`)."""
    rank = {name: i for i, name in enumerate(cfg.loop.priority)}
    base = sorted(lines(cfg), key=lambda l: rank.get(l.name, len(rank)))
    return [LoopSpec(replicate_name(l.name, k), l.kind, l.arc, l.arm, l.name, k, l.variant)
            for k in range(cfg.experiment.replicates) for l in base]


def rollout_seed(experiment_seed: int, replicate: int, round_: int, thread: int) -> int:
    """Deterministic per rollout, the same in every line of a replicate (paired), distinct across
    replicates, rounds and threads, and spread out: the agent samples turn k with seed + k, so
    neighbouring rollouts must not share a sampling stream."""
    return zlib.crc32(f"{experiment_seed}:{replicate}:{round_}".encode()) % 2**20 * 2**10 + thread * 64


def rollout_id(loop: str, round_: int, thread: int) -> str:
    return f"{loop}-r{round_}-t{thread:03d}"


def control_id(loop: str, round_: int, i: int) -> str:
    """A seed-control run's id in the wave of (loop, round)."""
    return f"{loop}-r{round_}-c{i:03d}"
