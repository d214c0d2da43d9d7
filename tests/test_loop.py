"""The whole experiment matrix for 2 rounds, and its resume after kill -9 across round boundaries.

Real driver, real waves over the local launcher, real LoRA fits and merges of a tiny random
Llama-shaped researcher; the researcher's replies come from the scripted researcher (the test
double), the training jobs from SleepEnv (a shell job whose val_bpb comes from `x = N`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rfs import ROOT
from rfs.events import read_events
from rfs.loop.driver import drive
from rfs.rundir import RunDir
from tests.loop_child import CONTROL_LINES, LOOPS, experiment, hosts, plans
from tests.procs import group_alive, job_groups, wait_for
from tests.scripted_researcher import ScriptedResearcher
from tests.tiny_model import build
from tests.wave_child import SEED_TRAIN_PY, SleepEnv

ROUNDS, N = 2, 2


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("tiny") / "v0")


@pytest.fixture()
def researcher(tiny):
    with ScriptedResearcher(plans(experiment(tiny, "http://unused"), ROUNDS)) as r:
        yield r


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RFS_CACHE", str(tmp_path / "cache"))  # calibration stays inside the test


def rows(run: RunDir, loop: str, r: int) -> list[dict]:
    """The researcher's rows of a round (the seed controls beside them: controls())."""
    return [row for row in pq.read_table(run.traces(loop, r)).to_pylist() if not row["seed_control"]]


def controls(run: RunDir, loop: str, r: int) -> list[dict]:
    return [row for row in pq.read_table(run.traces(loop, r)).to_pylist() if row["seed_control"]]


def final_state(run: RunDir) -> dict:
    """What a run ends with, minus wall-clock fields: traces, model lineage and loop states."""
    traces = {}
    for path in sorted((run.root / "traces").glob("*/round-*.parquet")):
        key = f"{path.parent.name}/{path.name}"
        traces[key] = sorted(
            (r["rollout_id"], r["status"], r["val_bpb"], r["final_train_py"], r["start_train_py_sha256"],
             r["conditioning_stamp"], r["memory"]) for r in pq.read_table(path).to_pylist())
    models = {}
    for m in sorted((run.root / "models").glob("*/v*/manifest.json")):
        man = json.loads(m.read_text())
        models[f"{m.parent.parent.name}/{m.parent.name}"] = (man["dataset_sha256"], man["parent_version"], man["trained"])
    loops = {k: {f: v[f] for f in ("round", "version", "status", "best_val_bpb", "best_rollout")}
             for k, v in run.read_state()["loops"].items()}
    return {"traces": traces, "models": models, "loops": loops}


