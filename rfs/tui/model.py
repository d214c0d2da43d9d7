"""The watch view model: events.jsonl reduced to what the TUI shows.

Pure reduction, no I/O and no clock: feed it events (in file order) and read the view back. The
widgets only render it, so everything the screen claims is tested here against plain events.
Unknown kinds and missing fields are tolerated: the log is an observation stream written by
several stages, and a viewer must never crash on a newer or older writer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from rfs.progress import Calibration, Fit, duration, number, time_left
from rfs.trace import SHARED

ALL_LOOPS = "*"  # a phase of the whole run (calibration), not of one loop
_BUSY = ("collect", "consolidate", "eval", "swap")  # phases in which a loop does work
_ENDED = ("done", "stopped", "failed")  # a loop's last phase: schedule.py emits its status
# slot_quarantined is not here: the slot pool raises its own `alarm` for it
_ALARM_KINDS = ("alarm", "loop_paused", "server_crashed")


@dataclass
class Rollout:
    rollout_id: str
    loop: str
    round: int
    thread: int | None = None
    turns: int = 0
    invalid_turns: int = 0
    slot: str | None = None  # set while its training run holds a slot
    status: str | None = None  # the run's (then the rollout's) status once known
    val_bpb: float = math.nan
    steps: int | None = None
    finished: bool = False

    @property
    def state(self) -> str:
        """One short phrase: thinking, running on <slot>, or the status with its val_bpb."""
        if self.slot is not None:
            return f"running on {self.slot}"
        if self.status is None:
            return "thinking"
        text = self.status if not math.isfinite(self.val_bpb) else f"{self.status} {self.val_bpb:.4f}"
        # a finished run whose rollout has not ended yet: the researcher is reading the result
        return text if self.finished else f"{text} (reading)"


@dataclass
class Loop:
    name: str
    round: int | None = None
    phase: str = ""
    version: str = ""
    server: str = ""  # up / crashed / stopped
    paused: str = ""  # the reason, when the scheduler paused this loop
    reason: str = ""  # why its last phase (done) was reached
    phase_t: float | None = None  # when its current phase began
    last_active: float = 0.0  # the time of its last sign of work (a rollout, a run, a fit step)
    fit: Fit | None = None  # the fit of its live round, once it has stepped
    probes: list[str] = field(default_factory=list)  # probes of the running eval phase
    probes_done: list[str] = field(default_factory=list)
    last_loss: float | None = None
    last_kl: float | None = None
    best_by_round: dict[int, float] = field(default_factory=dict)
    rollouts: dict[tuple[int, str], Rollout] = field(default_factory=dict)

    def rounds(self) -> list[int]:
        """The rounds this loop has rollouts in, oldest first."""
        return sorted({r.round for r in self.rollouts.values()})

    def round_rollouts(self, round_: int | None = None) -> list[Rollout]:
        """This loop's rollouts in one round (its live round by default), in start order."""
        wanted = self.round if round_ is None else round_
        return [r for r in self.rollouts.values() if r.round == wanted]

    def round_summary(self, round_: int | None = None) -> str:
        """`3/4 done, 2 success, best 1.3620` for one round (the live one by default)."""
        rollouts = self.round_rollouts(round_)
        done = [r for r in rollouts if r.finished]
        good = [r.val_bpb for r in done if r.status == "success" and math.isfinite(r.val_bpb)]
        best = f", best {min(good):.4f}" if good else ""
        return f"{len(done)}/{len(rollouts)} done, {len(good)} success{best}"


@dataclass(frozen=True)
class Alarm:
    t: float
    loop: str
    kind: str  # collapse, drift, quarantine, paused, server ...
    message: str


