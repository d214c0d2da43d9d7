"""kill -9 a real wave controller at 20 random instants, resume each time: exactly-once traces;
and the jobs a killed controller left running are killed by the one that resumes its wave.

The controller is tests/wave_child.py in its own process (run_wave, the scripted researcher over
loopback HTTP, SleepEnv jobs through the real local launcher). Every job appends its rollout_id to
a counter file when it starts, so launches per rollout are counted across kills.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from rfs.collect.wave import wave_key
from rfs.events import iter_events
from rfs.rundir import RunDir
from tests.procs import cmdline, group_alive, job_groups, wait_for
from tests.scripted_researcher import ScriptedResearcher
from tests.wave_child import plans, specs

ROOT = Path(__file__).resolve().parent.parent
N, SLOTS, SLEEP, KILLS = 12, 2, 0.1, 20


def launches(counter: Path) -> Counter:
    return Counter(counter.read_text().split()) if counter.exists() else Counter()


def settle(marker: str) -> None:
    """Wait until no process mentions `marker` (the killed controller's orphaned jobs, or a fork of it
    not yet exec'd): after that, every launch before the kill has written its counter line."""
    deadline = time.monotonic() + 60
    while any(marker.encode() in cmdline(p) for p in Path("/proc").iterdir() if p.name.isdigit()):
        assert time.monotonic() < deadline, f"processes naming {marker} outlived their 60 s"
        time.sleep(0.05)


def _events(run: RunDir) -> list[bytes]:
    return run.events.read_bytes().splitlines() if run.events.exists() else []


def finished(run: RunDir) -> set[str]:
    if run.traces("A-S", 1).exists():
        return {r["rollout_id"] for r in pq.read_table(run.traces("A-S", 1)).to_pylist()}
    return {p.name.removesuffix(".json") for p in run.pending("A-S", 1).glob("*.json")}


def test_kill_9_at_random_instants_loses_and_repeats_nothing(tmp_path):
    rng = random.Random(7)
    run, counter = RunDir(tmp_path / "run"), tmp_path / "launches"
    snapshots: list[tuple[set[str], Counter]] = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with ScriptedResearcher(plans(N)) as sr:
        argv = [sys.executable, "-m", "tests.wave_child", str(run.root), sr.base_url, str(counter),
                "--n", str(N), "--slots", str(SLOTS), "--sleep", str(SLEEP)]
        for i in range(KILLS):
            # Kill i lands once this controller has begun the wave and i*(N-3)/KILLS rows are done,
            # plus a random 0-100 ms of turns, runs and writes: 20 instants spread over the wave,
            # all inside it, however long start-up takes on this machine.
            seen, rows = _events(run), i * (N - 3) // KILLS
            child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 60
            while child.poll() is None and not (len(_events(run)) > len(seen) and len(finished(run)) >= rows):
                assert time.monotonic() < deadline, "the controller made no progress in 60 s"
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.1))
            compacted = run.traces("A-S", 1).exists()
            child.kill()
            _, err = child.communicate()
            assert child.returncode == -9, err.decode()[-2000:]  # killed, not ended on its own
            assert not compacted, "the wave ended before every kill had landed in it: give it more work"
            settle(str(counter))
            snapshots.append((finished(run), launches(counter)))
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr.decode()[-3000:]

    rows = pq.read_table(run.traces("A-S", 1)).to_pylist()
    ids = [s.rollout_id for s in specs(N)]
    assert [r["rollout_id"] for r in rows] == ids  # exactly N rows, each rollout once, in order
    assert [r["status"] for r in rows] == ["success"] * N, [r["detail"] for r in rows]
    assert [r["val_bpb"] for r in rows] == [1 + (i + 1) / 100 for i in range(N)]
    final = launches(counter)
    assert set(final) == set(ids)
    # A finished rollout is never launched again ...
    for done_then, at in snapshots:
        for rid in done_then:
            assert final[rid] == at[rid], f"{rid} finished, then was launched again"
    # ... so a rollout launched twice was one in flight (launched, not finished) at some kill.
    in_flight = {rid for done_then, at in snapshots for rid in at if rid not in done_then}
    assert {rid for rid, c in final.items() if c > 1} <= in_flight
    print("finished at each kill:", [len(d) for d, _ in snapshots], "launches:", sum(final.values()))
    assert _workdirs(run) == [], "working folders of killed controllers' jobs were left behind"


