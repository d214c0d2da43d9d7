"""Directory-level atomic writes: build in `<name>.partial`, fsync every file, rename into place.

A crash at any instant leaves either no directory under the final name or a complete one; a
leftover `.partial` is deleted by the next attempt, which starts again from scratch.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rfs.atomic import fsync


def partial(final: Path) -> Path:
    """A fresh, empty work dir beside `final` (any leftover of a crashed attempt is removed)."""
    tmp = final.with_name("." + final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, final: Path) -> Path:
    for dirpath, _, files in os.walk(tmp):
        for name in files:
            fsync(Path(dirpath) / name)
        fsync(Path(dirpath))
    os.rename(tmp, final)
    fsync(final.parent)
    return final
