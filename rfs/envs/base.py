"""The environment interface every adapter implements."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from rfs.hosts import Slot
from rfs.launch.base import Job, JobOutcome


@dataclass(frozen=True)
class RunResult:
    status: str  # success | syntax_error | crash | timeout | harness_violation | infra_error
    val_bpb: float = math.nan  # NaN unless status == "success"
    steps: int = 0
    tokens: int = 0
    training_seconds: float = 0.0
    wall_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    exit_code: int | None = None
    detail: str = ""  # one line: why this status
    stdout_tail: str = ""
    summary: dict[str, str] = field(default_factory=dict)  # the parsed `key: value` summary lines


class Environment(Protocol):
    name: str

    def prepare(self) -> None:
        """Make data, tokenizer and anything else the harness needs; idempotent and hash-checked."""

    def program_md(self) -> str: ...

    def seed_train_py(self) -> str: ...

    def harness_hashes(self) -> dict[str, str]:
        """Pinned sha256 of every harness file (program.md, prepare.py, seed train.py …)."""

    def job(self, train_py: str, slot: Slot, rollout_id: str) -> Job:
        """The launcher job that trains this train.py on the slot and evaluates it with the harness."""

    def result(self, outcome: JobOutcome) -> RunResult:
        """Turn a finished job into a truthful status and the harness's own val_bpb."""
