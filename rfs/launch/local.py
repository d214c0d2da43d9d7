"""The local launcher: one subprocess per job on this machine, confined and always cleaned up.

Each job gets a fresh temporary working directory (removed afterwards), its own session and
process group, an environment tag, the slot's cores (sched_setaffinity), finite rlimits (the address
space sized from the slot's memory on CPU slots; RFS_JOB_MEMORY_MB tells the harness the slot's
memory to watch, on GPU slots too) and, where the platform allows it, no network (rfs.launch.netns).
Its output is kept as head + tail (rfs.launch.base.OUTPUT_HEAD/OUTPUT_TAIL), the rest counted, so the
controller's memory stays bounded however much a job prints. On timeout or cancellation the whole group and
every process carrying the tag get SIGTERM, then SIGKILL.

A controller killed by -9 cannot stop its jobs: they run on, orphaned. Each job therefore also
carries its wave's key (`RFS_WAVE`), and the next controller of that wave calls `reclaim(key)`
before it starts any job: what the dead one left running is killed and its working folders go.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

import anyio

from rfs.batches import Batches
from rfs.hosts import Slot
from rfs.launch.base import OUTPUT_HEAD, OUTPUT_TAIL, WORKDIR, Job, JobOutcome, capped, workdir_prefix
from rfs.launch.netns import Isolation, isolation

KILL_GRACE_S = 3.0  # between SIGTERM and SIGKILL: lets the harness reap its own children
RLIMIT_AS_BYTES = 32 << 30  # a slot with no memory size: generous but finite
AS_SLACK_BYTES = 4 << 30  # address space beyond the slot's memory: torch maps much it never touches
RLIMIT_CPU_FACTOR = 4  # CPU seconds allowed per wall second of timeout, per core
WAVE_VAR = "RFS_WAVE"  # names the wave a job belongs to, inherited by all it starts


# anyio's open_process has no preexec_fn, so limits are applied by programs that set them and then
# exec the job in place (the pid and the process group stay the job's): util-linux's prlimit and
# taskset where they exist, else a Python one-liner, an interpreter start per job (docs/LOG.md).
CONFINE = """
import os, resource, sys
cpus, cpu_s, as_bytes = sys.argv[1:4]
if cpus:
    os.sched_setaffinity(0, [int(c) for c in cpus.split(",")])
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if int(as_bytes) > 0:
    resource.setrlimit(resource.RLIMIT_AS, (int(as_bytes), int(as_bytes)))