def test_matrix_two_rounds(tmp_path, tiny, researcher):
    run = RunDir(tmp_path / "run")
    cfg = experiment(tiny, researcher.base_url, ROUNDS, N, controls=("placebo", "noprefill"))
    assert drive(cfg, run, hosts(), plain=True, env=SleepEnv(tmp_path / "launches", 0.05)) == 0

    state = run.read_state()["loops"]
    for gold in ("A-S", "A-F", "B-S", "B-F", *CONTROL_LINES):
        assert (state[gold]["round"], state[gold]["version"], state[gold]["status"]) == (2, 2, "done")
        assert (run.model(gold, 2) / "manifest.json").exists()
    assert (state["CTRL"]["round"], state["CTRL"]["version"]) == (2, 0)
    assert state["FLOOR"]["round"] == 1

    # Round 1 is collected once with V0 and shared (the same file) by every loop but FLOOR.
    shared = run.traces("shared", 1)
    assert len(rows(run, "shared", 1)) == N
    for loop in ("A-S", "A-F", "B-S", "B-F", "CTRL"):
        assert os.path.samefile(run.traces(loop, 1), shared)
    assert not os.path.exists(run.traces("FLOOR", 1)) or not os.path.samefile(run.traces("FLOOR", 1), shared)

    # Arc A restarts from the pristine train.py; arc B from the best of round 1 (thread 0: x = -1).
    for loop in ("A-S", "A-F", "CTRL"):
        assert {r["start_train_py_sha256"] for r in rows(run, loop, 2)} == {sha(SEED_TRAIN_PY)}
    for loop in ("B-S", "B-F"):
        assert {r["start_train_py_sha256"] for r in rows(run, loop, 2)} == {sha("x = -1\n")}
        assert min(r["val_bpb"] for r in rows(run, loop, 2)) == pytest.approx(0.98)

    # The arms are independent after round 1: S trains on every trace, F only on improvements.
    s_data = json.loads((run.model("A-S", 1) / "dataset.json").read_text())
    f_data = json.loads((run.model("A-F", 1) / "dataset.json").read_text())
    assert (s_data["selected"], f_data["selected"]) == (2, 1)
    assert json.loads((run.model("A-S", 2) / "manifest.json").read_text())["parent_version"] == 1
    ids = [r["rollout_id"] for loop in ("A-S", "A-F", "B-S", "B-F") for r in rows(run, loop, 2)]
    assert len(ids) == len(set(ids)) == 4 * N

    # Arm S conditions on a wanted outcome once trained on stamps; nobody else is conditioned.
    assert all(r["conditioning_stamp"].startswith("<val_bpb=0.980 status=success") for r in rows(run, "A-S", 2))
    for loop in ("A-F", "B-F", "CTRL", "FLOOR", "A-S-noprefill", "CTRL-B"):
        assert all(r["conditioning_stamp"] == "" for r in rows(run, loop, max(1, state[loop]["round"])))

    # CTRL carries round 1 in its prompt; FLOOR carries nothing.
    ctrl = rows(run, "CTRL", 2)
    assert all("round 1: val_bpb=0.9900" in r["memory"] and "+x = -1" in r["memory"] for r in ctrl)
    assert all(r["memory"] == "" for r in rows(run, "FLOOR", 1))
    assert all(r["memory"] == "" for loop in ("A-S", "B-F") for r in rows(run, loop, 2))

    # A CPU fit holds every local slot: no training run overlaps a fit (wall-clock budgets are fair).
    inside, overlaps, fits = False, 0, 0
    for e in read_events(run.events)[0]:
        if e["kind"] == "scheduler" and e["decision"] == "fit holds the slots":
            inside, fits = True, fits + 1
        elif e["kind"] in ("consolidated", "experiment_finished"):
            inside = False
        overlaps += inside and e["kind"] == "run_started"
    assert fits == 12 and overlaps == 0

    # Held-out probes ran for V0 (once, shared) and for each gold loop's last version.
    evals = pq.read_table(run.metrics("version_eval")).to_pylist()
    probed = {(r["loop"], r["version"], r["probe"]) for r in evals}
    assert {("shared", 0, p) for p in ("zero_shot", "transfer", "code")} <= probed
    assert {(loop, 2, "zero_shot") for loop in ("A-S", "A-F", "B-S", "B-F")} <= probed

    # Arc B has its own baselines, continuing from their own best file as arc B does; CTRL stays on arc A.
    assert {(state[b]["kind"], state[b]["arc"]) for b in ("CTRL-B", "FLOOR-B")} == {("ctrl", "B"), ("floor", "B")}
    assert state["CTRL"]["arc"] == "A" and state["CTRL-B"]["round"] == 2
    assert {r["start_train_py_sha256"] for r in rows(run, "CTRL-B", 2)} == {sha("x = -1\n")}
    assert all("round 1: val_bpb=0.9900" in r["memory"] for r in rows(run, "CTRL-B", 2))

    # Paired: rollout t of round r draws the same seed in every line of the replicate.
    for r in (1, 2):
        lines = [loop for loop in state if state[loop]["kind"] != "floor" or r == 1]
        seeds = {loop: sorted((row["thread"], row["seed"]) for row in rows(run, loop, r)) for loop in lines}
        assert len({tuple(v) for v in seeds.values()}) == 1 and len(seeds[lines[0]]) == N, seeds

    # The no-prefill line is arm S trained the same, collected without the stamp; nobody else is stamped.
    noprefill = json.loads((run.model("A-S-noprefill", 1) / "dataset.json").read_text())
    assert noprefill["selected"] == s_data["selected"] and noprefill["rule"] == s_data["rule"]
    assert all(r["conditioning_stamp"] == "" for r in rows(run, "A-S-noprefill", 2))
    placebo = json.loads((run.model("A-S-placebo", 1) / "dataset.json").read_text())
    assert placebo["selected"] == s_data["selected"]  # the same traces; stamps permuted (test_loop_design)

    # Seed controls ran in every wave, as the unmodified start file with no researcher turn, and
    # nothing trained on them.
    files = sorted((run.root / "traces").glob("*/round-*.parquet"))
    assert len(files) == 1 + 6 * 2 + 2 * 2 + 2  # shared, six gold lines, CTRL(-B), FLOOR(-B)
    for path in files:
        table = pq.read_table(path).to_pylist()
        ctl = [r for r in table if r["seed_control"]]
        assert len(ctl) == 1 and ctl[0]["messages"] == [] and ctl[0]["turns"] == 0, path
        assert ctl[0]["start_train_py_sha256"] == sha(ctl[0]["final_train_py"]) and ctl[0]["status"] == "success"
        assert ctl[0]["thread"] == N and ctl[0]["rollout_id"].endswith("-c000")
    ids_trained = {rid for m in run.root.glob("models/*/v*/dataset.json")
                   for _, rid in json.loads(m.read_text())["rollouts"]}
    assert ids_trained and not any("-c0" in rid for rid in ids_trained)