@dataclass
class RunView:
    """Everything the watch screen shows; `apply` is the only way it changes."""

    experiment: str = ""
    finished: bool = False
    phase: str = ""  # the whole run's phase, when it has one (calibrate)
    server: str = ""  # a researcher server no single loop owns (frozen V0 for the baselines)
    last_t: float | None = None
    last_scheduler: str = ""
    loops: dict[str, Loop] = field(default_factory=dict)  # insertion order = order of first sight
    slots: dict[str, str] = field(default_factory=dict)  # slot -> the rollout_id running on it, or ""
    quarantined: dict[str, str] = field(default_factory=dict)  # slot -> reason
    alarms: list[Alarm] = field(default_factory=list)
    calibration: Calibration | None = None
    swaps: dict[str, float] = field(default_factory=dict)  # model id -> when its swap began
    took: dict[str, list[float]] = field(default_factory=dict)  # phase -> durations seen (swap, eval, collect)

    def typical(self, phase: str) -> float | None:
        """How long the last phase of this kind took, the estimate for the next."""
        seen = self.took.get(phase)
        return seen[-1] if seen else None

    def idle_reason(self, name: str) -> str:
        """Why a loop does no work now ("" when it does): paused, finished, or waiting for another."""
        loop = self.loops.get(name)
        if loop is None:
            return ""
        if loop.paused:
            return f"paused by the guard: {loop.paused}"
        if loop.phase in _ENDED:
            return f"finished: {loop.reason}" if loop.reason else "finished"
        if not loop.phase and SHARED in self.loops and self.loops[SHARED].phase == "eval":
            return "waiting for V0's probes (run once for every loop)"
        # FLOOR collects its own round 1 (no memory to share); every other loop starts from the shared one
        if (loop.phase == "collect" and loop.round == 1 and name != SHARED and not loop.round_rollouts(1)
                and not name.startswith("FLOOR")):
            return "waiting for the shared round 1 (collected once with V0 for every loop)"
        if loop.phase == "consolidate" and loop.fit is None:
            fitting = [n for n, x in self.loops.items() if x.phase == "consolidate" and x.fit is not None and n != name]
            if fitting:
                return f"waiting for {fitting[0]}'s fit to end (one fit at a time)"
        return ""

    def busy(self, name: str) -> bool:
        loop = self.loops.get(name)
        return loop is not None and loop.phase in _BUSY and not self.idle_reason(name)

    def live_loop(self, current: str | None = None) -> str | None:
        """The loop to show: `current` while it works, else the one that worked last."""
        if current is not None and self.busy(current):
            return current
        busy = [n for n in self.loops if self.busy(n)]
        if not busy:
            return current if current in self.loops else (next(iter(self.loops), None))
        return max(busy, key=lambda n: self.loops[n].last_active)

    def activities(self, now: float) -> list[str]:
        """One line per thing running now, each saying what it is and how long it will take."""
        out = []
        if self.phase == "calibrate":
            out.append(self.calibration.line(now) if self.calibration else "calibrating the seed train.py")
        for model_id, t0 in self.swaps.items():
            last = self.typical("swap")
            out.append(f"loading researcher {model_id} (convert, start the server): {duration(now - t0)} so far"
                       + (f", the last took {duration(last)}" if last is not None else ""))
        for name, loop in self.loops.items():
            line = self._loop_activity(name, loop, now)
            if line:
                out.append(line)
        if not out:
            out.append("finished" if self.finished else "waiting for the next event")
        return out

    def _loop_activity(self, name: str, loop: Loop, now: float) -> str:
        since = now - loop.phase_t if loop.phase_t is not None else 0.0
        if loop.phase == "collect" and not self.idle_reason(name):
            rollouts = loop.round_rollouts()
            if not rollouts:
                return ""
            done = [r for r in rollouts if r.finished]
            running = sum(1 for r in rollouts if r.slot is not None)
            left = since / len(done) * (len(rollouts) - len(done)) if done else None
            if left is None and self.typical("collect") is not None:
                left = max(0.0, self.typical("collect") - since)
            return (f"{name} round {loop.round} wave: {len(done)}/{len(rollouts)} rollouts done, {running} training "
                    f"runs on slots, {duration(since)} so far, {time_left(left)}")
        if loop.phase == "consolidate":
            if loop.fit is not None:
                return loop.fit.line(name, now)
            return "" if self.idle_reason(name) else (
                f"{name} fit round {loop.round}: preparing (dataset, KL anchor, model load), {duration(since)} so far")
        if loop.phase == "eval":
            if self.idle_reason(name):
                return ""
            last = self.typical("eval")
            left = max(0.0, last - since) if last is not None else None
            todo = [p for p in loop.probes if p not in loop.probes_done]
            return (f"{name} probes of v{loop.round}: {len(loop.probes_done)}/{len(loop.probes)} done"
                    + (f" ({' '.join(todo)} to go)" if todo else "") + f", {duration(since)} so far, {time_left(left)}")
        return ""

    def trajectory(self, name: str) -> list[float]:
        """A loop's best val_bpb per round, with the shared round(s) every loop starts from."""
        loop = self.loops.get(name)
        own = loop.best_by_round if loop else {}
        shared = self.loops[SHARED].best_by_round if SHARED in self.loops and name != SHARED else {}
        merged = {**shared, **own}
        return [merged[r] for r in sorted(merged)]

    def loop(self, name: str) -> Loop:
        if name not in self.loops:
            self.loops[name] = Loop(name)
        return self.loops[name]

    def apply_all(self, events: Iterable[dict[str, Any]]) -> "RunView":
        for event in events:
            self.apply(event)
        return self

    def apply(self, e: dict[str, Any]) -> None:
        self.last_t = e.get("t", self.last_t)
        handler = _HANDLERS.get(e.get("kind", ""))
        if handler is not None:
            handler(self, e)
        if e.get("kind") in _ALARM_KINDS:
            self.alarms.append(_alarm(e))

    def rollout(self, e: dict[str, Any]) -> Rollout:
        """The rollout an event names, created on first sight (events may start mid-run)."""
        loop = self.loop(str(e.get("loop", "?")))
        round_ = int(e.get("round", loop.round or 0))
        key = (round_, str(e.get("rollout_id", "?")))
        if key not in loop.rollouts:
            loop.rollouts[key] = Rollout(key[1], loop.name, round_)
        if loop.round is None or round_ > loop.round:
            loop.round = round_
        loop.last_active = float(e.get("t", loop.last_active))
        return loop.rollouts[key]


