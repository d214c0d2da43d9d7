"""The SLURM launcher against a real single-node SLURM (slurmctld + slurmd + munge)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import replace

import anyio
import pytest

from rfs.hosts import Slot
from rfs.launch.base import Job
from rfs.launch.slurm import Allocation, SlurmError, SlurmLauncher
from tests.infra import slurm  # noqa: F401  (fixture)

SLOT = Slot("slurm-0", "slurm", "cluster", (0,), -1, sys.executable, "")


def _squeue(env: dict[str, str], *what: str) -> list[str]:
    out = subprocess.run(["squeue", *what, "-h", "-o", "%i"], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=10).stdout
    return out.split()


def _squeue_steps(env: dict[str, str]) -> list[str]:
    return _squeue(env, "--steps")


def _survivors(marker: str) -> str:
    return subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True).stdout.strip()


def _eventually(check, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within  # SLURM and the kernel finish a kill asynchronously
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)
    return check()


@pytest.fixture
def launcher(slurm, tmp_path):
    return SlurmLauncher(slurm.cfg, env=slurm.env, workroot=str(tmp_path / "work"))


# Each step waits until all three have started: they pass only if they run at the same time.
CONCURRENT = b"""import os, sys, time
d, i = sys.argv[1], os.environ["CODE"]
open(os.path.join(d, "up" + i), "w").close()
t = time.monotonic()
while len([f for f in os.listdir(d) if f.startswith("up")]) < 3:
    if time.monotonic() - t > 20:
        sys.exit("the steps did not run at the same time")
    time.sleep(0.05)
