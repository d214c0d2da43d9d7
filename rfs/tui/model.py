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

SHARED = "shared"  # round 1, collected once for all arms (DESIGN.md)
ALL_ARMS = "*"  # a phase of the whole run (calibration), not of one arm
# slot_quarantined is not here: the slot pool raises its own `alarm` for it
_ALARM_KINDS = ("alarm", "arm_paused", "server_crashed")


@dataclass
class Rollout:
    rollout_id: str
    arm: str
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
class Arm:
    name: str
    round: int | None = None
    phase: str = ""
    version: str = ""
    server: str = ""  # up / crashed / stopped
    paused: str = ""  # the reason, when the scheduler paused this arm
    last_loss: float | None = None
    last_kl: float | None = None
    best_by_round: dict[int, float] = field(default_factory=dict)
    rollouts: dict[tuple[int, str], Rollout] = field(default_factory=dict)

    def rounds(self) -> list[int]:
        """The rounds this arm has rollouts in, oldest first."""
        return sorted({r.round for r in self.rollouts.values()})

    def round_rollouts(self, round_: int | None = None) -> list[Rollout]:
        """This arm's rollouts in one round (its live round by default), in start order."""
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
    arm: str
    kind: str  # collapse, drift, quarantine, paused, server ...
    message: str


@dataclass
class RunView:
    """Everything the watch screen shows; `apply` is the only way it changes."""

    experiment: str = ""
    finished: bool = False
    phase: str = ""  # the whole run's phase, when it has one (calibrate)
    server: str = ""  # a researcher server no single arm owns (frozen V0 for the baselines)
    last_t: float | None = None
    last_scheduler: str = ""
    arms: dict[str, Arm] = field(default_factory=dict)  # insertion order = order of first sight
    slots: dict[str, str] = field(default_factory=dict)  # slot -> the rollout_id running on it, or ""
    quarantined: dict[str, str] = field(default_factory=dict)  # slot -> reason
    alarms: list[Alarm] = field(default_factory=list)

    def trajectory(self, name: str) -> list[float]:
        """An arm's best val_bpb per round, with the shared round(s) every arm starts from."""
        arm = self.arms.get(name)
        own = arm.best_by_round if arm else {}
        shared = self.arms[SHARED].best_by_round if SHARED in self.arms and name != SHARED else {}
        merged = {**shared, **own}
        return [merged[r] for r in sorted(merged)]

    def arm(self, name: str) -> Arm:
        if name not in self.arms:
            self.arms[name] = Arm(name)
        return self.arms[name]

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
        arm = self.arm(str(e.get("arm", "?")))
        round_ = int(e.get("round", arm.round or 0))
        key = (round_, str(e.get("rollout_id", "?")))
        if key not in arm.rollouts:
            arm.rollouts[key] = Rollout(key[1], arm.name, round_)
        if arm.round is None or round_ > arm.round:
            arm.round = round_
        return arm.rollouts[key]


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _version(value: Any, arm: str) -> str:
    """Versions arrive as 2, "v2" or the model id "<arm>/v2" depending on the writer; show "v2"."""
    return f"v{value}" if isinstance(value, int) else str(value).removeprefix(f"{arm}/")


def _note_best(arm: Arm, round_: int, val_bpb: float) -> None:
    if math.isfinite(val_bpb) and val_bpb < arm.best_by_round.get(round_, math.inf):
        arm.best_by_round[round_] = val_bpb


def _alarm(e: dict[str, Any]) -> Alarm:
    kind = e["kind"]
    if kind == "alarm":
        return Alarm(e.get("t", 0.0), str(e.get("arm", "")), str(e.get("alarm", "alarm")), str(e.get("message", "")))
    if kind == "slot_quarantined":
        return Alarm(e.get("t", 0.0), "", "quarantine", f"{e.get('slot')}: {e.get('reason', '')}")
    if kind == "arm_paused":
        return Alarm(e.get("t", 0.0), str(e.get("arm", "")), "paused", str(e.get("reason", "")))
    return Alarm(e.get("t", 0.0), str(e.get("arm", "")), "server", f"researcher server crashed ({e.get('base_url', '')})")


