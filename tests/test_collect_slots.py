"""SlotPool: fairness, avoidance on retry, quarantine with events, no slot lost on cancel."""

from __future__ import annotations

import anyio
import pytest

from rfs.config import CollectCfg
from rfs.collect.slots import NoSlotsLeft, SlotPool
from rfs.events import EventLog, iter_events
from rfs.hosts import Slot


def slots(n):
    return [Slot(f"s{i}", "local", "localhost", (), -1, "python", ".") for i in range(n)]


def test_waiters_are_served_in_arrival_order():
    async def main():
        pool = SlotPool(slots(1), CollectCfg(quarantine_after=3))
        first = await pool.acquire()
        order = []

        async def wait(i):
            s = await pool.acquire()
            order.append(i)
            pool.release(s)

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(wait, i)
                await anyio.wait_all_tasks_blocked()
            pool.release(first)
        assert order == [0, 1, 2, 3, 4]
        assert pool.free == 1

    anyio.run(main)


def test_retry_avoids_the_failed_slot_unless_it_is_the_only_one():
    async def main():
        pool = SlotPool(slots(2), CollectCfg(quarantine_after=3))
        a = await pool.acquire()
        pool.release(a, failure="host down")
        assert (await pool.acquire(avoid={a.name})).name != a.name
        solo = SlotPool(slots(1), CollectCfg(quarantine_after=3))
        s = await solo.acquire()
        solo.release(s, failure="flaky")
        assert (await solo.acquire(avoid={s.name})).name == s.name  # waiting forever helps no one

    anyio.run(main)


def test_an_avoiding_waiter_does_not_block_others_behind_it():
    async def main():
        pool = SlotPool(slots(2), CollectCfg(quarantine_after=3))
        s0, s1 = await pool.acquire(), await pool.acquire()
        got = {}

        async def take(key, avoid):
            got[key] = await pool.acquire(avoid=avoid)

        async with anyio.create_task_group() as tg:
            tg.start_soon(take, "retry", {s0.name})
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(take, "fresh", set())
            await anyio.wait_all_tasks_blocked()
            pool.release(s0)  # the retry avoids s0, so the fresh waiter behind it gets it
            await anyio.wait_all_tasks_blocked()
            assert got == {"fresh": s0}
            pool.release(s1)
        assert got == {"fresh": s0, "retry": s1}

    anyio.run(main)


def test_quarantine_after_consecutive_failures_emits_events(tmp_path):
    async def main():
        log = EventLog(tmp_path / "events.jsonl")
        pool = SlotPool(slots(2), CollectCfg(quarantine_after=2), events=log)
        s = (await pool.acquire(avoid={"s1"}))
        pool.release(s, failure="boom")
        s = await pool.acquire(avoid={"s1"})
        pool.release(s)  # a success resets the count
        for _ in range(2):
            s = await pool.acquire(avoid={"s1"})
            pool.release(s, failure="boom again")
        assert [x.name for x in pool.live] == ["s1"] and pool.quarantined == {"s0": "boom again"}
        kinds = [(e["kind"], e.get("slot"), e.get("alarm")) for e in iter_events(log.path)]
        assert kinds == [("slot_quarantined", "s0", None), ("alarm", None, "quarantine")]

    anyio.run(main)


def test_when_the_last_slot_goes_every_waiter_hears_it():
    async def main():
        pool = SlotPool(slots(1), CollectCfg(quarantine_after=1))
        last = await pool.acquire()
        errors = []

        async def wait():
            with pytest.raises(NoSlotsLeft):
                await pool.acquire()
            errors.append(1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            pool.release(last, failure="gone")
        assert errors == [1, 1]
        with pytest.raises(NoSlotsLeft, match="gone"):
            await pool.acquire()

    anyio.run(main)


def test_cancelled_waiter_loses_no_slot():
    async def main():
        pool = SlotPool(slots(1), CollectCfg(quarantine_after=3))
        s = await pool.acquire()
        with anyio.move_on_after(0.01):
            await pool.acquire()
        pool.release(s)
        assert pool.free == 1
        assert await pool.acquire() == s

    anyio.run(main)
