"""The append-only event log (`events.jsonl`) that the TUI and report read.

Events are observations, not state: the controller never reads them back to decide anything
(state.json and the trace files are the truth), so a lost last line after a crash costs nothing.
Each event is one JSON line written with a single O_APPEND write, so concurrent writers and a
reader tailing the file never see half a line.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from rfs.progress import PlainLines


class EventLog:
    def __init__(self, path: Path, echo: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.echo = echo  # plain progress lines on stdout when no TUI is attached
        self._lines = PlainLines()  # fed every event, printed or not, so progress stays exact
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if self._torn_tail():  # a controller killed mid-write: end that line so ours stays whole
            os.write(self._fd, b"\n")

    def _torn_tail(self) -> bool:
        size = self.path.stat().st_size
        if size == 0:
            return False
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            return f.read(1) != b"\n"

    def emit(self, kind: str, **fields: Any) -> None:
        record = {"t": round(time.time(), 3), "kind": kind, **fields}
        os.write(self._fd, (json.dumps(record, default=str, allow_nan=True) + "\n").encode())
        line = self._lines.line(record)
        if self.echo and line is not None:
            print(line, flush=True)

    def close(self) -> None:
        os.close(self._fd)


def read_events(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Events from byte `offset` on, and the offset to continue from (only whole lines count)."""
    path = Path(path)
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    events = []
    for line in data[:end].splitlines():
        try:
            events.append(upgrade(json.loads(line)))
        except json.JSONDecodeError:
            continue  # the torn tail of a killed writer: skipped, never fatal to a reader
    return events, offset + end


def upgrade(event: dict[str, Any]) -> dict[str, Any]:
    """An event as this rfs names it; runs before trace schema 2 wrote `arm` for the loop."""
    if "arm" in event and "loop" not in event:
        event["loop"] = event.pop("arm")
    if event.get("kind") == "arm_paused":
        event["kind"] = "loop_paused"
    return event


def iter_events(path: Path) -> Iterator[dict[str, Any]]:
    yield from read_events(path)[0]