def _child(run_dir: Path, researcher, tiny: Path, counter: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.loop_child", str(run_dir), researcher.base_url, str(tiny), str(counter),
         "--rounds", str(ROUNDS), "--rollouts", str(N), "--no-probes", *extra],  # probes' resume: test_loop_evals
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _kill_until_done(run, researcher, tiny, launches, targets, later, *args) -> int:
    """Start the controller again and again, killing it -9 at each target event (then at `later()`
    ones) until a start runs to the end; the number of kills."""
    kills = 0
    while True:
        proc = _child(run.root, researcher, tiny, launches, *args)
        kind, phase, nth = targets[kills] if kills < len(targets) else later()
        if not _kill_when(proc, run.events, kind, phase, nth):
            assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
            return kills
        kills += 1
        assert kills < 40, "the run never finished"


def _kill_when(proc: subprocess.Popen, events: Path, kind: str, phase: str | None, nth: int, timeout: float = 120) -> bool:
    """kill -9 the controller right after the nth matching event; False if it finished first."""
    deadline, seen = time.monotonic() + timeout, 0
    offset = events.stat().st_size if events.exists() else 0  # only what this controller emits counts
    while time.monotonic() < deadline:
        new, offset = read_events(events, offset)
        seen += sum(e["kind"] == kind and (phase is None or e.get("phase") == phase) for e in new)
        if seen >= nth:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise TimeoutError(f"no {kind}/{phase} #{nth} within {timeout}s")


@pytest.mark.slow  # 127 s; the default run keeps kill -9 and resume in the rehearsal, test_wave_kill and test_consolidate_fit
def test_kill9_across_round_boundaries_resumes_to_the_same_state(tmp_path, tiny, researcher):
    reference = RunDir(tmp_path / "reference")
    ref = _child(reference.root, researcher, tiny, tmp_path / "ref-launches")
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-3000:]

    run = RunDir(tmp_path / "killed")
    rng = random.Random(7)
    # mid-collect, mid-fit, right after a merge, mid-swap, then at random events until it finishes
    targets = [("rollout_started", None, 3), ("phase", "consolidate", 1), ("train_step", None, 1),
               ("consolidated", None, 1), ("phase", "swap", 2), ("run_started", None, 5)]
    later = lambda: (rng.choice(["rollout_finished", "train_step", "phase", "run_finished"]), None, rng.randint(1, 6))  # noqa: E731
    kills = _kill_until_done(run, researcher, tiny, tmp_path / "launches", targets, later)
    assert kills >= len(targets)
    assert final_state(run) == final_state(reference)

    # No round was collected or trained twice: one wave_finished and one consolidated per round.
    events = [e for e in read_events(run.events)[0]]
    waves = [(e["loop"], e["round"]) for e in events if e["kind"] == "wave_finished" and e["loop"] != "probe"]
    fits = [(e["loop"], e["round"]) for e in events if e["kind"] == "consolidated"]
    assert len(waves) == len(set(waves)) and len(fits) == len(set(fits)) == 8
    assert set(LOOPS) >= {loop for loop, _ in waves}


