"""run_wave over remote slots: one SLURM allocation for the whole wave (each run a step in it) and one
pooled ssh launcher per host, all released when the wave ends, also when it is cancelled or fails.
Real two-node SLURM with fake GPUs, real sshd on loopback, the scripted researcher over real HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import anyio
import pyarrow.parquet as pq
import pytest

from rfs.agent.client import ResearcherClient
from rfs.collect.slots import SlotPool
from rfs.collect.wave import run_wave
from rfs.events import EventLog, iter_events
from rfs.hosts import HostsFile, Slot
from rfs.launch.slurm import SlurmError
from rfs.rundir import RunDir
from tests.infra import slurm, sshd  # noqa: F401  (fixtures)
from tests.scripted_researcher import ScriptedResearcher
from tests.wave_child import SleepEnv, plans, specs, wave_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _squeue(slurm) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], env={**os.environ, **slurm.env}, capture_output=True, text=True, timeout=10)
    return out.stdout.split()


def _eventually(check, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within  # slurmctld lists a cancelled job while it completes
    while not check() and time.monotonic() < deadline:
        time.sleep(0.1)
    return check()


def _slurm_slots(k: int, cpus: int = 1, gpu: int = -1) -> list[Slot]:
    return [Slot(f"slurm-{i}", "slurm", "cluster", tuple(range(cpus)), gpu, sys.executable, "") for i in range(k)]


class GpuSleepEnv(SleepEnv):
    """SleepEnv whose job first and last writes down where SLURM ran it: step, node, CUDA_VISIBLE_DEVICES,
    SLURM's own GPU list, and the time (node `none` off SLURM). Its env names a GPU of its own, as a
    real job's may (rfs.envs.autoresearch sets one)."""

    def __init__(self, counter: Path, seconds: float, record: Path):
        super().__init__(counter, seconds)
        self.record = record

    def job(self, train_py: str, slot: Slot, rollout_id: str):
        job = super().job(train_py, slot, rollout_id)
        note = (f'echo "$SLURM_JOB_ID.$SLURM_STEP_ID ${{SLURMD_NODENAME:-none}} ${{CUDA_VISIBLE_DEVICES-unset}} '
                f'${{SLURM_STEP_GPUS-unset}} $(date +%s.%N)" >> {self.record}\n')
        return replace(job, argv=(*job.argv[:2], note + job.argv[2] + note), env={"CUDA_VISIBLE_DEVICES": "7"})


async def _wave(run: RunDir, base_url: str, env: SleepEnv, n: int, slots: list[Slot], hosts: HostsFile):
    cfg = wave_config(budget_s=env.seconds)
    events = EventLog(run.events)
    pool = SlotPool(slots, cfg.collect, events)
    async with ResearcherClient(base_url, "scripted", cfg.researcher) as client:
        try:
            return await run_wave(run, specs(n), cfg=cfg, env=env, pool=pool, hosts=hosts, client=client, events=events)
        finally:
            events.close()


@pytest.fixture
def slurm_hosts(slurm, tmp_path, monkeypatch) -> HostsFile:
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])  # the launcher's SLURM clients read it
    # the steps' working directories go under root, here on this machine's (the node's) filesystem
    return HostsFile(slurm=replace(slurm.cfg, root=str(tmp_path / "cluster")))


def test_a_wave_runs_every_job_as_a_step_of_one_allocation_then_releases_it(slurm, slurm_hosts, tmp_path):
    n, k = 5, 3
    run = RunDir(tmp_path / "run")
    with ScriptedResearcher(plans(n)) as sr:
        out = anyio.run(_wave, run, sr.base_url, SleepEnv(tmp_path / "launches", 0.05), n, _slurm_slots(k), slurm_hosts)
    rows = pq.read_table(out).to_pylist()
    assert [r["status"] for r in rows] == ["success"] * n, [r["detail"] for r in rows]
    assert [r["val_bpb"] for r in rows] == pytest.approx([1 + (i + 1) / 100 for i in range(n)])
    jobs = {r["job_id"].split(".")[0] for r in rows}
    steps = {r["job_id"] for r in rows}
    assert len(jobs) == 1 and len(steps) == n, [r["job_id"] for r in rows]  # n steps of one allocation
    assert {r["slot"] for r in rows} <= {s.name for s in _slurm_slots(k)}
    assert _eventually(lambda: jobs.isdisjoint(_squeue(slurm))), _squeue(slurm)
    assert list((tmp_path / "cluster" / "runs" / ".slurm-work").iterdir()) == []