def _version(value: Any, loop: str) -> str:
    """Versions arrive as 2, "v2" or the model id "<loop>/v2" depending on the writer; show "v2"."""
    return f"v{value}" if isinstance(value, int) else str(value).removeprefix(f"{loop}/")


def _note_best(loop: Loop, round_: int, val_bpb: float) -> None:
    if math.isfinite(val_bpb) and val_bpb < loop.best_by_round.get(round_, math.inf):
        loop.best_by_round[round_] = val_bpb


def _alarm(e: dict[str, Any]) -> Alarm:
    kind = e["kind"]
    if kind == "alarm":
        return Alarm(e.get("t", 0.0), str(e.get("loop", "")), str(e.get("alarm", "alarm")), str(e.get("message", "")))
    if kind == "slot_quarantined":
        return Alarm(e.get("t", 0.0), "", "quarantine", f"{e.get('slot')}: {e.get('reason', '')}")
    if kind == "loop_paused":
        return Alarm(e.get("t", 0.0), str(e.get("loop", "")), "paused", str(e.get("reason", "")))
    return Alarm(e.get("t", 0.0), str(e.get("loop", "")), "server", f"researcher server crashed ({e.get('base_url', '')})")


def _experiment_started(v: RunView, e: dict[str, Any]) -> None:
    v.experiment, v.finished = str(e.get("experiment", "")), False


def _experiment_finished(v: RunView, e: dict[str, Any]) -> None:
    v.experiment, v.finished = str(e.get("experiment", v.experiment)), True


def _phase(v: RunView, e: dict[str, Any]) -> None:
    name, phase = str(e.get("loop", "?")), str(e.get("phase", ""))
    if name == ALL_LOOPS:
        v.phase = phase  # e.g. calibrate: the whole run, before any loop starts
        if phase == "calibrate":
            v.calibration = Calibration(float(e.get("t", 0.0)), int(e.get("k", 0) or 0))
        return
    v.phase = ""  # a loop has started: the run-wide phase is over
    if phase == "swap":
        v.swaps[str(e.get("version", name))] = float(e.get("t", 0.0))
    if phase == "swap" and (name not in v.loops or v.loops[name].phase == "eval"):
        return  # a server key such as "v0" shared by frozen loops, or a swap inside the probes' phase
    loop = v.loop(name)
    t = float(e.get("t", 0.0))
    if loop.phase == "eval" and phase == "eval_done" and loop.phase_t is not None:
        v.took.setdefault("eval", []).append(t - loop.phase_t)
    if phase != "swap":  # the swap happens inside collect: the wave's clock keeps running
        loop.phase_t = t
    if phase in _BUSY:
        loop.last_active = t
    if phase == "consolidate":
        loop.fit = None
    if phase == "eval":
        loop.probes, loop.probes_done = [str(p) for p in e.get("probes", [])], []
    loop.reason = str(e.get("reason", ""))
    loop.phase = phase
    if "round" in e:
        loop.round = int(e["round"])
    if phase == "collect":
        loop.paused = ""  # collecting again: whatever paused it is over
    if e.get("version") is not None:
        loop.version = _version(e["version"], name)


def _server(v: RunView, e: dict[str, Any]) -> None:
    """Servers are keyed by model id (`<loop>/v<n>`); one that names no known loop is the run's."""
    model = str(e.get("version", ""))
    if model in v.swaps and e["kind"] != "server_crashed":
        v.took.setdefault("swap", []).append(float(e.get("t", 0.0)) - v.swaps.pop(model))
    name = e.get("loop") or model.split("/", 1)[0]
    if name not in v.loops:
        v.server = f"{_SERVER_STATE[e['kind']]} {model}".strip()
        return
    loop = v.loop(name)
    loop.server = _SERVER_STATE[e["kind"]]
    if model and e["kind"] != "server_crashed":
        loop.version = _version(e["version"], name)


_SERVER_STATE = {"server_started": "up", "server_restarted": "up", "server_crashed": "crashed", "server_stopped": "stopped"}