def _experiment_started(v: RunView, e: dict[str, Any]) -> None:
    v.experiment, v.finished = str(e.get("experiment", "")), False


def _experiment_finished(v: RunView, e: dict[str, Any]) -> None:
    v.experiment, v.finished = str(e.get("experiment", v.experiment)), True


def _phase(v: RunView, e: dict[str, Any]) -> None:
    name, phase = str(e.get("arm", "?")), str(e.get("phase", ""))
    if name == ALL_ARMS:
        v.phase = phase  # e.g. calibrate: the whole run, before any arm starts
        return
    v.phase = ""  # an arm has started: the run-wide phase is over
    if phase == "swap" and name not in v.arms:
        return  # a server key such as "v0" shared by frozen arms, not an arm of its own
    arm = v.arm(name)
    arm.phase = phase
    if "round" in e:
        arm.round = int(e["round"])
    if phase == "collect":
        arm.paused = ""  # collecting again: whatever paused it is over
    if e.get("version") is not None:
        arm.version = _version(e["version"], name)


def _server(v: RunView, e: dict[str, Any]) -> None:
    """Servers are keyed by model id (`<arm>/v<n>`); one that names no known arm is the run's."""
    model = str(e.get("version", ""))
    name = e.get("arm") or model.split("/", 1)[0]
    if name not in v.arms:
        v.server = f"{_SERVER_STATE[e['kind']]} {model}".strip()
        return
    arm = v.arm(name)
    arm.server = _SERVER_STATE[e["kind"]]
    if model and e["kind"] != "server_crashed":
        arm.version = _version(e["version"], name)


_SERVER_STATE = {"server_started": "up", "server_restarted": "up", "server_crashed": "crashed", "server_stopped": "stopped"}


def _rollout_started(v: RunView, e: dict[str, Any]) -> None:
    r = v.rollout(e)
    # a rollout replayed after a server failure starts over: its old turns and run are history
    fresh = Rollout(r.rollout_id, r.arm, r.round, thread=e.get("thread", r.thread))
    arm = v.arms[r.arm]
    arm.rollouts[(r.round, r.rollout_id)] = fresh
    if arm.phase == "swap":
        arm.phase = "collect"  # the swap happens inside collect: rollouts mean it is done


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
    r.slot, r.status, r.val_bpb, r.steps = None, e.get("status"), _float(e.get("val_bpb")), e.get("steps")


def _rollout_finished(v: RunView, e: dict[str, Any]) -> None:
    r = v.rollout(e)
    if r.slot is not None and v.slots.get(r.slot) == r.rollout_id:
        v.slots[r.slot] = ""  # the run ended without run_finished (cancelled): free its slot
    r.slot, r.finished = None, True
    r.status, r.val_bpb = str(e.get("status", r.status or "?")), _float(e.get("val_bpb"))
    if r.status == "success":
        _note_best(v.arm(r.arm), r.round, r.val_bpb)


def _slot_quarantined(v: RunView, e: dict[str, Any]) -> None:
    v.quarantined[str(e.get("slot", "?"))] = str(e.get("reason", ""))


def _wave_finished(v: RunView, e: dict[str, Any]) -> None:
    arm = v.arm(str(e.get("arm", "?")))
    _note_best(arm, int(e.get("round", arm.round or 0)), _float(e.get("best_val_bpb")))


def _train_step(v: RunView, e: dict[str, Any]) -> None:
    arm = v.arm(str(e.get("arm", "?")))
    arm.last_loss, arm.last_kl = _float(e.get("loss")), _float(e.get("kl"))


def _consolidated(v: RunView, e: dict[str, Any]) -> None:
    arm = v.arm(str(e.get("arm", "?")))
    if e.get("version") is not None:
        arm.version = _version(e["version"], arm.name)


def _arm_paused(v: RunView, e: dict[str, Any]) -> None:
    v.arm(str(e.get("arm", "?"))).paused = str(e.get("reason", "paused"))


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
    "arm_paused": _arm_paused,
    "scheduler": _scheduler,
}
