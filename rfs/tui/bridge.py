"""The TUI in the main thread, the controller in another: a terminal run's two threads.

Textual needs the main thread (it owns the terminal and its signals), so the controller's event
loop runs in a worker thread. Quitting the TUI leaves the run going with plain progress lines;
Ctrl-C or SIGTERM, which land in the main thread, cancel the controller as they would on the plain
path, so its launchers kill their jobs.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import anyio
import anyio.from_thread
import anyio.lowlevel

from rfs.events import EventLog
from rfs.tui import watch


def with_tui(controller: Callable[[], Awaitable[int]], run_dir: Path, events: EventLog) -> int:
    """Run `controller()` in its own thread under the TUI watching `run_dir`; return its result."""
    outcome: list[Any] = []
    loop: list[tuple[Any, anyio.CancelScope]] = []  # the controller's event loop, to stop it from here

    async def main() -> int:
        with anyio.CancelScope() as scope:
            loop.append((anyio.lowlevel.current_token(), scope))
            return await controller()
        raise KeyboardInterrupt  # cancelled from the main thread, below

    def thread() -> None:
        try:
            outcome.append(anyio.run(main))
        except BaseException as exc:  # shown after the TUI closes, never lost in a thread
            outcome.append(exc)

    worker = threading.Thread(target=thread, name="rfs-controller", daemon=True)
    worker.start()
    try:
        watch(run_dir)
        if worker.is_alive():
            print("TUI closed; the run goes on (Ctrl-C stops it, `python rfs.py resume` continues it)", flush=True)
            events.echo = True
        worker.join()
    except KeyboardInterrupt:
        _cancel(loop, worker)
        raise
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _cancel(loop: list[tuple[Any, anyio.CancelScope]], worker: threading.Thread) -> None:
    """Cancel the controller's scope from this thread, and wait for its jobs to be killed."""
    while not loop and worker.is_alive():  # not started yet: wait until it can be cancelled
        time.sleep(0.01)
    if loop:
        token, scope = loop[0]
        try:
            anyio.from_thread.run_sync(scope.cancel, token=token)
        except RuntimeError:  # its event loop has ended already
            pass
    worker.join()