print("data", open("in.txt").read())
open("out.txt", "w").write("done")
sys.exit(int(i))
"""


def test_steps_run_concurrently_in_one_allocation(launcher, tmp_path):
    async def main():
        alloc = await launcher.open(3)
        results: dict[int, object] = {}
        lines: list[str] = []

        async def one(i: int) -> None:
            job = Job(f"r{i}", (sys.executable, "{workdir}/job.py", str(tmp_path)),
                      {"job.py": CONCURRENT, "in.txt": f"n{i}".encode()}, 60, {"CODE": str(i)})
            results[i] = await launcher.run(SLOT, job, lines.append)

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(one, i)
        await launcher.close()
        return alloc, results, lines

    alloc, results, lines = anyio.run(main)
    steps = set()
    for i, out in results.items():
        assert out.infra_error == "" and not out.timed_out, out
        assert out.exit_code == i and out.output.startswith(f"data n{i}\n".encode()), out
        assert out.files == {"out.txt": b"done"}
        job, step = out.job_id.split(".")
        assert job == alloc
        steps.add(step)
    assert len(steps) == 3
    assert sorted(lines) == ["data n0", "data n1", "data n2"]
    assert list((tmp_path / "work").iterdir()) == [], "working directories are removed"


def test_timeout_scancels_the_step(launcher, slurm):
    marker = f"rfs-slurm-timeout-{uuid.uuid4().hex}"

    async def main():
        await launcher.open(1)
        try:
            return await launcher.run(SLOT, Job("t", ("sh", "-c", f"echo up; sleep 300; : {marker}"), timeout_s=1.5))
        finally:
            await launcher.close()

    out = anyio.run(main)
    assert out.timed_out and out.exit_code is None and out.infra_error == ""
    assert out.output == b"up\n" and "." in out.job_id
    assert _eventually(lambda: not _survivors(marker)), _survivors(marker)
    assert _eventually(lambda: out.job_id not in _squeue_steps(slurm.env))


def test_step_cancelled_from_outside_is_infra_error(launcher, slurm):
    async def main():
        await launcher.open(1)
        seen: list[str] = []

        def on_line(line: str) -> None:
            seen.append(line)

        async with anyio.create_task_group() as tg:
            result = []

            async def go():
                result.append(await launcher.run(SLOT, Job("c", ("sh", "-c", "echo up; sleep 300"), timeout_s=60), on_line))

            tg.start_soon(go)
            while not seen:
                await anyio.sleep(0.05)
            step = [s for s in _squeue_steps(slurm.env) if s.startswith(launcher.allocation + ".")]
            subprocess.run(["scancel", *step], env={**os.environ, **slurm.env}, check=True, timeout=10)
        await launcher.close()
        return step, result[0]

    step, out = anyio.run(main)
    assert out.infra_error and "CANCELLED" in out.infra_error, out
    assert out.exit_code is None and not out.timed_out
    assert [out.job_id] == step


def test_crash_is_the_jobs_exit_code_not_infra(launcher):
    async def main():
        await launcher.open(1)
        try:
            late = await launcher.run(SLOT, Job("x", ("sh", "-c", "echo boom >&2; sleep 0.3; kill -9 $$"), timeout_s=30))
            # dying at once: SLURM may drop the output, but the task ran, so it is still the job's crash
            early = await launcher.run(SLOT, Job("y", ("sh", "-c", "kill -9 $$"), timeout_s=30))
            return late, early
        finally:
            await launcher.close()

    late, early = anyio.run(main)
    assert late.infra_error == "" and late.exit_code == 137 and late.output.startswith(b"boom\n"), late
    assert early.infra_error == "" and early.exit_code == 137 and "." in early.job_id, early


def test_a_job_without_an_allocation_is_its_own_slurm_job(launcher):
    out = anyio.run(launcher.run, SLOT, Job("solo", ("echo", "alone"), timeout_s=30))
    assert out.infra_error == "" and out.exit_code == 0 and out.output.startswith(b"alone\n")
    assert out.job_id.endswith(".0")


def test_step_that_cannot_start_is_infra_error(launcher, slurm):
    async def main():
        await launcher.open(1)
        big = Slot("slurm-big", "slurm", "cluster", tuple(range(slurm.cpus + 1)), -1, sys.executable, "")
        try:
            return await launcher.run(big, Job("big", ("true",), timeout_s=30))
        finally:
            await launcher.close()

    out = anyio.run(main)
    assert out.infra_error.startswith("srun: the step never started") and out.exit_code is None, out


def test_impossible_allocation_raises_with_slurms_reason(launcher, slurm):
    with pytest.raises(SlurmError, match="salloc failed") as failed:
        anyio.run(launcher.open, 1, slurm.cpus + 1, 0, 1.0)
    assert launcher.allocation == "" and "salloc: error:" in str(failed.value), failed.value
    assert _squeue(slurm.env) == [], "the request is withdrawn, not left in the queue"


def test_reclaim_cancels_the_allocation_a_killed_controller_of_the_wave_left(slurm, tmp_path):
    def launcher(wave: str) -> SlurmLauncher:
        return SlurmLauncher(slurm.cfg, env=slurm.env, workroot=str(tmp_path / "work"), wave=wave)

    async def main():
        left = await launcher("k1").open(1)  # never closed: its controller was killed
        other = launcher("k2")  # another wave's, running: not to be touched
        kept = await other.open(1)
        (tmp_path / "work" / "rfs-k1-abc").mkdir(parents=True)  # a working folder of the dead one
        (tmp_path / "work" / "rfs-k2-abc").mkdir()
        try:
            assert await launcher("k1").reclaim() == [left]
            assert _eventually(lambda: left not in _squeue(slurm.env)), "the dead controller's allocation was not cancelled"
            assert kept in _squeue(slurm.env)
            assert [p.name for p in (tmp_path / "work").iterdir()] == ["rfs-k2-abc"]
            assert await launcher("k1").reclaim() == []
        finally:
            await other.close()

    anyio.run(main)


def test_missing_program_is_infra_error(launcher):
    out = anyio.run(launcher.run, SLOT, Job("m", ("/nonexistent/python", "train.py"), timeout_s=30))
    assert out.infra_error == "cannot start /nonexistent/python: no such program" and out.exit_code is None, out


def test_cancel_scancels_the_step(launcher, slurm):
    marker = f"rfs-slurm-cancel-{uuid.uuid4().hex}"

    async def main():
        await launcher.open(1)
        with anyio.move_on_after(20):
            async with anyio.create_task_group() as tg:
                started = anyio.Event()
                job = Job("k", ("sh", "-c", f"echo up; sleep 300; : {marker}"), timeout_s=60)
                tg.start_soon(launcher.run, SLOT, job, lambda line: started.set())
                await started.wait()
                assert _survivors(marker)
                tg.cancel_scope.cancel()
        gone = _eventually(lambda: not _squeue_steps(slurm.env))  # slurmctld may list it while it completes
        await launcher.close()
        return gone

    assert anyio.run(main), "the step was not cancelled"
    assert _eventually(lambda: not _survivors(marker)), _survivors(marker)


def test_file_name_outside_the_workdir_is_refused(launcher, tmp_path):
    with pytest.raises(ValueError, match="leaves the working directory"):
        anyio.run(launcher.run, SLOT, Job("e", ("true",), {"../evil": b"x"}, timeout_s=10))
    assert not (tmp_path / "work" / "evil").exists() and list((tmp_path / "work").iterdir()) == []


def test_allocation_ended_under_a_running_step_is_infra_error(launcher, slurm):
    async def main():
        await launcher.open(1)
        result = []
        async with anyio.create_task_group() as tg:
            started = anyio.Event()

            async def go():
                result.append(await launcher.run(SLOT, Job("a", ("sh", "-c", "echo up; sleep 300"), timeout_s=60), lambda _: started.set()))

            tg.start_soon(go)
            await started.wait()
            subprocess.run(["scancel", launcher.allocation], env={**os.environ, **slurm.env}, check=True, timeout=10)
        await launcher.close()  # an allocation that is already gone closes quietly
        return result[0]

    out = anyio.run(main)
    assert out.infra_error.startswith("SLURM ended step") and out.exit_code is None, out


# ------------------------------------------------ the one allocation model (issue 19)


def test_concurrent_waves_share_one_allocation_and_the_last_out_cancels_it(slurm, tmp_path):
    """Two waves each asking for every CPU of the cluster: two allocations would deadlock (the second
    waits in the queue for the first); one shared allocation cannot."""
    shared = Allocation("rfs-pool-test-share")

    def launcher(wave: str) -> SlurmLauncher:
        return SlurmLauncher(slurm.cfg, env=slurm.env, workroot=str(tmp_path / "work"), wave=wave, allocation=shared)

    async def main():
        a, b = launcher("w1"), launcher("w2")
        whole = len(slurm.nodes)  # tasks of a node's every CPU: the whole cluster
        first = await a.open(whole, slurm.cpus, 0, 2.0)
        second = await b.open(whole, slurm.cpus, 0, 2.0)  # a second whole-cluster request would fail after 2 s
        await a.close()
        still = _squeue(slurm.env)
        out = await b.run(SLOT, Job("s", ("echo", "in the shared allocation"), timeout_s=30))
        await b.close()
        return first, second, still, out

    first, second, still, out = anyio.run(main)
    assert first == second and still == [first], (first, second, still)
    assert out.exit_code == 0 and out.job_id.startswith(first + "."), out
    assert _eventually(lambda: first not in _squeue(slurm.env))


def test_a_lost_allocation_is_reacquired_and_the_lost_step_is_infra_error(slurm, tmp_path):
    launcher = SlurmLauncher(slurm.cfg, env=slurm.env, workroot=str(tmp_path / "work"))

    async def main():
        old = await launcher.open(2)
        result = []
        async with anyio.create_task_group() as tg:
            started = anyio.Event()

            async def go():
                job = Job("p", ("sh", "-c", "echo up; sleep 300"), timeout_s=60)
                result.append(await launcher.run(SLOT, job, lambda _: started.set()))

            tg.start_soon(go)
            await started.wait()
            subprocess.run(["scancel", old], env={**os.environ, **slurm.env}, check=True, timeout=10)  # preempted
        after = await launcher.run(SLOT, Job("q", ("echo", "again"), timeout_s=30))
        new = launcher.allocation
        await launcher.close()
        return old, new, result[0], after

    old, new, lost, after = anyio.run(main)
    assert lost.infra_error.startswith("SLURM ended step") and lost.exit_code is None, lost
    assert new and new != old and launcher.shared.lost == [old]
    assert after.exit_code == 0 and after.job_id.startswith(new + "."), after
    assert _eventually(lambda: new not in _squeue(slurm.env))


def test_a_step_still_queued_at_its_timeout_is_infra_error(slurm, tmp_path):
    launcher = SlurmLauncher(slurm.cfg, env=slurm.env, workroot=str(tmp_path / "work"))

    async def main():
        await launcher.open(1)  # one CPU: a second step waits for the first
        try:
            async with anyio.create_task_group() as tg:
                started = anyio.Event()
                tg.start_soon(lambda: launcher.run(SLOT, Job("hold", ("sh", "-c", "echo up; sleep 300"), timeout_s=30),
                                                   lambda _: started.set()))
                await started.wait()
                queued = await launcher.run(SLOT, Job("late", ("echo", "never"), timeout_s=3))
                tg.cancel_scope.cancel()
            return queued
        finally:
            await launcher.close()

    out = anyio.run(main)
    assert out.infra_error.startswith("the step was still queued") and not out.timed_out, out


def test_steps_never_join_the_controllers_own_slurm_job(slurm, tmp_path):
    """A controller started by sbatch has SLURM_JOB_ID etc.; srun must not take them for its own."""
    env = {**slurm.env, "SLURM_JOB_ID": "999999", "SLURM_JOBID": "999999", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "64"}
    launcher = SlurmLauncher(slurm.cfg, env=env, workroot=str(tmp_path / "work"))
    out = anyio.run(launcher.run, SLOT, Job("j", ("sh", "-c", "echo job=$SLURM_JOB_ID"), timeout_s=30))
    assert out.infra_error == "" and out.exit_code == 0, out
    assert b"job=999999" not in out.output and out.output.startswith(b"job=" + out.job_id.split(".")[0].encode())
    assert launcher.env["SLURM_CONF"] == slurm.env["SLURM_CONF"]


def test_steps_are_sized_from_hosts_toml(slurm):
    cfg = replace(slurm.cfg, cpus_per_slot=4, mem_per_cpu="8G")
    argv = SlurmLauncher(cfg, env=slurm.env)._srun(SLOT, Job("z", ("true",), timeout_s=30), "/w")
    assert "--cpus-per-task=4" in argv and "--mem-per-cpu=8G" in argv


# ------------------------------------------------ GPUs across the nodes (issue 19)

# Each step records the node and GPUs SLURM gave it, then waits until every step of the batch has
# started: it passes only if they all run at the same time, so the pairs it records are concurrent.
GPU_STEP = b"""import os, sys, time
d, n = sys.argv[1], int(sys.argv[2])
me = os.environ["SLURMD_NODENAME"], os.environ.get("CUDA_VISIBLE_DEVICES", "unset"), os.environ.get("SLURM_STEP_GPUS", "")
open(os.path.join(d, "up-" + os.environ["SLURM_STEP_ID"]), "w").write(" ".join(me))
t = time.monotonic()
while len([f for f in os.listdir(d) if f.startswith("up-")]) < n:
    if time.monotonic() - t > 30:
        sys.exit("the steps did not run at the same time")
    time.sleep(0.05)
