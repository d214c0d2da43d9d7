"""Run jobs as SLURM steps: one allocation holds the experiment's slot pool, each job an `srun` step in it.

    launcher = SlurmLauncher(cfg, allocation=shared_allocation(cfg))
    await launcher.open(n_slots, cpus_per_slot)   # salloc --no-shell once; later opens share it
    outcome = await launcher.run(slot, job)       # srun --jobid=<allocation> … (any number at once)
    await launcher.close()                        # the last user out scancels it

One allocation for every concurrent wave, because two waves that each ask for the whole slot pool
deadlock: the second waits in the queue for nodes the first holds until its wave ends, while the
scheduler waits for both. A lost allocation (preempted, cancelled, expired) is re-acquired by the
next step that finds it gone; the steps that died with it are infra errors, re-run by the wave.

Without `open()`, each job is its own one-step SLURM job. Timeouts are enforced here, not by
`srun --time` (minute granularity): the step is scancel'd. A step that SLURM itself ends (cancelled
from outside, preempted, node failure, allocation gone, out of memory) or that was still queued when
its timeout fired is an infra error, never the code's fault. The controller may itself run inside
a SLURM job: its `SLURM_*` variables would make srun a step of *that* job, so they are dropped.

A slot with a GPU is one GPU per task, in the allocation and in each step (`--gpus-per-task=1`;
a step inside the allocation would inherit it, a job of its own would not): SLURM picks the
(node, GPU), never one a running step holds, and sets CUDA_VISIBLE_DEVICES over whatever the job's
environment says. The outcome names the node the step ran on (SLURMD_NODENAME), for the trace.
"""

from __future__ import annotations

import math
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import anyio
import anyio.abc

from rfs.errors import RfsError
from rfs.hosts import SlurmCfg, Slot
from rfs.launch.base import RESULT_MAX, WORKDIR, Job, JobOutcome, Kept, workdir_prefix

CLIENT_TIMEOUT = 30.0  # salloc aside, a SLURM client that takes longer is stuck (munged down, controller gone)
STOP_WAIT = 15.0  # after scancel: KillWait plus slack for srun to report and exit

# The step's own first line names it and the node SLURM put it on; the job's stdout and stderr merge
# after it, so srun's stderr carries only SLURM's messages, which are what decide an infra error.
# A missing program is the slot's fault (the harness's interpreter is not there), as locally.
_WRAP = """echo "rfs-step $SLURM_JOB_ID.$SLURM_STEP_ID $SLURMD_NODENAME"
command -v "$1" >/dev/null || { echo "rfs-infra cannot start $1: no such program"; exit 127; }
exec 2>&1; exec "$@"
"""
# A task that dies within moments of starting can take its output with it (slurmstepd drops it),
# the `rfs-step` line included; srun's own report of the task's end still says that it ran.
_TASK_ENDED = re.compile(r"task \d+: (Exited|Killed|Terminated|Segmentation|Aborted)")
_STEP_ID = re.compile(r"StepId=(\d+\.\d+)")
# "Job step aborted" is srun hearing from slurmctld that the step was ended under it (an allocation
# cancelled or revoked); srun prints it instead of the CANCELLED banner when the race goes that way.
_SLURM_ENDED = re.compile(r"\*\*\* (JOB|STEP) \S+ ON \S+ CANCELLED|Job step aborted|PREEMPT|Node failure|revoked|expired", re.I)
# slurmstepd's report of the cgroup OOM killer: the slot's memory, not the code's fault.
_OOM = re.compile(r"oom[- ]kill|Out Of Memory|OUT_OF_MEMORY", re.I)


class SlurmError(RfsError, RuntimeError):
    """The allocation could not be made or released."""


def scrubbed(env: dict[str, str]) -> dict[str, str]:
    """`env` without the SLURM job variables of a controller that runs inside a SLURM job (srun
    would join that job instead of ours); SLURM_CONF, which names the cluster, stays."""
    return {k: v for k, v in env.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}


class Allocation:
    """One SLURM allocation shared by every launcher given it: made by the first open(), cancelled
    by the last close(), re-acquired when SLURM took it away (preemption, scancel, time limit)."""

    def __init__(self, name: str = "rfs-wave"):
        self.name = name
        self.id = ""
        self.users = 0
        self.lost: list[str] = []  # job ids SLURM took away, in order: each one re-acquired
        self.shape: tuple[int, int, int, float] = (0, 0, 0, 0.0)  # what open() asked for, for a renewal
        self.reclaimed = False  # a killed controller's allocation of this name was looked for
        self._lock: anyio.Lock | None = None

    def lock(self) -> anyio.Lock:
        if self._lock is None:  # made inside the event loop that uses it
            self._lock = anyio.Lock()
        return self._lock