def test_a_resumed_wave_kills_the_jobs_its_killed_controller_left_running(tmp_path):
    """A job goes on after its controller's kill -9, holding its slot (a GPU on the cluster) for up
    to the run's whole budget. The controller that resumes the wave kills it before it starts its
    own jobs, says so in an alarm, and removes the dead jobs' working folders."""
    run, counter, n = RunDir(tmp_path / "run"), tmp_path / "launches", 3
    with ScriptedResearcher(plans(n)) as sr:
        argv = [sys.executable, "-m", "tests.wave_child", str(run.root), sr.base_url, str(counter), "--n", str(n), "--slots", str(n)]
        child = subprocess.Popen([*argv, "--sleep", "600"], cwd=ROOT, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not (counter.exists() and len(counter.read_text().split()) == n):
                assert child.poll() is None and time.monotonic() < deadline, "the jobs never started"
                time.sleep(0.05)
            child.kill()
            child.communicate()
            orphans = _carrying(run)
            assert len(orphans) == 2 * n, f"each job is a shell and its sleep: {orphans}"  # alive after the kill
            assert len(_workdirs(run)) == n
            done = subprocess.run([*argv, "--sleep", "0.1"], cwd=ROOT, capture_output=True, timeout=120)
            assert done.returncode == 0, done.stderr.decode()[-3000:]
        finally:
            child.kill()
            for pid in _carrying(run):  # a failing test leaves no 600 s sleepers behind
                os.kill(pid, signal.SIGKILL)
    assert _carrying(run) == [], "the orphaned jobs outlived the resume"
    assert _workdirs(run) == []
    rows = pq.read_table(run.traces("A-S", 1)).to_pylist()
    assert [r["status"] for r in rows] == ["success"] * n
    alarms = [(e["loop"], e["round"], e["message"]) for e in iter_events(run.events) if e["kind"] == "alarm" and e["alarm"] == "orphans"]
    assert alarms == [("A-S", 1, f"left running by a killed controller: {2 * n} local process(es) killed")]


def _carrying(run: RunDir) -> list[int]:
    """Live processes whose environment names the wave (A-S, round 1) of this run."""
    needle = f"\0RFS_WAVE={wave_key(run, 'A-S', 1)}\0".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle in b"\0" + (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


def _workdirs(run: RunDir) -> list[Path]:
    return sorted(Path(tempfile.gettempdir()).glob(f"rfs-{wave_key(run, 'A-S', 1)}-*"))


def test_sigterm_stops_the_wave_and_its_running_jobs_as_ctrl_c_does(tmp_path):
    """`timeout` or a SLURM preemption sends SIGTERM: the controller (with rfs.cli's handler) is
    cancelled, and its launcher kills the jobs it was running instead of leaving them orphaned."""
    counter = tmp_path / "launches"
    code = "import sys; from rfs.cli import stop_on_sigterm; stop_on_sigterm(); from tests.wave_child import main; main()"
    with ScriptedResearcher(plans(2)) as sr:
        child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run"), sr.base_url, str(counter),
                                  "--n", "2", "--slots", "2", "--sleep", "60"], cwd=ROOT, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not (counter.exists() and len(counter.read_text().split()) == 2):
            assert child.poll() is None and time.monotonic() < deadline, "the jobs never started"
            time.sleep(0.05)
        groups = job_groups(counter, child.pid)
        assert len(groups) == 2, "the two running jobs were not found"
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=30)
    assert b"KeyboardInterrupt" in err, err.decode()[-2000:]
    wait_for(lambda: not any(group_alive(g) for g in groups), 5)  # a killed job's zombie is reaped by init, not at once
    assert [g for g in groups if group_alive(g)] == [], "jobs outlived their controller"
