"""SlotPool: hand slots to training runs fairly, count failures, quarantine slots that keep failing.

Waiters are served first come, first served, so no rollout starves behind later ones. A retry
asks to *avoid* the slots that just failed it; avoidance is a preference, not a wall: when every
live slot is one to avoid, the waiter takes one anyway rather than waiting forever.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import anyio

from rfs.config import CollectCfg
from rfs.errors import RfsError
from rfs.events import EventLog
from rfs.hosts import Slot


class NoSlotsLeft(RfsError, RuntimeError):
    """Every slot is quarantined: the wave cannot train anything more (an infrastructure failure)."""


@dataclass
class _Waiter:
    avoid: frozenset[str]
    ready: anyio.Event = field(default_factory=anyio.Event)
    slot: Slot | None = None


class SlotPool:
    def __init__(self, slots: list[Slot], collect: CollectCfg, events: EventLog | None = None):
        if not slots:
            raise ValueError("SlotPool needs at least one slot")
        names = [s.name for s in slots]
        if len(set(names)) != len(names):
            raise ValueError(f"SlotPool: slot names must be distinct, got {names}")
        self.slots = list(slots)  # every slot the pool started with (the wave's concurrency)
        self.quarantine_after = collect.quarantine_after
        self.events = events
        self._live: dict[str, Slot] = {s.name: s for s in slots}
        self._free: deque[Slot] = deque(slots)
        self._waiters: deque[_Waiter] = deque()
        self._consecutive: dict[str, int] = {s.name: 0 for s in slots}
        self.quarantined: dict[str, str] = {}  # slot name -> the last failure's reason

    @property
    def live(self) -> list[Slot]:
        return list(self._live.values())

    @property
    def free(self) -> int:
        return len(self._free)

    async def acquire(self, avoid: frozenset[str] | set[str] = frozenset()) -> Slot:
        """Wait for a slot (not one in `avoid`, when another exists); raise NoSlotsLeft if none will come."""
        waiter = _Waiter(frozenset(avoid))
        self._waiters.append(waiter)
        self._dispatch()
        try:
            await waiter.ready.wait()
        except BaseException:
            # Cancelled while waiting: a slot handed over in the meantime goes back, not lost.
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            if waiter.slot is not None:
                self._put_back(waiter.slot)
            raise
        if waiter.slot is None:
            raise NoSlotsLeft("every slot is quarantined ("
                              + "; ".join(f"{name}: {' '.join(why.split())}" for name, why in self.quarantined.items())
                              + "); fix them (`python rfs.py doctor`), then `python rfs.py resume`")
        return waiter.slot

    def release(self, slot: Slot, *, failure: str = "") -> None:
        """Give a slot back; a non-empty `failure` is an infrastructure failure on that slot."""
        if not failure:
            self._consecutive[slot.name] = 0
            self._put_back(slot)
            return
        self._consecutive[slot.name] += 1
        if self._consecutive[slot.name] < self.quarantine_after:
            self._put_back(slot)
            return
        self._quarantine(slot, failure)

    def _quarantine(self, slot: Slot, reason: str) -> None:
        del self._live[slot.name]
        self.quarantined[slot.name] = reason
        if self.events is not None:
            n = self._consecutive[slot.name]
            self.events.emit("slot_quarantined", slot=slot.name, reason=reason)
            self.events.emit(
                "alarm", loop="", alarm="quarantine", message=f"slot {slot.name} quarantined after {n} failures: {reason}"
            )
        self._dispatch()  # a waiter avoiding every *other* slot may now take one, or hear none is left

    def _put_back(self, slot: Slot) -> None:
        if slot.name in self._live:
            self._free.append(slot)
        self._dispatch()

    def _dispatch(self) -> None:
        """Give free slots to the oldest waiters that accept them."""
        if not self._live:
            while self._waiters:
                self._waiters.popleft().ready.set()  # slot stays None: acquire raises NoSlotsLeft
            return
        for waiter in list(self._waiters):
            if not self._free:
                return
            slot = self._pick(waiter)
            if slot is None:
                continue
            self._free.remove(slot)
            self._waiters.remove(waiter)
            waiter.slot = slot
            waiter.ready.set()

    def _pick(self, waiter: _Waiter) -> Slot | None:
        for slot in self._free:
            if slot.name not in waiter.avoid:
                return slot
        if self._live.keys() <= waiter.avoid:
            return self._free[0]
        return None
