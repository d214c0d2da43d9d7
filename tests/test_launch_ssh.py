"""The ssh launcher against a real sshd on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

from rfs.hosts import Slot
from rfs.launch.base import Job, JobOutcome
from rfs.launch.ssh import JOBS_PER_CONNECTION, SshLauncher, host_prefix
from tests.infra import free_port, sshd  # noqa: F401  (fixture)

SLOT = Slot("ssh-0", "ssh", "loop", (0,), -1, sys.executable, "")


def _survivors(marker: str) -> str:
    return subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True).stdout.strip()


def _gone(marker: str, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within  # the kernel reaps killed processes asynchronously
    while _survivors(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _survivors(marker)


async def _run(launcher: SshLauncher, job: Job, slot: Slot = SLOT, lines: list | None = None):
    try:
        return await launcher.run(slot, job, lines.append if lines is not None else None)
    finally:
        await launcher.aclose()


def test_job_runs_streams_and_returns_files(sshd):
    script = (
        "import os, sys\n"
        "print('cwd', os.getcwd()); print('data', open('in.txt').read())\n"
        "print('pinned', sorted(os.sched_getaffinity(0))); print('env', os.environ['RFS_X'])\n"
        "open('result.json', 'w').write('{\"ok\": 1}')\n"
        "print('to stderr', file=sys.stderr); sys.exit(3)\n"
    )
    job = Job("r1", (sys.executable, "-u", "{workdir}/job.py"), {"job.py": script.encode(), "in.txt": b"hello"}, 30, {"RFS_X": "y"})
    lines: list[str] = []
    out = anyio.run(_run, SshLauncher(sshd.host), job, SLOT, lines)
    assert out.infra_error == "" and out.exit_code == 3 and not out.timed_out
    wd = lines[0].split()[1]
    assert lines[1:] == ["data hello", "pinned [0]", "env y", "to stderr"]
    assert out.output.decode().splitlines() == lines
    assert out.files == {"result.json": b'{"ok": 1}'}
    assert not os.path.exists(wd), "the working directory is removed"


def test_connection_is_reused_and_reopened(sshd):
    async def main():
        launcher = SshLauncher(sshd.host)
        job = Job("r", ("echo", "ok"), timeout_s=30)
        first = await launcher.run(SLOT, job)
        second = await launcher.run(SLOT, job)
        [conn] = launcher._load
        conn.close()
        await conn.wait_closed()
        third = await launcher.run(SLOT, job)
        reopened = list(launcher._load)
        await launcher.aclose()
        return (first, second, third), conn, reopened

    outs, conn, reopened = anyio.run(main)
    for out in outs:
        assert (out.exit_code, out.output, out.infra_error) == (0, b"ok\n", "")
    assert len(reopened) == 1 and reopened[0] is not conn


def test_many_concurrent_jobs_spread_over_connections(sshd, tmp_path):
    """sshd's default MaxSessions (10) refuses most of 12 jobs on one connection (ChannelOpenError)."""
    n = 4 * JOBS_PER_CONNECTION
    # A barrier, not a sleep: no job ends before all n run, however slowly connections open here.
    barrier = f"touch {tmp_path}/$0; while [ $(ls {tmp_path} | wc -l) -lt {n} ]; do sleep 0.05; done; echo $0"

    async def main():
        launcher = SshLauncher(sshd.host)
        outs, peak = [], []

        async def one(i: int) -> None:
            job = Job(f"c{i}", ("sh", "-c", barrier, str(i)), timeout_s=60)
            outs.append(await launcher.run(SLOT, job, lambda _: peak.append(len(launcher._load))))

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
        await launcher.aclose()
        return outs, peak

    outs, peak = anyio.run(main)
    assert [o for o in outs if o.infra_error or o.exit_code != 0] == []
    # the job's own last line: a login shell's chatter before it is kept in the output (rfs/launch/ssh.py _head)
    assert sorted(int(o.output.split()[-1]) for o in outs) == list(range(n))
    assert max(peak) == 4


def test_timeout_kills_the_remote_process_group(sshd):
    marker = f"rfs-ssh-timeout-{uuid.uuid4().hex}"
    # a child and a grandchild, both ignoring nothing, both must go
    job = Job("r2", ("sh", "-c", f"sleep 300 & sh -c 'sleep 301; : {marker}' & echo started; : {marker}; wait"), timeout_s=1.0)
    out = anyio.run(_run, SshLauncher(sshd.host), job)
    assert out.timed_out and out.exit_code is None and out.infra_error == ""
    assert out.output == b"started\n"
    assert _gone(marker), _survivors(marker)