def _rollout_started(v: RunView, e: dict[str, Any]) -> None:
    r = v.rollout(e)
    # a rollout replayed after a server failure starts over: its old turns and run are history
    fresh = Rollout(r.rollout_id, r.loop, r.round, thread=e.get("thread", r.thread))
    loop = v.loops[r.loop]
    loop.rollouts[(r.round, r.rollout_id)] = fresh
    if r.loop == SHARED and loop.phase != "collect":  # the shared loop has no phase events of its own
        loop.phase, loop.phase_t = "collect", float(e.get("t", 0.0))
    if loop.phase == "swap":
        loop.phase = "collect"  # the swap happens inside collect: rollouts mean it is done


def _turn(v: RunView, e: dict[str, Any]) -> None:
    r = v.rollout(e)
    r.turns += 1
    r.invalid_turns += 0 if e.get("valid", True) else 1


def _run_started(v: RunView, e: dict[str, Any]) -> None:
    r = v.rollout(e)
    r.slot = str(e.get("slot", "?"))
    v.slots[r.slot] = r.rollout_id


def _run_finished(v: RunView, e: dict[str, Any]) -> None:
    r = v.rollout(e)
    slot = str(e.get("slot", r.slot))
    if v.slots.get(slot) == r.rollout_id:
        v.slots[slot] = ""
    r.slot, r.status, r.val_bpb, r.steps = None, e.get("status"), number(e.get("val_bpb")), e.get("steps")


def _rollout_finished(v: RunView, e: dict[str, Any]) -> None:
    r = v.rollout(e)
    if r.slot is not None and v.slots.get(r.slot) == r.rollout_id:
        v.slots[r.slot] = ""  # the run ended without run_finished (cancelled): free its slot
    r.slot, r.finished = None, True
    r.status, r.val_bpb = str(e.get("status", r.status or "?")), number(e.get("val_bpb"))
    if r.status == "success":
        _note_best(v.loop(r.loop), r.round, r.val_bpb)


def _slot_quarantined(v: RunView, e: dict[str, Any]) -> None:
    v.quarantined[str(e.get("slot", "?"))] = str(e.get("reason", ""))


def _wave_finished(v: RunView, e: dict[str, Any]) -> None:
    loop = v.loop(str(e.get("loop", "?")))
    if loop.phase == "collect" and loop.phase_t is not None:
        v.took.setdefault("collect", []).append(float(e.get("t", 0.0)) - loop.phase_t)
    if loop.name == SHARED:
        loop.phase, loop.reason = "done", f"round {e.get('round', 1)} collected once, shared by every loop"
    _note_best(loop, int(e.get("round", loop.round or 0)), number(e.get("best_val_bpb")))


def _train_step(v: RunView, e: dict[str, Any]) -> None:
    loop = v.loop(str(e.get("loop", "?")))
    loop.last_loss, loop.last_kl = number(e.get("loss")), number(e.get("kl"))
    round_ = int(e.get("round", loop.round or 0))
    if loop.fit is None or loop.fit.round != round_:
        loop.fit = Fit(round_)
    loop.fit.add(e)
    loop.last_active = float(e.get("t", loop.last_active))


def _calibrate_run(v: RunView, e: dict[str, Any]) -> None:
    cal = v.calibration or Calibration(float(e.get("t", 0.0)), int(e.get("k", 0) or 0))
    v.calibration = cal
    cal.add(e)


def _probe_done(v: RunView, e: dict[str, Any]) -> None:
    loop = v.loop(str(e.get("loop", "?")))
    loop.probes_done.append(str(e.get("probe", "?")))


def _consolidated(v: RunView, e: dict[str, Any]) -> None:
    loop = v.loop(str(e.get("loop", "?")))
    if e.get("version") is not None:
        loop.version = _version(e["version"], loop.name)


def _loop_paused(v: RunView, e: dict[str, Any]) -> None:
    v.loop(str(e.get("loop", "?"))).paused = str(e.get("reason", "paused"))


def _scheduler(v: RunView, e: dict[str, Any]) -> None:
    rest = " ".join(f"{k}={x}" for k, x in e.items() if k not in ("t", "kind", "decision"))
    v.last_scheduler = f"{e.get('decision', '')} {rest}".strip()


_HANDLERS = {
    "experiment_started": _experiment_started,
    "experiment_finished": _experiment_finished,
    "phase": _phase,
    "server_started": _server,
    "server_crashed": _server,
    "server_restarted": _server,
    "server_stopped": _server,
    "rollout_started": _rollout_started,
    "turn": _turn,
    "run_started": _run_started,
    "run_finished": _run_finished,
    "rollout_finished": _rollout_finished,
    "slot_quarantined": _slot_quarantined,
    "wave_finished": _wave_finished,
    "train_step": _train_step,
    "consolidated": _consolidated,
    "loop_paused": _loop_paused,
    "scheduler": _scheduler,
    "calibrate_run": _calibrate_run,
    "probe_done": _probe_done,
}