resource.setrlimit(resource.RLIMIT_CPU, (int(cpu_s), int(cpu_s)))
os.execvp(sys.argv[4], sys.argv[4:])
"""
NATIVE = bool(shutil.which("prlimit") and shutil.which("taskset"))


def _confined(slot: Slot, timeout_s: float, net_prefix: tuple[str, ...], argv: list[str]) -> list[str]:
    cpu_seconds = int(timeout_s * max(1, len(slot.cpus)) * RLIMIT_CPU_FACTOR) + 60
    # CUDA maps far more address space than it uses: no RLIMIT_AS on GPU slots; there, and as the
    # precise limit everywhere, the harness watches the run's resident memory (RFS_JOB_MEMORY_MB).
    as_bytes = ((slot.memory_mb << 20) + AS_SLACK_BYTES if slot.memory_mb else RLIMIT_AS_BYTES) if slot.gpu < 0 else 0
    cpus = ",".join(map(str, slot.cpus))
    if not NATIVE:
        return [*net_prefix, sys.executable, "-c", CONFINE, cpus, str(cpu_seconds), str(as_bytes), *argv]
    limits = ["prlimit", "--core=0", f"--cpu={cpu_seconds}", *([f"--as={as_bytes}"] if as_bytes else [])]
    # taskset first: the rest of the chain (each one an exec) already runs on the slot's cores,
    # not on the controller's.
    return [*(["taskset", "-c", cpus] if cpus else []), *net_prefix, *limits, *argv]


def _tagged(tags: set[bytes]) -> dict[bytes, list[int]]:
    """Every live process whose environment carries one of the tags, by tag. A daemon that
    double-forked and left the process group has lost its parent, but it still carries the
    environment it inherited."""
    needles = {b"\0" + tag + b"\0": tag for tag in tags}
    found: dict[bytes, list[int]] = {tag: [] for tag in tags}
    # This reads every process's environment on the host: os.listdir and three raw syscalls a
    # process (each one a GIL release in this worker thread), not Path.glob and open().
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            environ = b"\0" + _read_all(f"/proc/{pid}/environ") + b"\0"
        except OSError:
            continue
        for needle, tag in needles.items():
            if needle in environ:
                found[tag].append(int(pid))
    return found


def _read_all(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = [os.read(fd, 1 << 16)]
        while len(chunks[-1]) == 1 << 16:  # an environment over 64 KiB: rare
            chunks.append(os.read(fd, 1 << 16))
        return b"".join(chunks)
    finally:
        os.close(fd)


def _sweep(tags: list[bytes]) -> list[list[int]]:
    """One /proc pass for every job that asked (see rfs.batches)."""
    found = _tagged(set(tags))
    return [found[tag] for tag in tags]


def _remove(workdirs: list[Path]) -> list[None]:
    return [shutil.rmtree(workdir, ignore_errors=True) for workdir in workdirs]


class _Child:
    """A job's process, started off the event loop and awaited through a pidfd.

    asyncio's subprocess support forks on the event loop's thread and starts a waiter thread per
    child. Here Popen runs in a worker thread and the exit is a pidfd turning readable (Linux 5.3+;
    elsewhere the loop polls for it), so a wave's jobs start sooner (docs/LOG.md). The output goes to a file in
    memory, read once the job is over, so a running job costs the loop nothing; only a caller
    that streams lines gets a pipe the loop reads as they come."""

    def __init__(self, popen: subprocess.Popen, out: int):
        self.popen, self.pid, self._out = popen, popen.pid, out
        try:
            self._pidfd: int | None = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self._pidfd = None

    @classmethod
    async def start(cls, argv: list[str], cwd: Path, env: dict[str, str], limiter: anyio.CapacityLimiter, *,
                    stream: bool, isolation: Isolation) -> _Child:
        out, write = os.pipe() if stream else (_memory_file(),) * 2
        try:
            popen = await anyio.to_thread.run_sync(functools.partial(
                popen_confined, isolation, argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=write, stderr=write,
                start_new_session=True), limiter=limiter)
        except BaseException:
            os.close(out)
            raise
        finally:
            if write != out:
                os.close(write)
        if stream:
            os.set_blocking(out, False)
        return cls(popen, out)

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    async def wait(self) -> int:
        if self._pidfd is not None:
            await anyio.wait_readable(self._pidfd)
        while self.popen.poll() is None:  # with a pidfd, once: the child has exited and is reaped here
            await anyio.sleep(0.05)
        return self.popen.returncode

    def written(self) -> tuple[bytes, bytes, int]:
        """The output in the memory file (started with stream=False): head, tail and the bytes between."""
        size = os.fstat(self._out).st_size
        if size <= OUTPUT_HEAD + OUTPUT_TAIL:
            return _pread_all(self._out, 0, size), b"", 0
        return (_pread_all(self._out, 0, OUTPUT_HEAD), _pread_all(self._out, size - OUTPUT_TAIL, OUTPUT_TAIL),
                size - OUTPUT_HEAD - OUTPUT_TAIL)

    async def read(self) -> bytes:
        """The next output from the pipe (started with stream=True), b"" once every writer closed it."""
        while True:
            await anyio.wait_readable(self._out)
            try:
                return os.read(self._out, 1 << 16)
            except BlockingIOError:
                continue

    def close(self) -> None:
        for fd in (self._out, self._pidfd):
            if fd is not None:
                os.close(fd)
        self._out = self._pidfd = None


def _pread_all(fd: int, offset: int, n: int) -> bytes:
    chunks = []
    while n > 0 and (chunk := os.pread(fd, min(n, 1 << 20), offset)):
        chunks.append(chunk)
        offset, n = offset + len(chunk), n - len(chunk)
    return b"".join(chunks)


class _Kept:
    """A streamed job's output as kept: the first OUTPUT_HEAD bytes, the last OUTPUT_TAIL, the rest counted."""

    def __init__(self) -> None:
        self.head, self.tail, self.dropped = bytearray(), bytearray(), 0

    def add(self, data: bytes) -> None:
        room = OUTPUT_HEAD - len(self.head)
        self.head += data[:room]
        self.tail += data[room:] if room > 0 else data
        if len(self.tail) > OUTPUT_TAIL:
            cut = len(self.tail) - OUTPUT_TAIL
            del self.tail[:cut]
            self.dropped += cut


