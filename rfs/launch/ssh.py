"""Run a job on another machine over ssh.

Connections to the host are reused across jobs (one more for every JOBS_PER_CONNECTION running jobs)
and reopened when they drop. Each job gets a fresh remote working directory (its files go over as one
tar stream, small result files come back the same way). The remote shell is the session leader sshd
made, so its PID is the job's process group: a timeout or a cancel kills that whole group over the
connection. A watchdog in the same group kills it when the ssh session goes away, so a dropped
connection never leaves a job running on the host.
"""

from __future__ import annotations

import io
import re
import shlex
import tarfile
import time
from dataclasses import replace
from pathlib import PurePosixPath
from typing import Callable

import anyio
import asyncssh

from rfs.hosts import HostCfg, Slot
from rfs.launch.base import RESULT_MAX, WORKDIR, Job, JobOutcome, Kept, workdir_prefix

CONNECT_TIMEOUT = 15.0
CLEANUP_TIMEOUT = 30.0  # bound on kill + collect + remove, so a hung host cannot hang the wave
# sshd allows 10 sessions per connection by default (MaxSessions); a job opens three one after another
# and sshd may still count a just-closed one: three jobs per connection stay clear of the limit
JOBS_PER_CONNECTION = 3
KILL_GRACE = 2.0  # seconds between TERM and KILL for the remote group

_SSH_ERRORS = (OSError, asyncssh.Error, TimeoutError)

# The remote script. Its first line is `rfs-pgid <n>` or `rfs-infra <why the slot cannot run it>`.
# The job runs in the background of this shell (same process group, no job control in sh -c) while
# the watchdog reads stdin (via fd 3: sh gives background lists /dev/null): it ends only when the
# ssh session does, and then the watchdog kills the group. `kill -SIG -N`, not `kill -- -N`: dash.
_SCRIPT = """\
cd {wd} || {{ echo "rfs-infra cannot enter {wd}"; exit 1; }}
{check}echo "rfs-pgid $$"
exec 2>&1 3<&0
{cmd} </dev/null 3<&- &
job=$!
{{ while read -r _; do :; done; kill -KILL -$$; }} <&3 >/dev/null 2>&1 &
watchdog=$!
exec 3<&-
wait $job
rc=$?
kill $watchdog 2>/dev/null
exit $rc
"""


def _infra(why: str, start: float, output: bytes = b"") -> JobOutcome:
    return JobOutcome(None, output, False, time.monotonic() - start, infra_error=why)


def _pack(job: Job) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in job.files.items():
            if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
                raise ValueError(f"job {job.rollout_id}: file name {name!r} leaves the working directory")
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _unpack(data: bytes, skip: dict[str, bytes]) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for member in tar.getmembers():
            name = member.name.removeprefix("./")
            if member.isfile() and name not in skip:
                out[name] = tar.extractfile(member).read()
    return out


