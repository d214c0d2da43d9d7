"""Blocking work asked for by many coroutines, done in a worker thread one batch at a time.

A wave's jobs end together, and a /proc pass per job, serialised, would delay the wave's last row by
one pass per job (docs/LOG.md). Here what is asked while a batch runs goes
together in the next batch, so one pass answers every job that asked, and one thread hop removes
every working folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

import anyio

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Ask(Generic[T]):
    item: T
    done: bool = False
    result: Any = None
    error: BaseException | None = None


class Batches(Generic[T, R]):
    """`await batches(item)` runs `work([item, …])` in a worker thread and returns that item's
    result. `work` gets every item asked since the last batch began and returns one result per
    item, in order; an exception it raises is raised to every caller of that batch. An item is
    always answered by a batch that began after it was asked."""

    def __init__(self, work: Callable[[list[T]], list[R]]):
        self._work = work
        self._queue: list[_Ask[T]] = []
        self._running: anyio.Event | None = None  # set when the batch in progress ends

    async def __call__(self, item: T) -> R:
        ask = _Ask(item)
        self._queue.append(ask)
        try:
            while not ask.done:
                if self._running is None:
                    await self._run()
                else:
                    await self._running.wait()
        finally:
            if not ask.done and ask in self._queue:  # cancelled before a batch took it: never run
                self._queue.remove(ask)
        if ask.error is not None:
            raise ask.error
        return ask.result

    async def _run(self) -> None:
        batch, self._queue, self._running = self._queue, [], anyio.Event()
        try:
            # Not abandoned on cancel: a batch that began is finished and its callers answered.
            results = await anyio.to_thread.run_sync(self._work, [a.item for a in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self._work.__name__}: {len(results)} results for {len(batch)} items")
        except Exception as exc:
            results, errors = [None] * len(batch), [exc] * len(batch)
        except BaseException:
            self._queue[:0] = batch  # interrupted, unanswered: the next batch takes them again
            raise
        else:
            errors = [None] * len(batch)
        finally:
            self._running.set()
            self._running = None
        for a, result, error in zip(batch, results, errors):
            a.result, a.error, a.done = result, error, True
