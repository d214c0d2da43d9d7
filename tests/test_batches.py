"""Batches: blocking work from many coroutines, one worker-thread hop per batch."""

from __future__ import annotations

import threading

import anyio
import pytest

from rfs.batches import Batches


def test_items_asked_together_share_a_batch_and_each_gets_its_own_answer():
    batches: list[list[int]] = []
    gate = threading.Event()

    def square(items: list[int]) -> list[int]:
        batches.append(list(items))
        gate.wait(5)  # the first batch holds until every other item has been asked
        return [i * i for i in items]

    async def main() -> dict[int, int]:
        work, answers = Batches(square), {}

        async def ask(i: int) -> None:
            answers[i] = await work(i)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, 0)
            await anyio.wait_all_tasks_blocked()  # item 0's batch is running in its thread
            for i in range(1, 50):
                tg.start_soon(ask, i)
            await anyio.wait_all_tasks_blocked()
            gate.set()
        return answers

    answers = anyio.run(main)
    assert answers == {i: i * i for i in range(50)}
    # Asked while the first batch ran: answered by the next one, which began after they asked.
    assert batches == [[0], list(range(1, 50))]


def test_an_error_reaches_every_caller_of_its_batch_and_the_next_batch_runs():
    gate = threading.Event()

    def work(items: list[str]) -> list[str]:
        gate.wait(5)
        if "bad" in items:
            raise OSError("disk full")
        return [s.upper() for s in items]

    async def main() -> tuple[dict[str, str], str]:
        batches, answers = Batches(work), {}

        async def ask(s: str) -> None:
            try:
                answers[s] = await batches(s)
            except OSError as exc:
                answers[s] = f"error: {exc}"

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "a")
            await anyio.wait_all_tasks_blocked()  # "a" runs alone; the next two share a batch
            tg.start_soon(ask, "bad")
            tg.start_soon(ask, "c")
            await anyio.wait_all_tasks_blocked()
            gate.set()
        return answers, await batches("d")

    answers, after = anyio.run(main)
    assert answers == {"a": "A", "bad": "error: disk full", "c": "error: disk full"}
    assert after == "D"


def test_a_caller_cancelled_while_queued_is_never_run():
    ran: list[list[str]] = []
    gate = threading.Event()

    def work(items: list[str]) -> list[str]:
        ran.append(list(items))
        gate.wait(5)
        return items

    async def main() -> None:
        batches = Batches(work)
        async with anyio.create_task_group() as tg:
            tg.start_soon(batches, "first")
            await anyio.wait_all_tasks_blocked()
            with anyio.move_on_after(0.05):
                await batches("cancelled")  # queued behind "first", then given up
            tg.start_soon(batches, "later")
            await anyio.wait_all_tasks_blocked()
            gate.set()

    anyio.run(main)
    assert ran == [["first"], ["later"]]


def test_work_that_answers_the_wrong_number_of_items_is_an_error():
    async def main() -> None:
        await Batches(lambda items: [])("x")

    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        anyio.run(main)
