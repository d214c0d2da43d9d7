"""The local launcher, with real subprocesses: output, timeouts, process-tree cleanup, cancellation."""

from __future__ import annotations

import os
import socket
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from rfs.hosts import Slot
from rfs.launch.base import WORKDIR, Job
from rfs.launch.local import LocalLauncher

SLOT = Slot("local-test", "local", "localhost", tuple(sorted(os.sched_getaffinity(0)))[:1], -1, sys.executable, ".")

# Forks a child that stays in the group and a daemon that leaves it with setsid; all of them record
# their pid in the working directory's pids file and then sleep forever.
FORKER = textwrap.dedent(
    """
    import os, sys, time
    def record():
        with open(os.environ["PIDS_FILE"], "a") as f:
            f.write(f"{os.getpid()}\\n")
    record()
    if os.fork() == 0:
        record(); time.sleep(1000)
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            record(); time.sleep(1000)
        os._exit(0)
    while len(open(os.environ["PIDS_FILE"]).read().split()) < 3:
        time.sleep(0.01)  # say "forked" only once all three processes are up
    print("forked", flush=True)
    time.sleep(1000)
    """
)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _pids(path: Path, n: int) -> list[int]:
    pids = [int(x) for x in path.read_text().split()]
    assert len(pids) == n, pids
    return pids


def test_runs_streams_output_and_cleans_workdir(tmp_path):
    script = "import os, sys; print('hello'); print(open('data.txt').read()); print(os.getcwd()); sys.exit(3)"
    job = Job("r1", (sys.executable, f"{WORKDIR}/main.py"), {"main.py": script.encode(), "data.txt": b"payload"}, 30)
    lines: list[str] = []
    out = anyio.run(LocalLauncher().run, SLOT, job, lines.append)
    assert out.exit_code == 3 and not out.timed_out and out.infra_error == ""
    assert lines[:2] == ["hello", "payload"]
    workdir = Path(lines[2])
    assert workdir.name.startswith("rfs-r1-") and not workdir.exists()
    assert b"hello\npayload\n" in out.output


@pytest.mark.parametrize("memfd", [True, False])
def test_unstreamed_output_is_kept_whole_stdout_and_stderr_in_order(monkeypatch, memfd):
    """Without on_line the output goes to a file in memory (an unlinked temporary file where
    memfd_create is missing), read once the job is over: far more than a pipe holds, nothing lost."""
    if not memfd:
        monkeypatch.delattr(os, "memfd_create")
    script = "import sys\nfor i in range(3000):\n    print(f'line {i:05d} ' + 'x' * 300, flush=True)\nprint('to stderr', file=sys.stderr)\n"
    job = Job("r1", (sys.executable, f"{WORKDIR}/main.py"), {"main.py": script.encode()}, 30)
    out = anyio.run(LocalLauncher().run, SLOT, job)
    lines = out.output.decode().splitlines()
    assert out.exit_code == 0 and len(out.output) > 900_000
    assert lines[:-1] == [f"line {i:05d} " + "x" * 300 for i in range(3000)] and lines[-1] == "to stderr"


def test_without_pidfds_the_exit_is_polled_and_a_timeout_still_kills(monkeypatch):
    """Where pidfd_open is missing or refused (not Linux, an old kernel, a seccomp filter), the
    launcher polls for the exit instead: same output, exit code and timeout."""
    def refused(pid: int) -> int:
        raise OSError("pidfd_open refused")

    monkeypatch.setattr(os, "pidfd_open", refused)
    done = Job("r1", (sys.executable, "-c", "print('out'); raise SystemExit(4)"), {}, 30)
    out = anyio.run(LocalLauncher().run, SLOT, done)
    assert (out.exit_code, out.output, out.timed_out) == (4, b"out\n", False)
    hangs = Job("r2", (sys.executable, "-c", "import time; time.sleep(60)"), {}, 0.5)
    out = anyio.run(LocalLauncher().run, SLOT, hangs)
    assert out.timed_out and out.exit_code is None and out.wall_seconds < 30


def test_job_env_threads_and_affinity():
    script = "import os; print(os.environ['OMP_NUM_THREADS'], os.environ['EXTRA'], sorted(os.sched_getaffinity(0)))"
    job = Job("r2", (sys.executable, "-c", script), {}, 30, {"EXTRA": "x"})
    out = anyio.run(LocalLauncher().run, SLOT, job)
    assert out.output.decode().strip().split(maxsplit=2) == ["1", "x", str(list(SLOT.cpus))]


@pytest.mark.parametrize("native", [True, False])
def test_job_runs_under_rlimits(monkeypatch, native):
    """No core dumps, a finite CPU time and address space: by prlimit/taskset or the Python fallback."""
    from rfs.launch import local

    monkeypatch.setattr(local, "NATIVE", native and local.NATIVE)
    script = "import resource as r; print(*(r.getrlimit(x)[1] for x in (r.RLIMIT_CORE, r.RLIMIT_CPU, r.RLIMIT_AS)))"
    out = anyio.run(LocalLauncher().run, SLOT, Job("r9", (sys.executable, "-c", script), {}, 30))
    core, cpu, addr = map(int, out.output.split())
    assert core == 0 and 0 < cpu < 10_000 and 0 < addr <= local.RLIMIT_AS_BYTES