def command(slot: Slot, job: Job, wd: str) -> str:
    """The remote command line for one job in working directory `wd`."""
    threads = str(max(1, len(slot.cpus)))
    env = {**job.env, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if slot.memory_mb:  # the harness watches the run's resident memory against it (rfs/launch/local.py)
        env["RFS_JOB_MEMORY_MB"] = str(slot.memory_mb)
    if slot.gpu >= 0:
        env["CUDA_VISIBLE_DEVICES"] = str(slot.gpu)
    argv = [a.replace(WORKDIR, wd) for a in job.argv]
    pin = ["taskset", "-c", ",".join(map(str, slot.cpus))] if slot.cpus else []
    cmd = shlex.join(["env", *(f"{k}={v}" for k, v in env.items()), *pin, *argv])
    # A missing program is the slot's fault (the harness's interpreter is not there), as locally.
    check = "".join(f"command -v {shlex.quote(prog)} >/dev/null || {{ echo {shlex.quote(f'rfs-infra cannot start {prog}: no such program')}; exit 1; }}\n"
                    for prog in (["taskset"] if pin else []) + argv[:1])
    script = _SCRIPT.format(wd=shlex.quote(wd), check=check, cmd=cmd)
    return f"exec /bin/sh -c {shlex.quote(script)}"  # whatever the login shell, $$ is the leader


def host_prefix(wave: str, host: HostCfg) -> str:
    """How this wave's working folders on this host are named (see SshLauncher)."""
    return workdir_prefix(wave) + re.sub(r"[^A-Za-z0-9.]", "_", f"{host.address}-{host.port}") + "-"


class SshLauncher:
    """Runs jobs on one ssh host. Call `aclose()` when done with the host."""

    def __init__(self, host: HostCfg, wave: str = ""):
        self.host = host
        # Working folders are named for the wave, so the first connection of the wave's next
        # controller removes those a killed one left (its jobs' watchdogs have killed the jobs);
        # and for this host, so that removal never reaches another host's running jobs where two
        # host names share one /tmp (one machine under two names, as in `rfs rehearse`).
        self._prefix = host_prefix(wave, host)
        self._reclaim = bool(wave)
        self.where = f"ssh {host.user + '@' if host.user else ''}{host.address}:{host.port}"
        self._load: dict[asyncssh.SSHClientConnection, int] = {}  # open connections and their running jobs
        self._lock = anyio.Lock()
        self._stale: set[str] = set()  # workdirs left behind by a dropped connection

    async def _acquire(self) -> asyncssh.SSHClientConnection:
        """The least busy live connection, or a new one when all carry JOBS_PER_CONNECTION jobs."""
        async with self._lock:
            for dead in [c for c in self._load if c.is_closed()]:
                del self._load[dead]
            conn = min(self._load, key=self._load.__getitem__, default=None)
            if conn is None or self._load[conn] >= JOBS_PER_CONNECTION:
                conn = await self._connect()
                self._load[conn] = 0
            self._load[conn] += 1
            return conn

    async def _connect(self) -> asyncssh.SSHClientConnection:
        h = self.host
        keys = {"client_keys": [h.key]} if h.key else {}
        conn = await asyncssh.connect(
            h.address, port=h.port, username=h.user or None, known_hosts=h.known_hosts or None,
            connect_timeout=CONNECT_TIMEOUT, keepalive_interval=15, keepalive_count_max=4, **keys,
        )
        if self._reclaim:
            await conn.run(f'rm -rf "${{TMPDIR:-/tmp}}"/{self._prefix}*', timeout=CLEANUP_TIMEOUT)
            self._reclaim = False
        if self._stale:
            await conn.run("rm -rf " + shlex.join(sorted(self._stale)))
            self._stale.clear()
        return conn

    async def aclose(self) -> None:
        for conn in list(self._load):
            conn.close()
            await conn.wait_closed()
        self._load.clear()

    async def run(self, slot: Slot, job: Job, on_line: Callable[[str], None] | None = None) -> JobOutcome:
        start = time.monotonic()
        try:
            conn = await self._acquire()
        except _SSH_ERRORS as exc:
            return _infra(f"{self.where}: {type(exc).__name__}: {exc}", start)
        try:
            return await self._run_on(conn, slot, job, on_line, start)
        finally:
            self._load[conn] = self._load.get(conn, 1) - 1

    async def _run_on(self, conn, slot: Slot, job: Job, on_line, start: float) -> JobOutcome:
        where = self.where
        try:
            made = await conn.run(f'd=$(mktemp -d "${{TMPDIR:-/tmp}}/{self._prefix}XXXXXX") && tar -xf - -C "$d" && echo "$d"',
                                  input=_pack(job), encoding=None, timeout=CLEANUP_TIMEOUT)
        except _SSH_ERRORS as exc:
            return _infra(f"{where}: {type(exc).__name__}: {exc}", start)
        if made.exit_status != 0:
            return _infra(f"{where}: cannot make a working directory: {made.stderr.decode(errors='replace').strip()}", start)
        wd = made.stdout.decode().strip()
        outcome, files = None, {}
        try:
            outcome = await self._run_in(conn, wd, slot, job, on_line, start, where)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT):
                files = await self._finish(conn, wd, job.files, collect=outcome is not None and not outcome.infra_error)
        return replace(outcome, files=files) if files else outcome

    async def _run_in(self, conn, wd: str, slot: Slot, job: Job, on_line, start: float, where: str) -> JobOutcome:
        out = Kept()  # bounded however much the job prints
        try:
            proc = await conn.create_process(command(slot, job, wd), encoding=None, stderr=asyncssh.STDOUT)
            head = await _head(proc, out)
        except _SSH_ERRORS as exc:
            return _infra(f"{where}: {type(exc).__name__}: {exc}", start)
        if not head.startswith("rfs-pgid "):
            return _infra(f"{where}: {head.removeprefix('rfs-infra ') or 'session ended before the job started'}", start, bytes(out))
        pgid, lost, finished = int(head.split()[1]), "", False
        try:
            with anyio.move_on_after(job.timeout_s) as scope:
                await _stream(proc, out, on_line)
                await proc.wait()
                finished = True
        except _SSH_ERRORS as exc:
            lost = f"{type(exc).__name__}: {exc}"
        finally:
            if not finished:  # timeout, cancel or a lost connection: the group must not outlive us
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT):
                    await _kill_group(conn, pgid)
        wall = time.monotonic() - start
        if lost or (finished and proc.exit_status is None and proc.exit_signal is None):
            return _infra(f"{where}: connection lost during the job ({lost or 'no exit status'})", start, bytes(out))
        code = proc.exit_status if finished and proc.exit_signal is None else None
        return JobOutcome(code, bytes(out), scope.cancelled_caught, wall, output_dropped=out.dropped)

    async def _finish(self, conn, wd: str, sent: dict[str, bytes], collect: bool) -> dict[str, bytes]:
        """Remove the working directory, first bringing back the small files the job left at its top
        (not the ones it was given), in one round trip."""
        q = shlex.quote(wd)
        pack = f"cd {q} && find . -maxdepth 1 -type f -size -{RESULT_MAX + 1}c -print0 | tar -cf - --null -T -; " if collect else ""
        try:
            got = await conn.run(f"{pack}cd / && rm -rf {q}", encoding=None, check=True)
            return _unpack(got.stdout, sent) if collect else {}
        except (*_SSH_ERRORS, tarfile.TarError):  # ProcessError (check=True) is an asyncssh.Error
            self._stale.add(wd)  # removed on the next connection to this host
            return {}