def test_a_cancelled_wave_releases_its_allocation(slurm, slurm_hosts, tmp_path):
    n = 2
    counter = tmp_path / "launches"

    async def main():
        with ScriptedResearcher(plans(n)) as sr, anyio.move_on_after(60) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_wave, RunDir(tmp_path / "run"), sr.base_url, SleepEnv(counter, 300), n, _slurm_slots(n), slurm_hosts)
                while not (counter.exists() and len(counter.read_text().split()) == n):
                    await anyio.sleep(0.05)  # both jobs are running as steps
                running = _squeue(slurm)
                tg.cancel_scope.cancel()
        return running, scope.cancelled_caught

    running, stuck = anyio.run(main)
    assert not stuck and len(running) == 1, running  # one allocation, cancelled by the test, not by the deadline
    assert _eventually(lambda: _squeue(slurm) == []), _squeue(slurm)
    assert not RunDir(tmp_path / "run").traces("A-S", 1).exists()


def test_an_allocation_slurm_refuses_fails_the_wave_before_any_rollout(slurm, slurm_hosts, tmp_path):
    run = RunDir(tmp_path / "run")
    too_big = _slurm_slots(1, cpus=slurm.cpus + 1)  # more than the node has: it would queue forever
    slurm_hosts = replace(slurm_hosts, slurm=replace(slurm_hosts.slurm, queue_wait_s=1.0))
    with ScriptedResearcher(plans(1)) as sr, pytest.raises(SlurmError, match="salloc failed"):
        anyio.run(_wave, run, sr.base_url, SleepEnv(tmp_path / "launches", 0.01), 1, too_big, slurm_hosts)
    assert not (tmp_path / "launches").exists() and _squeue(slurm) == []
    assert [e["kind"] for e in iter_events(run.events) if e["kind"].startswith("rollout")] == []


def test_ssh_slots_of_one_host_share_a_launcher_closed_at_wave_end(sshd, tmp_path):
    n, k = 4, 2
    hosts = HostsFile(hosts={"box": sshd.host})
    slots = [Slot(f"ssh-{i}", "ssh", "box", (), -1, sshd.host.python, sshd.host.root) for i in range(k)]
    with ScriptedResearcher(plans(n)) as sr:
        out = anyio.run(_wave, RunDir(tmp_path / "run"), sr.base_url, SleepEnv(tmp_path / "launches", 0.05), n, slots, hosts)
    rows = pq.read_table(out).to_pylist()
    assert [r["status"] for r in rows] == ["success"] * n, [r["detail"] for r in rows]
    assert _eventually(lambda: sshd.sessions() == []), sshd.sessions()  # every connection closed
    assert sorted(Path(tmp_path / "launches").read_text().split()) == [r["rollout_id"] for r in rows]


def test_a_connection_dropped_mid_run_is_infra_error_and_the_run_is_retried_on_another_slot(sshd, tmp_path):
    """The ssh slot's connection is killed while its run sleeps: that attempt is infra_error (never
    the researcher's), the run goes again on the other slot, and the row says both."""
    import threading

    run = RunDir(tmp_path / "run")
    hosts = HostsFile(hosts={"box": sshd.host})
    slots = [Slot("ssh-0", "ssh", "box", (), -1, sshd.host.python, sshd.host.root),
             Slot("local-0", "local", "localhost", (), -1, sys.executable, ".")]
    before, dropped = set(sshd.sessions()), []

    def drop_when_the_ssh_run_starts() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            launched = (tmp_path / "launches").exists()  # the job counts its launch, then sleeps
            if launched and (new := set(sshd.sessions()) - before):
                for pid in new:
                    os.kill(pid, 9)
                dropped.extend(new)
                return
            time.sleep(0.02)

    dropper = threading.Thread(target=drop_when_the_ssh_run_starts, daemon=True)
    dropper.start()
    with ScriptedResearcher(plans(1)) as sr:
        out = anyio.run(_wave, run, sr.base_url, SleepEnv(tmp_path / "launches", 3.0), 1, slots, hosts)
    dropper.join(timeout=5)
    [row] = pq.read_table(out).to_pylist()
    assert dropped, "the ssh connection was never dropped"
    assert (row["status"], row["slot"], row["infra_attempts"]) == ("success", "local-0", 1), row["detail"]
    finished = [(e["slot"], e["status"]) for e in iter_events(run.events) if e["kind"] == "run_finished"]
    assert finished == [("ssh-0", "infra_error"), ("local-0", "success")]
    assert (tmp_path / "launches").read_text().split() == [row["rollout_id"]] * 2  # launched on both slots


