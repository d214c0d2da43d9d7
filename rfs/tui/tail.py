"""Following events.jsonl from outside the controller: new whole lines, and a file that started
over (a new run written to the same directory) noticed rather than silently read past its end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rfs.events import read_events


class LogTail:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0

    def read(self) -> tuple[list[dict[str, Any]], bool]:
        """The events appended since the last read, and whether the file started over (the
        caller then rebuilds its view from these events alone)."""
        restarted = self.path.exists() and self.path.stat().st_size < self.offset
        if restarted:
            self.offset = 0
        events, self.offset = read_events(self.path, self.offset)
        return events, restarted