async def _head(proc, out: Kept, most: int = 200) -> str:
    """Our first line ("rfs-pgid N" or "rfs-infra …"). A login shell's own chatter before it (a motd,
    an rc file's warning) is kept in the output, never taken for the job's start or an error."""
    for _ in range(most):
        line = await proc.stdout.readline()
        text = line.decode(errors="replace").strip()
        if not line or text.startswith(("rfs-pgid ", "rfs-infra ")):
            return text
        out += line
    return ""


async def _stream(proc, out: Kept, on_line: Callable[[str], None] | None) -> None:
    pending = b""
    while chunk := await proc.stdout.read(1 << 16):
        out += chunk
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines if on_line else ():
            on_line(line.decode(errors="replace"))
    if pending and on_line:
        on_line(pending.decode(errors="replace"))


async def _kill_group(conn, pgid: int) -> None:
    """TERM the remote group, then KILL whatever is left after the grace period."""
    polls = int(KILL_GRACE / 0.1)
    # `kill -0` counts zombies, which a container's init may be slow to reap: ask ps for live ones.
    alive = f"ps -e -o pgid=,stat= | awk '$1 == {pgid} && $2 !~ /^Z/' | grep -q ."
    script = (f"kill -TERM -{pgid} 2>/dev/null; i=0; while {alive} && [ $i -lt {polls} ]; "
              f"do sleep 0.1; i=$((i+1)); done; kill -KILL -{pgid} 2>/dev/null; true")
    try:
        await conn.run(script)
    except _SSH_ERRORS:
        pass  # the connection is gone: the remote watchdog takes the group down