def test_concurrent_waves_run_in_one_allocation_and_never_queue_for_a_second(slurm, slurm_hosts, tmp_path):
    """Two loops' waves at once, each over a slot pool that fills the cluster: with an allocation per
    wave the second would queue behind the first (here: fail after 5 s); with one, both run."""
    n = 3
    whole_cluster = _slurm_slots(2 * len(slurm.nodes), cpus=slurm.cpus // 2)
    hosts = replace(slurm_hosts, slurm=replace(slurm_hosts.slurm, queue_wait_s=5.0))
    outs = []

    async def both(base_url: str) -> None:
        async def one(name: str) -> None:
            env = SleepEnv(tmp_path / f"launches-{name}", 1.0)
            outs.append(await _wave(RunDir(tmp_path / name), base_url, env, n, whole_cluster, hosts))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "a")
            tg.start_soon(one, "b")

    with ScriptedResearcher(plans(n)) as sr:
        anyio.run(both, sr.base_url)
    rows = [r for out in outs for r in pq.read_table(out).to_pylist()]
    assert [r["status"] for r in rows] == ["success"] * 2 * n, [r["detail"] for r in rows]
    jobs = {r["job_id"].split(".")[0] for r in rows}
    assert len(jobs) == 1, [r["job_id"] for r in rows]  # both waves' steps in the one allocation
    assert _eventually(lambda: jobs.isdisjoint(_squeue(slurm))), _squeue(slurm)


def test_a_wave_over_two_nodes_gives_each_concurrent_step_its_own_gpu_from_slurm(slurm, slurm_hosts, tmp_path):
    """One GPU per slot, as many slots as the cluster has GPUs: the steps run on both nodes, no two
    at once on one (node, GPU), each with the CUDA_VISIBLE_DEVICES SLURM gave it; the trace rows and
    events name the node each run was on."""
    n, k = 8, len(slurm.nodes) * slurm.gpus
    run, record = RunDir(tmp_path / "run"), tmp_path / "gpus"
    with ScriptedResearcher(plans(n)) as sr:
        out = anyio.run(_wave, run, sr.base_url, GpuSleepEnv(tmp_path / "launches", 1.5, record), n,
                        _slurm_slots(k, gpu=0), slurm_hosts)
    rows = pq.read_table(out).to_pylist()
    assert [r["status"] for r in rows] == ["success"] * len(rows), [r["detail"] for r in rows]
    steps: dict[str, list] = {}
    for line in record.read_text().splitlines():
        step, node, cvd, gpus, at = line.split()
        steps.setdefault(step, []).append((node, cvd, gpus, float(at)))
    assert len(steps) == len(rows) and all(len(v) == 2 for v in steps.values()), steps  # each step's start and end
    assert all(cvd == gpus and cvd in {str(g) for g in range(slurm.gpus)} for v in steps.values() for _, cvd, gpus, _ in v), steps
    spans = [(v[0][0], v[0][1], v[0][3], v[1][3]) for v in steps.values()]
    overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:] if a[2] < b[3] and b[2] < a[3]]
    assert overlapping, spans  # steps did run at the same time, so the next line has something to check
    assert all(a[:2] != b[:2] for a, b in overlapping), overlapping  # never one (node, GPU) for two at once
    assert {r["host"] for r in rows} == {node for node, *_ in spans} == set(slurm.nodes), [r["host"] for r in rows]
    by_step = {step: v[0][0] for step, v in steps.items()}
    assert all(r["host"] == by_step[r["job_id"]] for r in rows), rows  # each row names its own step's node
    finished = [e["host"] for e in iter_events(run.events) if e["kind"] == "run_finished"]
    assert sorted(finished) == sorted(r["host"] for r in rows)