@pytest.mark.slow
def test_replicates_resume_after_kill9_to_the_same_state(tmp_path, tiny):
    """Two replicates of arm S, CTRL and FLOOR, killed across rounds and replicates, end as a run never killed."""
    small = ("--replicates", "2", "--small")
    with ScriptedResearcher(plans(experiment(tiny, "http://unused", replicates=2), ROUNDS)) as researcher:
        reference = RunDir(tmp_path / "reference")
        ref = _child(reference.root, researcher, tiny, tmp_path / "ref-launches", *small)
        assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-3000:]
        run = RunDir(tmp_path / "killed")
        targets = [("rollout_started", None, 3), ("phase", "consolidate", 2), ("consolidated", None, 2)]
        then_finish = lambda: ("no such event", None, 1)  # noqa: E731
        kills = _kill_until_done(run, researcher, tiny, tmp_path / "launches", targets, then_finish, *small)
    assert kills >= len(targets)
    assert final_state(run) == final_state(reference)
    assert set(run.read_state()["loops"]) == {"A-S", "CTRL", "FLOOR", "A-S.1", "CTRL.1", "FLOOR.1"}
    for k, shared in ((0, "shared"), (1, "shared.1")):  # one round 1 per replicate, each with its own seeds
        assert os.path.samefile(run.traces("A-S" if k == 0 else "A-S.1", 1), run.traces(shared, 1))
    seeds = [{r["seed"] for r in rows(run, s, 1)} for s in ("shared", "shared.1")]
    assert seeds[0].isdisjoint(seeds[1])


def test_a_cpu_fit_cancelled_while_taking_the_slots_gives_back_those_it_took():
    """The fit holds every local slot; cancelled while it still waits for one (a wave's run has
    it), the slots it already took go back to the pool."""
    from types import SimpleNamespace

    import anyio

    from rfs.collect.slots import SlotPool
    from rfs.config import CollectCfg
    from rfs.loop.round import cores_for_fit
    from tests.wave_child import local_slots

    async def main() -> int:
        pool = SlotPool(local_slots(3), CollectCfg())
        busy = await pool.acquire()  # a wave's run holds one slot
        ex = SimpleNamespace(pool=pool, hosts=SimpleNamespace(train=SimpleNamespace(device="cpu")))
        with anyio.move_on_after(0.2):
            async with cores_for_fit(ex):
                raise AssertionError("the fit started while a run still held a slot")
        pool.release(busy)
        return pool.free

    assert anyio.run(main) == 3


def test_sigterm_under_the_tui_stops_the_controller_thread_and_its_jobs(tmp_path, tiny, researcher):
    """On a terminal the controller runs in a thread beside the TUI, and SIGTERM (or Ctrl-C) lands
    in the TUI's thread: the controller must still be cancelled, so its launchers kill the jobs."""
    import pty
    import select

    counter = tmp_path / "launches"
    code = "from rfs.cli import stop_on_sigterm; stop_on_sigterm(); from tests.loop_child import main; main()"
    argv = [sys.executable, "-c", code, str(tmp_path / "run"), researcher.base_url, str(tiny), str(counter), "--tui", "--sleep", "600"]
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "30"}
    master, child = pty.openpty()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=child, stdout=child, stderr=child, start_new_session=True)
    os.close(child)
    seen = bytearray()

    def drain_until(done, within: float) -> None:  # a hang guard, not a timing assertion
        deadline = time.monotonic() + within
        while not done() and time.monotonic() < deadline:
            try:
                if select.select([master], [], [], 0.1)[0]:
                    seen.extend(os.read(master, 65536))  # keep draining so the app never blocks on a full pty
            except OSError:  # every writer has closed the terminal
                time.sleep(0.1)

    try:
        drain_until(lambda: counter.exists() or proc.poll() is not None, 120)
        assert counter.exists(), seen[-3000:].decode(errors="replace")
        groups = job_groups(counter, proc.pid)
        assert groups, "no running job was found"
        proc.send_signal(signal.SIGTERM)
        drain_until(lambda: proc.poll() is not None, 60)
        assert proc.poll() is not None, "the controller did not stop: " + seen[-3000:].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    wait_for(lambda: not any(group_alive(g) for g in groups), 5)  # a killed job's zombie is reaped by init, not at once
    alive = [g for g in groups if group_alive(g)]
    for pgid in alive:  # a failing test leaves no 600 s sleepers behind
        os.killpg(pgid, signal.SIGKILL)
    assert alive == [], "jobs outlived their controller"


