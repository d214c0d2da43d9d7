"""Looking at the processes a test's jobs left, through /proc: which are running, which are gone."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable


def cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return b""


def job_groups(counter: Path, controller: int) -> set[int]:
    """Process groups of the running SleepEnv jobs (their command line names the counter file),
    not counting the controller's own."""
    groups = set()
    for p in Path("/proc").glob("[0-9]*"):
        if p.name != str(controller) and str(counter).encode() in cmdline(p):
            try:
                groups.add(os.getpgid(int(p.name)))
            except ProcessLookupError:
                pass
    return groups


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(done: Callable[[], bool], within: float) -> None:
    """Until done() or `within` seconds: a hang guard, not a timing assertion."""
    deadline = time.monotonic() + within
    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)
