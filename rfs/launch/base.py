"""What every launcher takes and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from rfs.hosts import Slot

WORKDIR = "{workdir}"  # placeholder in Job.argv, replaced by the launcher's fresh working directory
OUTPUT_HEAD, OUTPUT_TAIL = 256 << 10, 768 << 10  # a job's output is kept as its first and last bytes; the rest counted
RESULT_MAX = 1 << 20  # files a job leaves in its working directory come back in JobOutcome.files up to this size


def workdir_prefix(wave: str) -> str:
    """How a job's working directory is named: for its wave, so a later controller of the wave
    can find what a killed one left (rfs.launch.reclaim)."""
    return f"rfs-{wave}-" if wave else "rfs-"


@dataclass(frozen=True)
class Job:
    rollout_id: str
    argv: tuple[str, ...]  # may contain WORKDIR; runs with the working directory as cwd
    files: dict[str, bytes] = field(default_factory=dict)  # written into the working directory first
    timeout_s: float = 360.0  # hard wall-clock limit for the whole job
    env: dict[str, str] = field(default_factory=dict)  # extra environment variables


@dataclass(frozen=True)
class JobOutcome:
    exit_code: int | None  # None when killed or never started
    output: bytes  # stdout and stderr, merged, in order; at most OUTPUT_HEAD + OUTPUT_TAIL of it (plus a marker)
    timed_out: bool
    wall_seconds: float
    infra_error: str = ""  # non-empty: the slot failed, not the code (host down, ssh drop, preemption)
    job_id: str = ""  # e.g. SLURM "1234.7"
    files: dict[str, bytes] = field(default_factory=dict)  # small result files brought back
    output_dropped: int = 0  # bytes of output between the head and the tail that were not kept
    host: str = ""  # the node the job ran on, where the launcher learns it only then (SLURM picks it); "": the slot's host


def capped(head: bytes, tail: bytes, dropped: int) -> bytes:
    """A job's output as kept: head, a line saying how much was left out, tail."""
    if not dropped:
        return head + tail
    return head + f"\n[rfs: {dropped} bytes of output not kept]\n".encode() + tail


class Kept:
    """A streamed job's output as kept: the first OUTPUT_HEAD bytes and the last OUTPUT_TAIL, the
    rest counted, so however much a job prints the controller holds at most that much of it."""

    def __init__(self) -> None:
        self.head, self.tail, self.dropped = bytearray(), bytearray(), 0

    def __iadd__(self, data: bytes) -> "Kept":
        room = OUTPUT_HEAD - len(self.head)
        self.head += data[:room]
        self.tail += data[room:] if room > 0 else data
        if len(self.tail) > OUTPUT_TAIL:
            self.dropped += len(self.tail) - OUTPUT_TAIL
            del self.tail[: len(self.tail) - OUTPUT_TAIL]
        return self

    extend = __iadd__

    def __len__(self) -> int:
        return len(self.head) + len(self.tail) + self.dropped

    def __bytes__(self) -> bytes:
        return capped(bytes(self.head), bytes(self.tail), self.dropped)


class Launcher(Protocol):
    async def run(self, slot: Slot, job: Job, on_line: Callable[[str], None] | None = None) -> JobOutcome: ...
