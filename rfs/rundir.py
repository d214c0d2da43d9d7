"""The run directory (`runs/<experiment>/`), the only source of truth for a run.

Paths are named here once so no stage spells another stage's file layout by hand.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rfs import atomic
from rfs.errors import RfsError


class RunLocked(RfsError, RuntimeError):
    """Another controller holds the run directory."""


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "experiment.toml"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def placement(self) -> Path:
        """Which GPUs serve, fit and run slots (rfs.placement), as planned at the last start."""
        return self.root / "placement.json"

    @property
    def mirrored(self) -> Path:
        """What rfs.mirror has copied to the object store: {path: [size, mtime_ns]}."""
        return self.root / "mirror.json"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    def traces(self, loop: str, round_: int) -> Path:
        return self.root / "traces" / loop / f"round-{round_}.parquet"

    def trace_files(self) -> list[Path]:
        """Every compacted round file of the run, in path order."""
        return sorted((self.root / "traces").glob("*/round-*.parquet"))

    def pending(self, loop: str, round_: int) -> Path:
        """The wave's finished rollouts so far, one pending_row() file each; compacted into
        traces() after the wave."""
        return self.root / "traces" / loop / f"round-{round_}.d"

    def pending_row(self, loop: str, round_: int, rollout_id: str) -> Path:
        """One finished rollout's row, as JSON (rfs.trace.dumps)."""
        return self.pending(loop, round_) / f"{rollout_id}.json"

    def blob(self, loop: str, round_: int, rollout_id: str) -> Path:
        return self.root / "blobs" / loop / f"round-{round_}" / f"{rollout_id}.log.zst"

    def metrics(self, name: str) -> Path:
        return self.root / "metrics" / f"{name}.parquet"

    def model(self, loop: str, version: int) -> Path:
        return self.root / "models" / loop / f"v{version}"

    def kl_anchor(self, loop: str) -> Path:
        """The loop's fixed KL anchor, computed from V0 once (rfs.consolidate.anchor)."""
        return self.root / "models" / loop / "kl_anchor"

    def best_train_py(self, loop: str) -> Path:
        """The loop's best train.py so far, where arc B continues from."""
        return self.root / "best" / f"{loop}.py"

    def probes(self, loop: str) -> "RunDir":
        """The probe rollouts of a loop's versions: a run directory of their own, so the loop's
        curves (traces/*/) never see them."""
        return RunDir(self.root / "probes" / loop)

    def transfer_log(self, version: int) -> Path:
        """In a probes() directory: the transfer run's full output for one version."""
        return self.root / "transfer" / f"v{version}.log.zst"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def read_state(self) -> dict[str, Any]:
        return json.loads(self.state.read_text()) if self.state.exists() else {}

    def write_state(self, state: dict[str, Any]) -> None:
        atomic.write_json(self.state, state)


class Lock:
    """One controller per run directory: an flock held for the controller's lifetime.

    The kernel drops the lock when the process dies (even by kill -9), so a stale lock file never
    blocks `rfs resume`.
    """

    def __init__(self, root: Path):
        self.path = Path(root) / "controller.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(
                f"{self.path.parent} is in use by another controller ({holder}); "
                "stop it first, or watch it with `python rfs.py watch`"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Lock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
