"""Progress in words, shared by the TUI and plain output: the long phases (calibration, fits) reduced
to "what, how far, how long left", and one plain line per event worth a human's attention.

Pure: no I/O and no clock (the caller says what time it is), so every claim is tested on events.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

_QUIET = {"turn"}  # many per rollout; the rollout's own start and finish say what matters
_FIRST = ("loop", "round", "rollout_id", "phase", "status", "val_bpb", "slot")


def number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def duration(seconds: float) -> str:
    """`45s`, `3m05s`, `1h02m`: short enough for one status line."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def time_left(seconds: float | None) -> str:
    return f"~{duration(seconds)} left" if seconds is not None and math.isfinite(seconds) else "time left unknown yet"


@dataclass
class Calibration:
    """The seed run k times before any loop starts: how many are done and what they measured."""

    started: float
    k: int = 0  # 0: an older writer that did not say
    values: list[float] = field(default_factory=list)
    done_t: list[float] = field(default_factory=list)
    failed: int = 0

    def add(self, e: dict[str, Any]) -> None:
        """One calibrate_run event: a run ended, with its status and val_bpb."""
        self.k = int(e.get("k", self.k) or self.k)
        value = number(e.get("val_bpb"))
        if e.get("status") == "success" and math.isfinite(value):
            self.values.append(value)
        else:
            self.failed += 1
        self.done_t.append(float(e.get("t", 0.0)))

    def line(self, now: float) -> str:
        done = len(self.values) + self.failed
        of = f"/{self.k}" if self.k else ""
        vals = " ".join(f"{x:.4f}" for x in self.values) or "none yet"
        left = None
        if self.k and done:  # the runs so far set the pace; the rest go at the same rate
            left = (self.done_t[-1] - self.started) / done * (self.k - done) - (now - self.done_t[-1])
            left = max(left, 0.0)
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"calibrating the seed train.py: run {done}{of} done{failed}, val_bpb {vals}, "
                f"{duration(now - self.started)} so far, {time_left(left)}")


@dataclass
class Fit:
    """One LoRA fit's progress from its train_step events (step of total, tokens, loss)."""

    round: int
    step: int = 0
    total: int = 0  # 0: an older writer that did not say
    loss: float = math.nan
    first_t: float | None = None  # the first step's time: the pace is measured from there
    first_step: int = 0
    last_t: float = 0.0
    tokens_after_first: int = 0

    def add(self, e: dict[str, Any]) -> None:
        t, step = float(e.get("t", 0.0)), int(e.get("step", self.step))
        if self.first_t is None:
            self.first_t, self.first_step = t, step
        else:
            self.tokens_after_first += int(e.get("tokens", 0) or 0)
        self.step, self.last_t, self.loss = step, t, number(e.get("loss"))
        self.total = int(e.get("total", self.total) or self.total)

    def seconds_per_step(self) -> float | None:
        steps = self.step - self.first_step
        return (self.last_t - self.first_t) / steps if steps > 0 and self.first_t is not None else None

    def line(self, loop: str, now: float) -> str:
        of = f"/{self.total}" if self.total else ""
        parts = [f"{loop} fit round {self.round}: step {self.step}{of}"]
        per = self.seconds_per_step()
        if per and self.tokens_after_first:
            parts.append(f"{self.tokens_after_first / (self.last_t - self.first_t):.0f} tok/s")
        if math.isfinite(self.loss):
            parts.append(f"loss {self.loss:.3f}")
        left = None
        if per is not None and self.total:
            left = max(0.0, (self.total - self.step) * per - (now - self.last_t))
        parts.append(time_left(left))
        return ", ".join(parts)


def _value(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def describe(event: dict[str, Any]) -> str:
    """`HH:MM:SS kind key=value …`, the identifying keys first so lines line up when grepped."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.get("t", 0)))
    fields = {k: v for k, v in event.items() if k not in ("t", "kind") and not isinstance(v, (dict, list))}
    ordered = [k for k in _FIRST if k in fields] + [k for k in fields if k not in _FIRST]
    return f"{stamp} {event.get('kind', '?')} " + " ".join(f"{k}={_value(fields[k])}" for k in ordered)




class PlainLines:
    """Plain lines for events in order: `describe` for most, a progress line (how far, how fast,
    how long left) for each calibration run and each fit step."""

    def __init__(self) -> None:
        self.calibration: Calibration | None = None
        self.fits: dict[str, Fit] = {}

    def line(self, e: dict[str, Any]) -> str | None:
        kind, t = e.get("kind", "?"), float(e.get("t", 0.0))
        stamp = time.strftime("%H:%M:%S", time.localtime(t))
        if kind in _QUIET:
            return None
        if kind == "phase" and e.get("phase") == "calibrate":
            self.calibration = Calibration(t, int(e.get("k", 0) or 0))
        if kind == "calibrate_run":
            self.calibration = self.calibration or Calibration(t, int(e.get("k", 0) or 0))
            self.calibration.add(e)
            return f"{stamp} {self.calibration.line(t)}"
        if kind == "train_step":
            loop, round_ = str(e.get("loop", "?")), int(e.get("round", 0))
            if loop not in self.fits or self.fits[loop].round != round_:
                self.fits[loop] = Fit(round_)
            self.fits[loop].add(e)
            return f"{stamp} {self.fits[loop].line(loop, t)}"
        return describe(e)