def test_timeout_kills_forking_job_and_all_descendants(tmp_path):
    pids_file = tmp_path / "pids"
    job = Job("r3", (sys.executable, "-c", FORKER), {}, 3.0, {"PIDS_FILE": str(pids_file)})
    out = anyio.run(LocalLauncher().run, SLOT, job)
    assert out.timed_out and out.exit_code is None and out.infra_error == ""
    assert b"forked" in out.output
    pids = _pids(pids_file, 3)
    assert [p for p in pids if _alive(p)] == []


def test_cancellation_kills_the_job(tmp_path):
    pids_file = tmp_path / "pids"
    job = Job("r4", (sys.executable, "-c", FORKER), {}, 300.0, {"PIDS_FILE": str(pids_file)})
    seen = []

    async def main():
        async with anyio.create_task_group() as tg:

            def on_line(line: str) -> None:
                seen.append(line)
                tg.cancel_scope.cancel()  # cancel as soon as the job is up and has forked

            tg.start_soon(LocalLauncher().run, SLOT, job, on_line)

    anyio.run(main)
    assert seen == ["forked"]
    assert [p for p in _pids(pids_file, 3) if _alive(p)] == []


def test_start_failure_is_infra_error():
    job = Job("r5", ("/nonexistent/python-for-rfs", "x.py"), {}, 10)
    out = anyio.run(LocalLauncher().run, SLOT, job)
    assert out.exit_code is None and "no such program" in out.infra_error


def test_bad_working_file_name_is_reported_not_swallowed():
    job = Job("r6", (sys.executable, "-c", "pass"), {"../../escape/x": b""}, 10)
    with pytest.raises(ValueError):
        anyio.run(LocalLauncher().run, SLOT, job)


def test_sweeps_shared_by_jobs_ending_together_answer_each_with_its_own_processes(monkeypatch):
    """Jobs that end together share /proc passes; every job still gets exactly its own tagged
    processes, whenever it asks relative to a pass in progress (staggered asks hit that race)."""
    import random
    import subprocess
    import uuid

    from rfs.batches import Batches
    from rfs.launch import local

    tags = [uuid.uuid4().hex.encode() for _ in range(120)]
    carriers = {tags[i]: subprocess.Popen(["sleep", "60"], env={**os.environ, "RFS_JOB_TAG": tags[i].decode()}) for i in (3, 77)}
    passes, sweep = [], local._tagged
    monkeypatch.setattr(local, "_tagged", lambda asked: passes.append(len(asked)) or sweep(asked))
    rng = random.Random(5)
    delays = [0.0] * 60 + [rng.random() * 0.05 for _ in range(60)]  # a burst, then staggered asks

    async def main() -> dict[bytes, list[int]]:
        sweeps, answers = Batches(local._sweep), {}

        async def ask(tag: bytes, delay: float) -> None:
            await anyio.sleep(delay)
            answers[tag] = await sweeps(b"RFS_JOB_TAG=" + tag)

        async with anyio.create_task_group() as tg:
            for tag, delay in zip(tags, delays):
                tg.start_soon(ask, tag, delay)
        return answers

    try:
        answers = anyio.run(main)
    finally:
        for p in carriers.values():
            p.kill()
            p.wait()
    assert answers == {tag: [carriers[tag].pid] if tag in carriers else [] for tag in tags}
    assert sum(passes) == len(tags) and len(passes) < len(tags) / 2  # shared: far fewer passes than jobs


REACH = "import os, socket, sys\nprint(os.readlink('/proc/self/ns/net'))\ntry:\n    socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=2)\nexcept OSError as e:\n    sys.exit(f'no network: {e}')\nprint('reached')\n"


def _reach(port: int, launcher: LocalLauncher):
    job = Job("net", (sys.executable, f"{WORKDIR}/reach.py", str(port)), {"reach.py": REACH.encode()}, 30)

    async def go():
        out = await launcher.run(SLOT, job)
        # the worker threads that started the job are back in this process's namespace
        threads = {await anyio.to_thread.run_sync(os.readlink, "/proc/thread-self/ns/net") for _ in range(8)}
        return out, threads

    return anyio.run(go)


@pytest.mark.parametrize("how", ["namespace", "prefix"])
def test_a_job_cannot_reach_even_this_machines_loopback(monkeypatch, how):
    """Where the platform allows it (here: root, and user namespaces for the unprivileged way)."""
    from rfs.launch import local
    from rfs.launch.netns import UNPRIVILEGED, Isolation, isolation

    if how == "prefix":
        monkeypatch.setattr(local, "isolation", lambda: Isolation(prefix=UNPRIVILEGED))
    elif isolation().namespace is None:
        pytest.fail(f"this machine allows no network namespace for rfs to make: isolation is {isolation()}")
    with socket.create_server(("127.0.0.1", 0)) as server:
        out, threads = _reach(server.getsockname()[1], LocalLauncher())
        reached, _ = _reach(server.getsockname()[1], LocalLauncher(isolate_network=False))
    text, own = out.output.decode(), os.readlink("/proc/self/ns/net")
    assert out.exit_code == 1 and "no network" in text and own not in text, text
    assert reached.exit_code == 0 and "reached" in reached.output.decode() and own in reached.output.decode()
    assert threads == {own}
