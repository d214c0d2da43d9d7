"""Where the experiment and each of its loops stand: the content of state.json.

state.json is for people and tools (the report reads it); the trace and model files are the truth,
so every phase can be re-entered from them. The JSON layout is the one earlier runs wrote, so an
old run still resumes.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from rfs.loop.plan import LoopSpec


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _added_defaults_left_out(obj: Any, added: tuple[str, ...]) -> dict[str, Any]:
    """asdict, less the fields added since earlier runs while they hold their defaults: an older
    state.json is written back as it was read."""
    defaults = {f.name: f.default for f in fields(obj) if f.name in added}
    return {k: v for k, v in asdict(obj).items() if not (k in defaults and _same(v, defaults[k]))}


@dataclass(frozen=True)
class Noise:
    """The seed train.py's val_bpb over k calibration runs on this machine."""

    mean: float
    std: float
    k: int

    def to_json(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class RoundStats:
    """One round of a loop, as its history and the collapse guard see it."""

    round: int
    best_val_bpb: float
    mean_val_bpb: float
    success_rate: float
    ast_diversity: float
    n: int = 0  # the round's successful researcher runs: the n of its mean (0 in an older state.json)
    control_n: int = 0  # the wave's successful seed-control runs of its starting train.py
    control_mean_val_bpb: float = math.nan  # arc B: the re-measured start, not the lucky run's number
    control_std_val_bpb: float = math.nan  # the noise this wave ran under (NaN under 2 controls)
    std_val_bpb: float = math.nan  # the spread of the researcher's successful runs (NaN under 2)

    def to_json(self) -> dict[str, Any]:
        return _added_defaults_left_out(self, ("n", "control_n", "control_mean_val_bpb", "control_std_val_bpb",
                                               "std_val_bpb"))


@dataclass
class LoopState:
    kind: str  # LoopSpec's kind, arc and arm, so state.json reads on its own
    arc: str
    arm: str
    start_val_bpb: float
    line: str = ""  # the line this loop replicates ("" in an older state.json: the loop's own name)
    replicate: int = 0
    round: int = 0  # the last round whose collection, record and fit are all done
    version: int = 0  # the researcher version the next round collects with (0 for baselines)
    status: str = "running"  # running | done | paused
    reason: str = ""
    best_val_bpb: float = math.nan  # NaN until a run succeeds
    best_steps: int = 0
    best_rollout: str = ""
    strikes: int = 0  # consecutive rounds the collapse guard found fault with
    history: list[RoundStats] = field(default_factory=list)

    @classmethod
    def fresh(cls, loop: LoopSpec, start_val_bpb: float) -> LoopState:
        return cls(loop.kind, loop.arc, loop.arm, start_val_bpb, loop.line_name, loop.replicate)

    def to_json(self) -> dict[str, Any]:
        return {**_added_defaults_left_out(self, ("line", "replicate")), "history": [h.to_json() for h in self.history]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoopState:
        return cls(**{**data, "history": [RoundStats(**h) for h in data["history"]]})


@dataclass
class ExperimentState:
    experiment: str
    loops: dict[str, LoopState] = field(default_factory=dict)
    noise: Noise | None = None  # None until calibrated
    alarms: dict[str, list[str]] = field(default_factory=dict)  # alarms raised once, by key
    elapsed_before_s: float = 0.0  # earlier controllers' time: a budget counts every resume
    started: float = field(default_factory=time.monotonic)  # this controller's start

    @property
    def elapsed_s(self) -> float:
        return self.elapsed_before_s + time.monotonic() - self.started

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"experiment": self.experiment, "loops": {k: v.to_json() for k, v in self.loops.items()},
                               "alarms": self.alarms, "elapsed_s": self.elapsed_s}
        if self.noise is not None:
            out["noise"] = self.noise.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], experiment: str) -> ExperimentState:
        """`data` as `RunDir.read_state()` gives it: empty for a new run."""
        noise = data.get("noise")
        return cls(
            experiment=data.get("experiment", experiment),
            loops={k: LoopState.from_json(v) for k, v in data.get("loops", {}).items()},
            noise=Noise(**noise) if noise else None,
            alarms=data.get("alarms", {}),
            elapsed_before_s=data.get("elapsed_s", 0.0),
        )