def test_cancel_kills_the_remote_process_group(sshd):
    marker = f"rfs-ssh-cancel-{uuid.uuid4().hex}"

    async def main():
        launcher = SshLauncher(sshd.host)
        started = anyio.Event()
        with anyio.move_on_after(20):
            async with anyio.create_task_group() as tg:
                job = Job("r3", ("sh", "-c", f"echo up; sleep 300; : {marker}"), timeout_s=60)

                async def go():
                    await launcher.run(SLOT, job, lambda line: started.set())

                tg.start_soon(go)
                await started.wait()
                assert _survivors(marker)
                tg.cancel_scope.cancel()
        await launcher.aclose()

    anyio.run(main)
    assert _gone(marker), _survivors(marker)


def test_dropped_connection_is_infra_error_and_the_job_dies(sshd):
    marker = f"rfs-ssh-drop-{uuid.uuid4().hex}"

    async def main():
        launcher = SshLauncher(sshd.host)
        before = set(sshd.sessions())

        def on_line(line: str) -> None:
            for pid in set(sshd.sessions()) - before:  # this job's connection, not another test's
                os.kill(pid, signal.SIGKILL)

        job = Job("r4", ("sh", "-c", f"pwd; sleep 300; : {marker}"), timeout_s=60)
        out = await launcher.run(SLOT, job, on_line)
        again = await launcher.run(SLOT, Job("r4b", ("true",), timeout_s=10))  # reconnects
        await launcher.aclose()
        return out, again

    out, again = anyio.run(main)
    assert again.exit_code == 0 and again.infra_error == ""
    assert not os.path.exists(out.output.decode().strip()), "the orphaned workdir is removed on reconnect"
    assert out.infra_error and "connection lost" in out.infra_error, out
    assert out.exit_code is None
    assert _gone(marker), _survivors(marker)


def test_a_waves_launcher_removes_the_working_folders_its_killed_controller_left(sshd, tmp_path):
    """Over ssh to this machine, the remote /tmp is ours: plant what a killed controller of wave
    k1 left (a working folder) and what wave k2 has (one in use), then run a job of wave k1."""
    left = Path(tempfile.mkdtemp(prefix=host_prefix("k1", sshd.host), dir="/tmp"))
    other = Path(tempfile.mkdtemp(prefix=host_prefix("k2", sshd.host), dir="/tmp"))
    try:
        out = anyio.run(_run, SshLauncher(sshd.host, wave="k1"), Job("r8", ("pwd",), timeout_s=30))
        assert out.exit_code == 0 and Path(out.output.decode().strip()).name.startswith("rfs-k1-")
        assert not left.exists() and other.exists()
    finally:
        shutil.rmtree(left, ignore_errors=True)
        shutil.rmtree(other, ignore_errors=True)


def test_a_hosts_cleanup_spares_the_running_jobs_of_another_host_name_on_the_same_machine(sshd, tmp_path):
    """Two host names for one machine (one /tmp): the second host's first connection removes what
    a killed controller left for it, not the first host's job that is running now."""
    other_name = replace(sshd.host, address="127.0.0.2")

    async def both() -> tuple[JobOutcome, JobOutcome]:
        first, second = SshLauncher(sshd.host, wave="k3"), SshLauncher(other_name, wave="k3")
        slow = Job("r9", ("/bin/sh", "-c", "sleep 2; cat mine"), files={"mine": b"still here"}, timeout_s=30)
        async with anyio.create_task_group() as tg:
            got = {}

            async def run(name, launcher, job):
                got[name] = await launcher.run(SLOT, job)

            tg.start_soon(run, "slow", first, slow)
            await anyio.sleep(1.0)  # the first host's job is running when the second host connects
            tg.start_soon(run, "quick", second, Job("r10", ("true",), timeout_s=30))
        await first.aclose()
        await second.aclose()
        return got["slow"], got["quick"]

    slow, quick = anyio.run(both)
    assert quick.exit_code == 0
    assert slow.exit_code == 0 and slow.output.decode().strip() == "still here", slow.output


def test_refused_connection_is_infra_error(sshd):
    closed = replace(sshd.host, port=free_port())
    out = anyio.run(_run, SshLauncher(closed), Job("r5", ("true",), timeout_s=10))
    assert out.infra_error and out.exit_code is None and not out.timed_out
    assert "refused" in out.infra_error.lower() or "connect" in out.infra_error.lower(), out.infra_error


def test_missing_program_is_infra_error(sshd):
    out = anyio.run(_run, SshLauncher(sshd.host), Job("r6", ("/nonexistent/python", "train.py"), timeout_s=10))
    assert out.infra_error.endswith("cannot start /nonexistent/python: no such program") and out.exit_code is None


def test_file_name_outside_the_workdir_is_refused(sshd):
    with pytest.raises(ValueError, match="leaves the working directory"):
        anyio.run(_run, SshLauncher(sshd.host), Job("r7", ("true",), {"../evil": b"x"}, timeout_s=10))
