"""Plain progress lines from events.jsonl, for when stdout is not a terminal (a log file, a pipe).

One line per event worth a human's attention; `turn` events are left out (there are many per
rollout and the rollout's own start and finish say what matters).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from rfs.rundir import RunDir
from rfs.tui.tail import LogTail

_QUIET = {"turn"}
_FIRST = ("loop", "round", "rollout_id", "phase", "status", "val_bpb", "slot")


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


def plain_progress(run_dir: Path, follow: bool, poll_s: float = 1.0) -> None:
    """Print the run's events so far; with `follow`, keep printing until the experiment finishes."""
    run = RunDir(Path(run_dir))
    if not run.root.is_dir():
        raise FileNotFoundError(f"{run.root} is not a run directory (it does not exist)")
    tail, finished = LogTail(run.events), False
    try:
        while True:
            events, restarted = tail.read()
            if restarted:
                print(f"{run.events} started over", flush=True)
            for event in events:
                if event.get("kind") not in _QUIET:
                    print(describe(event), flush=True)
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