_SHARED: dict[SlurmCfg, Allocation] = {}


def shared_allocation(cfg: SlurmCfg) -> Allocation:
    """The process's one allocation for this cluster config, named after hosts.slurm.pool."""
    if cfg not in _SHARED:
        _SHARED[cfg] = Allocation(f"rfs-pool-{cfg.pool}" if cfg.pool else "rfs-pool")
    return _SHARED[cfg]


class SlurmLauncher:
    def __init__(self, cfg: SlurmCfg, env: dict[str, str] | None = None, workroot: str | None = None, wave: str = "",
                 allocation: Allocation | None = None):
        self.cfg = cfg
        self.name = f"rfs-wave-{wave}" if wave else "rfs-wave"  # a wave's own allocation's name: see reclaim()
        self.prefix = workdir_prefix(wave)
        self.env = scrubbed({**os.environ, **(env or {})})  # env: e.g. SLURM_CONF for a cluster that is not the default
        # Steps may land on any node: their working directories must be on a shared filesystem.
        self.workroot = Path(workroot) if workroot else Path(cfg.root) / "runs" / ".slurm-work"
        self.shared = allocation or Allocation(self.name)

    @property
    def allocation(self) -> str:
        """The job id every step runs in, once open()."""
        return self.shared.id

    def _common(self) -> list[str]:
        return [f"--partition={self.cfg.partition}"] * bool(self.cfg.partition) + [f"--account={self.cfg.account}"] * bool(self.cfg.account)

    async def _client(self, argv: list[str], timeout: float = CLIENT_TIMEOUT) -> subprocess.CompletedProcess:
        try:
            with anyio.fail_after(timeout):
                return await anyio.run_process(argv, env=self.env, check=False)
        except FileNotFoundError:
            raise SlurmError(f"{argv[0]} is not on PATH: install SLURM's client tools here, "
                             "or remove the slurm slots from hosts.toml") from None
        except TimeoutError:
            raise SlurmError(f"{argv[0]} did not answer in {timeout:.0f} s: check that munged and slurmctld "
                             "are up (`scontrol ping`)") from None

    async def open(self, n_slots: int, cpus_per_slot: int = 1, gpus_per_slot: int = 0, wait_s: float = 3600.0) -> str:
        """Join the shared allocation, making it (waiting in the queue up to wait_s) if there is none
        or SLURM took it away; returns its job id."""
        async with self.shared.lock():
            if self.shared.id and not await self._alive(self.shared.id):
                self.shared.lost.append(self.shared.id)
                self.shared.id = ""
            if not self.shared.id:
                if not self.shared.reclaimed:  # one controller per run: one of this name is a dead one's
                    await self._cancel_named(self.shared.name)
                    self.shared.reclaimed = True
                self.shared.id = await self._salloc(n_slots, cpus_per_slot, gpus_per_slot, wait_s)
                self.shared.shape = (n_slots, cpus_per_slot, gpus_per_slot, wait_s)
            self.shared.users += 1
            return self.shared.id

    async def _salloc(self, n_slots: int, cpus_per_slot: int, gpus_per_slot: int, wait_s: float) -> str:
        # --immediate: salloc itself withdraws the request after wait_s (killing salloc would leave it queued)
        argv = ["salloc", "--no-shell", f"--job-name={self.shared.name}", f"--ntasks={n_slots}",
                f"--cpus-per-task={self.cfg.cpus_per_slot or cpus_per_slot}", f"--time={self.cfg.time_limit}",
                f"--immediate={math.ceil(wait_s)}", *self._mem(), *self._common(), *self.cfg.extra_args]
        if gpus_per_slot:
            argv.append(f"--gpus-per-task={gpus_per_slot}")
        got = await self._client(argv, wait_s + CLIENT_TIMEOUT)
        found = re.search(rb"Granted job allocation (\d+)", got.stderr)
        if got.returncode != 0 or not found:
            raise SlurmError(f"salloc failed ({got.returncode}): {_said(got)}; check hosts.slurm against `sinfo`")
        return found.group(1).decode()

    def _mem(self) -> list[str]:
        return [f"--mem-per-cpu={self.cfg.mem_per_cpu}"] if self.cfg.mem_per_cpu else []

    async def _alive(self, job_id: str) -> bool:
        """Whether SLURM still runs allocation `job_id` (a client failure counts as alive: never
        re-allocate on a hiccup, the next lost step asks again)."""
        try:
            got = await self._client(["squeue", "--noheader", f"--jobs={job_id}", "--format=%T"])
        except SlurmError:
            return True
        if got.returncode != 0:
            return b"Invalid job id" not in got.stderr
        return got.stdout.decode().strip() in ("RUNNING", "CONFIGURING")

    async def renew(self, lost_id: str) -> None:
        """After a step found its allocation gone: make a new one for the steps that follow (their
        wave re-runs the lost ones), unless another step already did."""
        async with self.shared.lock():
            if self.shared.id != lost_id or not lost_id or await self._alive(lost_id):
                return
            self.shared.lost.append(lost_id)
            await self._client(["scancel", lost_id])  # a preempted job may be requeued: never two
            self.shared.id = await self._salloc(*self.shared.shape)

    async def reclaim(self) -> list[str]:
        """Cancel this user's allocations named for this launcher's wave, remove the working folders
        named for it, and return the allocations' job ids. Before the wave's own open(), each one is
        a killed controller's: its steps would hold the nodes."""
        ids = await self._cancel_named(self.name)
        for workdir in self.workroot.glob(self.prefix + "*"):
            shutil.rmtree(workdir, ignore_errors=True)
        return ids

    async def _cancel_named(self, name: str) -> list[str]:
        user = pwd.getpwuid(os.getuid()).pw_name
        got = await self._client(["squeue", "--noheader", f"--name={name}", f"--user={user}", "--format=%i"])
        if got.returncode != 0:
            raise SlurmError(f"squeue failed ({got.returncode}): {_said(got)}; check that SLURM is up (`scontrol ping`)")
        ids = got.stdout.decode().split()
        if ids and (got := await self._client(["scancel", *ids])).returncode != 0:
            raise SlurmError(f"scancel {' '.join(ids)} failed: {_said(got)}; cancel them by hand before resuming")
        return ids

    async def close(self) -> None:
        """Leave the shared allocation; the last user out cancels it."""
        async with self.shared.lock():
            self.shared.users = max(0, self.shared.users - 1)
            if self.shared.users or not self.shared.id:
                return
            self.shared._lock = None  # idle: the next user's event loop makes its own
            job, self.shared.id = self.shared.id, ""
            got = await self._client(["scancel", job])
            if got.returncode != 0:
                raise SlurmError(f"scancel {job} failed: {_said(got)}; cancel it by hand: it holds the nodes")

    def _srun(self, slot: Slot, job: Job, wd: str) -> list[str]:
        argv = ["srun", "--ntasks=1", "--nodes=1", f"--cpus-per-task={self.cfg.cpus_per_slot or max(1, len(slot.cpus))}",
                f"--job-name={job.rollout_id}", f"--chdir={wd}", *self._mem()]
        if self.allocation:
            argv += [f"--jobid={self.allocation}", "--exact"]  # a step with only its own cores
        else:  # a job of its own; --time is a backstop only, the timeout below is the real one
            argv += [f"--time={math.ceil(job.timeout_s / 60) + 1}", *self._common(), *self.cfg.extra_args]
        if slot.gpu >= 0:
            argv.append("--gpus-per-task=1")  # SLURM picks the device and sets CUDA_VISIBLE_DEVICES
        return argv + ["sh", "-c", _WRAP, "rfs-step", *(a.replace(WORKDIR, wd) for a in job.argv)]

    async def run(self, slot: Slot, job: Job, on_line: Callable[[str], None] | None = None) -> JobOutcome:
        start = time.monotonic()
        self.workroot.mkdir(parents=True, exist_ok=True)
        wd = Path(tempfile.mkdtemp(prefix=self.prefix, dir=self.workroot))
        try:
            for name, data in job.files.items():
                if Path(name).is_absolute() or ".." in Path(name).parts:
                    raise ValueError(f"job {job.rollout_id}: file name {name!r} leaves the working directory")
                (wd / name).parent.mkdir(parents=True, exist_ok=True)
                (wd / name).write_bytes(data)
            outcome = await self._step(slot, job, str(wd), on_line, start)
            return outcome if outcome.infra_error else _with_files(outcome, wd, job.files)
        finally:
            shutil.rmtree(wd, ignore_errors=True)

    async def _step(self, slot: Slot, job: Job, wd: str, on_line, start: float) -> JobOutcome:
        out, err, step, node, missing = Kept(), Kept(), [], [], []  # output bounded however much the job prints

        def line(raw: bytes) -> None:
            text = raw.decode(errors="replace")
            if not step and text.startswith("rfs-step "):
                step.append(text.split()[1])
                node.extend(text.split()[2:3])
                return
            if not out and text.startswith("rfs-infra "):
                missing.append(text.removeprefix("rfs-infra "))  # believed below only with exit 127
            out.extend(raw + b"\n")
            if on_line:
                on_line(text)

        threads = str(max(1, len(slot.cpus)))
        env = {**self.env, **job.env, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        if slot.memory_mb:  # the harness watches the run's resident memory against it (rfs/launch/local.py)
            env["RFS_JOB_MEMORY_MB"] = str(slot.memory_mb)
        proc = await anyio.open_process(self._srun(slot, job, wd), env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        stopped = ""  # why we ended the step ourselves, if we did
        try:
            with anyio.move_on_after(job.timeout_s) as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_lines, proc.stdout, line)
                    tg.start_soon(_lines, proc.stderr, lambda raw: err.extend(raw + b"\n"))
                code = await proc.wait()
            stopped = "timeout" if scope.cancelled_caught else ""
        except BaseException:
            stopped = "cancel"
            raise
        finally:
            with anyio.CancelScope(shield=True):
                if stopped:
                    await self._stop(proc, step[0] if step else "")
                await proc.aclose()
        wall = time.monotonic() - start
        host = node[0] if node else ""  # SLURMD_NODENAME: the node SLURM ran the step on
        slurm_said = bytes(err).decode(errors="replace").strip()
        named = _STEP_ID.search(slurm_said)
        job_id = step[0] if step else named.group(1) if named else self.allocation
        if stopped == "timeout" and not step:  # never ran: the queue's fault, not the code's
            return JobOutcome(None, bytes(out), False, wall, f"the step was still queued when its {job.timeout_s:.0f} s "
                              f"timeout fired: {slurm_said[-300:]}", job_id)
        if stopped == "timeout":
            return JobOutcome(None, bytes(out), True, wall, job_id=job_id, host=host)
        if not step and not _TASK_ENDED.search(slurm_said):
            return JobOutcome(None, bytes(out), False, wall, f"srun: the step never started: {slurm_said[-500:]}", job_id)
        if missing and code == 127:
            return JobOutcome(None, b"", False, wall, missing[0], job_id, host=host)
        if _SLURM_ENDED.search(slurm_said):
            await self.renew(self.allocation)  # the allocation itself may be what ended
            return JobOutcome(None, bytes(out), False, wall, f"SLURM ended step {job_id}: {slurm_said[-500:]}", job_id, host=host)
        if _OOM.search(slurm_said):
            return JobOutcome(None, bytes(out), False, wall, f"out of memory (SLURM's OOM killer) in step {job_id}: "
                              f"{slurm_said[-300:]}; raise hosts.slurm.mem_per_cpu", job_id, host=host)
        return JobOutcome(code, bytes(out) + bytes(err), False, wall, job_id=job_id, output_dropped=out.dropped + err.dropped,
                          host=host)

    async def _stop(self, proc: anyio.abc.Process, step: str) -> None:
        """scancel the step (SIGKILL to srun would leave it running), or TERM srun, which cancels it too."""
        try:
            cancelled = bool(step) and (await self._client(["scancel", step])).returncode == 0
        except SlurmError:
            cancelled = False
        if not cancelled and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        with anyio.move_on_after(STOP_WAIT):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _said(got: subprocess.CompletedProcess) -> str:
    """A SLURM client's reason in one line: its last error line (the earlier ones are context)."""
    lines = got.stderr.decode(errors="replace").strip().splitlines() or ["(no message)"]
    return next((l for l in reversed(lines) if "error" in l.lower()), lines[-1]).strip()


async def _lines(stream, emit: Callable[[bytes], None]) -> None:
    pending = b""
    async for chunk in stream:
        *done, pending = (pending + chunk).split(b"\n")
        for raw in done:
            emit(raw)
    if pending:
        emit(pending)


def _with_files(outcome: JobOutcome, wd: Path, sent: dict[str, bytes]) -> JobOutcome:
    """Bring back the small files the job left at the top of its working directory."""
    files = {p.name: p.read_bytes() for p in sorted(wd.iterdir())
             if p.is_file() and p.name not in sent and p.stat().st_size <= RESULT_MAX}
    return replace(outcome, files=files)