def popen_confined(isolation: Isolation, argv: list[str], **kwargs) -> subprocess.Popen:
    """Popen, with the child in the isolating network namespace where there is one (argv is
    `_confined` already, with the isolation's prefix where it has one)."""
    with isolation.entered():
        return subprocess.Popen(argv, **kwargs)


def _memory_file() -> int:
    """An anonymous file in memory; an unlinked temporary file where memfd_create is missing."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("rfs-job-output")
    fd, path = tempfile.mkstemp()
    os.unlink(path)
    return fd


def _signal_tree(pgid: int, pids: list[int], sig: int) -> bool:
    """Signal the group and the pids; whether any process was there to receive it."""
    hit = False
    for send, target in ((os.killpg, pgid), *((os.kill, pid) for pid in pids)):
        try:
            send(target, sig)
            hit = True
        except (ProcessLookupError, PermissionError):
            pass
    return hit


async def _stop(proc: _Child, tag: bytes, tagged: Batches[bytes, list[int]]) -> None:
    """SIGTERM the group and every tagged process, wait a little, then SIGKILL whatever is left."""
    if not _signal_tree(proc.pid, await tagged(tag), signal.SIGTERM):
        return  # the usual end of a run: its group is empty and nothing carries the tag; one sweep
    with anyio.move_on_after(KILL_GRACE_S):
        await proc.wait()
    _signal_tree(proc.pid, await tagged(tag), signal.SIGKILL)
    await proc.wait()
    # SIGKILL is delivered asynchronously: make sure nothing of the job is still running on return.
    with anyio.move_on_after(KILL_GRACE_S):
        while left := await tagged(tag):
            _signal_tree(proc.pid, left, signal.SIGKILL)
            await anyio.sleep(0.05)


async def reclaim(wave: str) -> int:
    """Kill every process a killed controller of `wave` left running, remove the working folders
    of its jobs, and return how many processes there were. Call it before the wave starts a job:
    each running process that carries the wave's key is then an orphan."""
    return await anyio.to_thread.run_sync(_reclaim, wave)


