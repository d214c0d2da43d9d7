"""An SVG of the watch screen for a run directory, for docs and bug reports.

`python -m rfs.tui.screenshot <run_dir> <out.svg> [key ...]` drives the app headless, presses the
keys (e.g. `2` to show the second loop), and saves what a terminal would show.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from rfs.tui.app import WatchApp


async def screenshot(run_dir: Path, out: Path, keys: tuple[str, ...] = (), size: tuple[int, int] = (130, 36)) -> str:
    """Save the screen as SVG at `out` and return the SVG text."""
    app = WatchApp(Path(run_dir), at_last_event=True)  # "so far" and "left" as of the recording's end
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        for key in keys:
            await pilot.press(key)
        await pilot.pause()
        svg = app.export_screenshot(title=f"rfs watch {Path(run_dir).name}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(svg)
    return svg


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python -m rfs.tui.screenshot <run_dir> <out.svg> [key ...]")
    asyncio.run(screenshot(Path(sys.argv[1]), Path(sys.argv[2]), tuple(sys.argv[3:])))