def test_a_resumed_run_kills_the_calibration_jobs_of_its_killed_controller(tmp_path, tiny, researcher):
    """Calibration's jobs are keyed like a wave's: a resumed run kills those a kill -9 left running
    before it calibrates again."""
    counter, run = tmp_path / "launches", RunDir(tmp_path / "run")
    code = "from rfs.cli import stop_on_sigterm; stop_on_sigterm(); from tests.loop_child import main; main()"
    argv = [sys.executable, "-c", code, str(run.root), researcher.base_url, str(tiny), str(counter), "--sleep", "600"]
    started = lambda k: counter.exists() and len(counter.read_text().split()) >= k  # noqa: E731
    first = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = None
    try:
        wait_for(lambda: started(2) or first.poll() is not None, 120)
        orphans = job_groups(counter, first.pid)
        first.kill()
        first.wait()
        assert orphans and all(group_alive(g) for g in orphans), "the killed controller's jobs should still run"
        second = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: started(4) or second.poll() is not None, 120)
        assert started(4), second.stderr.read().decode()[-3000:] if second.poll() is not None else "no new calibration"
        wait_for(lambda: not any(group_alive(g) for g in orphans), 5)  # zombies are reaped by init, not at once
        assert not any(group_alive(g) for g in orphans), "the orphaned calibration jobs outlived the resume"
        alarms = [(e["loop"], e["message"]) for e in read_events(run.events)[0] if e["kind"] == "alarm"]
        assert ("calibrate", "left running by a killed controller: 4 local process(es) killed") in alarms, alarms
        running = job_groups(counter, second.pid)
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)
        wait_for(lambda: not any(group_alive(g) for g in running), 5)
        assert not any(group_alive(g) for g in running)
    finally:
        for proc in (first, second):
            if proc and proc.poll() is None:
                proc.kill()
                proc.wait()
        for pgid in job_groups(counter, -1):  # a failing test leaves no 600 s sleepers behind
            os.killpg(pgid, signal.SIGKILL)


def test_without_a_final_fit_each_gold_loop_ends_on_the_version_it_collected_with(tmp_path, tiny, researcher):
    """loop.final_fit = false: the last round is collected and recorded but not consolidated, so
    the loop ends on V1 (which collected round 2), and the last probes are V1's."""
    run = RunDir(tmp_path / "run")
    cfg = experiment(tiny, researcher.base_url, ROUNDS, N, arcs=("A",), arms=("S",))
    cfg = replace(cfg, loop=replace(cfg.loop, final_fit=False, eval_every=1))
    assert drive(cfg, run, hosts(), plain=True, env=SleepEnv(tmp_path / "launches", 0.05)) == 0

    state = run.read_state()["loops"]["A-S"]
    assert (state["round"], state["version"], state["status"]) == (2, 1, "done")
    assert (run.model("A-S", 1) / "manifest.json").exists() and not run.model("A-S", 2).exists()
    assert len(rows(run, "A-S", 2)) == N  # round 2 was collected, by V1
    assert {r["version"] for r in rows(run, "A-S", 2)} == {1}
    evals = pq.read_table(run.metrics("version_eval")).to_pylist()
    assert {r["version"] for r in evals if r["loop"] == "A-S"} == {1}
    fits = [e for e in read_events(run.events)[0] if e["kind"] == "consolidated" and e.get("loop") == "A-S"]
    assert len(fits) == 1