"""


def test_concurrent_gpu_steps_get_distinct_node_gpu_pairs_from_slurm_on_both_nodes(slurm, tmp_path):
    """The pool allocation holds one GPU per slot across both nodes; its steps, all at once, each get
    their own (node, GPU), named by SLURM in CUDA_VISIBLE_DEVICES (not the one the job asked for),
    and each outcome names the node it ran on."""
    n = len(slurm.nodes) * slurm.gpus  # every GPU of the cluster busy at once
    gpu_slot = replace(SLOT, gpu=0)
    launcher = SlurmLauncher(slurm.cfg, env=slurm.env, workroot=str(tmp_path / "work"))
    seen = tmp_path / "seen"
    seen.mkdir()

    async def main():
        await launcher.open(n, 1, 1, 30.0)
        results = {}

        async def one(i: int) -> None:
            job = Job(f"g{i}", (sys.executable, "{workdir}/job.py", str(seen), str(n)), {"job.py": GPU_STEP}, 60,
                      {"CUDA_VISIBLE_DEVICES": "7"})  # what a job's env may carry: SLURM's choice must win
            results[i] = await launcher.run(gpu_slot, job)

        try:
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(one, i)
        finally:
            await launcher.close()
        return results

    results = anyio.run(main)
    assert all(o.exit_code == 0 and not o.infra_error for o in results.values()), results
    got = [tuple(p.read_text().split(" ")) for p in seen.iterdir()]
    pairs = [(node, cvd) for node, cvd, _ in got]
    assert len(got) == n and len(set(pairs)) == n, got  # no two concurrent steps on one (node, GPU)
    assert {node for node, _ in pairs} == set(slurm.nodes), got  # both nodes ran steps
    assert all(cvd == gpus and cvd in {str(g) for g in range(slurm.gpus)} for _, cvd, gpus in got), got
    assert sorted(o.host for o in results.values()) == sorted(node for node, _ in pairs)  # the node SLURM chose


def test_a_gpu_job_without_an_allocation_gets_its_gpu_from_slurm(launcher, slurm):
    """Its own one-step job inherits no allocation's GPUs: the step itself must ask for one."""
    script = "echo $SLURMD_NODENAME cvd=${CUDA_VISIBLE_DEVICES-unset} gpus=$SLURM_STEP_GPUS"
    out = anyio.run(launcher.run, replace(SLOT, gpu=0), Job("solo-gpu", ("sh", "-c", script), timeout_s=30, env={"CUDA_VISIBLE_DEVICES": "7"}))
    node, cvd, gpus = out.output.decode().split()
    assert out.exit_code == 0 and node == out.host and node in slurm.nodes, out
    assert cvd in {f"cvd={g}" for g in range(slurm.gpus)} and gpus == "gpus=" + cvd.removeprefix("cvd="), out