def _reclaim(wave: str) -> int:
    if not wave:
        raise ValueError("reclaim: no wave key (every job and folder would match)")
    tag = f"{WAVE_VAR}={wave}".encode()
    killed: set[int] = set()
    deadline = time.monotonic() + KILL_GRACE_S
    while (pids := _tagged({tag})[tag]) and time.monotonic() < deadline:
        for pid in pids:  # the orphan's whole group: a process that dropped the variable is in it
            try:
                _signal_tree(os.getpgid(pid), [pid], signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed.update(pids)
        time.sleep(0.05)
    for workdir in Path(tempfile.gettempdir()).glob(workdir_prefix(wave) + "*"):
        shutil.rmtree(workdir, ignore_errors=True)
    return len(killed)


class LocalLauncher:
    """Launcher for slots on this machine. `wave` keys its jobs for `reclaim` (empty: not kept)."""

    def __init__(self, isolate_network: bool = True, wave: str = ""):
        self.isolation = isolation() if isolate_network else Isolation()
        self.wave = wave
        self._tagged = Batches(_sweep)
        self._remove = Batches(_remove)
        self._spawn = anyio.CapacityLimiter(4)  # Popen in a few worker threads, reused: never a thread per job

    async def run(self, slot: Slot, job: Job, on_line: Callable[[str], None] | None = None) -> JobOutcome:
        started = time.monotonic()
        # Made, as it is removed, off the event loop: file creation costs the loop more than a thread
        # hop. Shielded: a cancel meanwhile takes effect in the try below, whose finally removes it.
        with anyio.CancelScope(shield=True):
            workdir = await anyio.to_thread.run_sync(self._workdir, job, limiter=self._spawn)
        try:
            return await self._run(slot, job, workdir, on_line, started)
        finally:
            with anyio.CancelScope(shield=True):
                await self._remove(workdir)

    def _workdir(self, job: Job) -> Path:
        workdir = Path(tempfile.mkdtemp(prefix=f"{workdir_prefix(self.wave)}{job.rollout_id}-"))
        try:
            for name, data in job.files.items():
                if Path(name).is_absolute() or ".." in Path(name).parts:
                    raise ValueError(f"job {job.rollout_id}: file name {name!r} leaves the working directory")
                path = workdir / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return workdir

    async def _run(self, slot: Slot, job: Job, workdir: Path, on_line, started: float) -> JobOutcome:
        argv = [a.replace(WORKDIR, str(workdir)) for a in job.argv]
        if not argv or shutil.which(argv[0], path=os.environ.get("PATH")) is None:
            # Checked here because behind `unshare` a missing program would look like exit 127.
            return JobOutcome(None, b"", False, time.monotonic() - started, infra_error=f"cannot start {argv[:1]}: no such program")
        threads = str(max(1, len(slot.cpus)))
        tag = f"RFS_JOB_TAG={uuid.uuid4().hex}"
        env = {**os.environ, **job.env, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        env["RFS_JOB_TAG"] = tag.split("=", 1)[1]
        if self.wave:
            env[WAVE_VAR] = self.wave
        if slot.gpu >= 0:
            env["CUDA_VISIBLE_DEVICES"] = str(slot.gpu)
        if slot.memory_mb:
            env["RFS_JOB_MEMORY_MB"] = str(slot.memory_mb)
        stream = on_line is not None
        try:
            proc = await _Child.start(_confined(slot, job.timeout_s, self.isolation.prefix, argv), workdir, env,
                                      self._spawn, stream=stream, isolation=self.isolation)
        except (OSError, subprocess.SubprocessError) as exc:
            return JobOutcome(None, b"", False, time.monotonic() - started, infra_error=f"could not start {argv[0]!r}: {exc}")
        kept = _Kept()
        stopped = False
        try:
            async with anyio.create_task_group() as tg:
                if stream:
                    tg.start_soon(self._stream, proc, kept, on_line)
                with anyio.move_on_after(job.timeout_s) as scope:
                    await proc.wait()
                timed_out = scope.cancelled_caught
                await _stop(proc, tag.encode(), self._tagged)
                stopped = True  # nothing of the job is left to start anything new
                # A daemonised grandchild may still hold the pipe open: drain briefly, then stop reading.
                tg.cancel_scope.deadline = anyio.current_time() + 2
            head, tail, dropped = (bytes(kept.head), bytes(kept.tail), kept.dropped) if stream else proc.written()
        finally:
            # Cancelled before or during the stop above: stop here, where the cancellation cannot reach.
            with anyio.CancelScope(shield=True):
                if not stopped:
                    await _stop(proc, tag.encode(), self._tagged)
                proc.close()
        exit_code = None if timed_out else proc.returncode
        return JobOutcome(exit_code, capped(head, tail, dropped), timed_out, time.monotonic() - started, output_dropped=dropped)

    @staticmethod
    async def _stream(proc: _Child, kept: _Kept, on_line: Callable[[str], None]) -> None:
        pending = b""
        while data := await proc.read():
            kept.add(data)
            pending += data
            if len(pending) > OUTPUT_TAIL and b"\n" not in data:  # a line without an end: pass it on in pieces
                on_line(pending.decode(errors="replace"))
                pending = b""
            *lines, pending = pending.split(b"\n")
            for line in lines:
                on_line(line.decode(errors="replace"))
        if pending:
            on_line(pending.decode(errors="replace"))
