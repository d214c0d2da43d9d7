"""Plain progress lines from events.jsonl, for when stdout is not a terminal (a log file, a pipe).

The lines are rfs.progress's: one per event worth a human's attention, and for the long phases
(calibration, fits) what is done and how long is left.
"""

from __future__ import annotations

import time
from pathlib import Path

from rfs.progress import PlainLines, describe
from rfs.rundir import RunDir
from rfs.tui.tail import LogTail

__all__ = ["plain_progress", "describe"]


def plain_progress(run_dir: Path, follow: bool, poll_s: float = 1.0) -> None:
    """Print the run's events so far; with `follow`, keep printing until the experiment finishes."""
    run = RunDir(Path(run_dir))
    if not run.root.is_dir():
        raise FileNotFoundError(f"{run.root} is not a run directory (it does not exist)")
    tail, finished, lines = LogTail(run.events), False, PlainLines()
    try:
        while True:
            events, restarted = tail.read()
            if restarted:
                print(f"{run.events} started over", flush=True)
            for event in events:
                if (line := lines.line(event)) is not None:
                    print(line, flush=True)
                # a resumed run starts again after an earlier finish: only the latest word counts
                if event.get("kind") in ("experiment_started", "experiment_finished"):
                    finished = event["kind"] == "experiment_finished"
            if not follow:
                if tail.offset == 0:
                    print(f"{run.events}: no events yet", flush=True)
                return
            if finished:
                return
            time.sleep(poll_s)
    except KeyboardInterrupt:
        return  # the watcher stops; the run it was watching does not
