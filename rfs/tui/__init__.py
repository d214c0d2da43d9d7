"""`rfs watch`: follow a run's events.jsonl, in a Textual app on a terminal or as plain lines."""

from __future__ import annotations

import sys
from pathlib import Path

from rfs.tui.plain import plain_progress

__all__ = ["watch", "plain_progress"]


def watch(run_dir: Path) -> None:
    """The TUI when stdout is a terminal, plain progress lines otherwise; it only reads files."""
    if not sys.stdout.isatty():
        plain_progress(run_dir, follow=True)
        return
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run directory (it does not exist)")
    from rfs.tui.app import WatchApp  # Textual only when there is a terminal to draw on

    WatchApp(Path(run_dir)).run()
