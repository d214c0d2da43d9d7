"""The loop's held-out probes end to end: the scripted researcher over real HTTP (backend "external"),
real training subprocesses through the local launcher, real Parquet, state.json and events.jsonl."""

from __future__ import annotations

import json
import math
import os
import shlex
from collections import Counter
from pathlib import Path

import anyio
import pyarrow.parquet as pq
import pytest

from rfs import config
from rfs.collect.slots import SlotPool
from rfs.evals import load, metrics, probes
from rfs.events import EventLog, iter_events
from rfs.hosts import HostsFile, Slot
from rfs.launch.base import Job
from rfs.loop import evals
from rfs.loop.experiment import Experiment
from rfs.loop.plan import LoopSpec
from rfs.loop.serving import Servers
from rfs.loop.state import ExperimentState, Noise
from rfs.rundir import RunDir
from tests.scripted_researcher import ScriptedResearcher, action
from tests.wave_child import SleepEnv, local_slots

os.environ.setdefault("HF_HUB_OFFLINE", "1")

N_ZERO_SHOT, DEPTH, TRANSFER_DEPTH, TRANSFER_RUNS, N_CODE = 3, 2, 12, 3, 3
LOOP = LoopSpec("A-S", "gold", "A", "S")


def train_py(x: int, depth: int = DEPTH) -> str:
    return (
        f"x = {x}\n"
        "# --- HYPERPARAMETERS: the researcher may change these values within the declared ranges ---\n"
        f"DEPTH = {depth}  # range: [1, 4]\n"
        "# --- END HYPERPARAMETERS ---\n"
    )


# val_bpb = 1 + x/100 + DEPTH/1000: the number says which train.py ran and at which depth
_HARNESS = """
echo {rollout_id} >> {counter}
x=$(sed -n 's/^x = //p' train.py)
d=$(sed -n 's/^DEPTH = \\([0-9]*\\).*/\\1/p' train.py)
awk -v x="$x" -v d="$d" 'BEGIN {{ printf "val_bpb: %.6f\\n", 1 + x / 100 + d / 1000 }}'
echo "steps: 10"
"""


class DepthEnv(SleepEnv):
    """SleepEnv with a hyperparameter block holding DEPTH; `broken_transfer` fails transfer jobs as
    an unreachable slot would (an infrastructure failure)."""

    def __init__(self, counter: Path, broken_transfer: bool = False):
        super().__init__(counter, 0.0)
        self.broken_transfer = broken_transfer

    def seed_train_py(self) -> str:
        return train_py(0)

    def job(self, train_py: str, slot: Slot, rollout_id: str) -> Job:
        if self.broken_transfer and "-transfer" in rollout_id:
            raise ConnectionError(f"slot {slot.name} is unreachable")
        script = _HARNESS.format(counter=shlex.quote(self.counter), rollout_id=shlex.quote(rollout_id))
        return Job(rollout_id, ("/bin/sh", "-c", script), {"train.py": train_py.encode()}, timeout_s=60.0)


def cfg_for(base_url: str, drift_window: int = 2) -> config.Config:
    return config.load(None, {
        "experiment": {"preset": "cluster", "name": "evals-test", "seed": 0},
        "env": {"budget_s": 1.0, "timeout_s": 61.0},
        "researcher": {"backend": "external", "base_url": base_url, "model": "scripted", "action_space": "code",
                       "max_turns": 4, "turn_timeout_s": 30.0},
        "collect": {"infra_retries": 1},
        "eval": {"zero_shot_rollouts": N_ZERO_SHOT, "transfer_depth": TRANSFER_DEPTH, "drift_window": drift_window,
                 "code_problems": N_CODE},
    })


def code_answer(messages: list[dict]) -> str:
    """Right for HumanEval/53 (add, the first problem) only: 1 of the N_CODE problems passes."""
    if "def add(" in messages[-1]["content"]:
        return json.dumps({"code": "def add(x: int, y: int):\n    return x + y\n"})
    return json.dumps({"code": "def wrong():\n    pass\n"})


def plans() -> dict[int, list]:
    """Zero-shot rollout i writes x = i + 1 and runs it; the code probe (experiment seed 0) answers."""
    out: dict[int, list] = {0: [code_answer] * N_CODE}
    for i, p in enumerate(probes.zero_shot_rollouts(cfg_for("http://unused"), 0)):
        out[p.seed % 2**31] = [action("edit", path="train.py", content=train_py(i + 1)), action("run"), action("finish")]
    return out


async def probe(root: Path, base_url: str, env: DepthEnv, *versions: int, drift_window: int = 2) -> None:
    """evaluate() for each version, from an Experiment built like rfs.loop.experiment.started builds it."""
    cfg, run, hosts = cfg_for(base_url, drift_window), RunDir(root), HostsFile()
    events = EventLog(run.events)
    state = ExperimentState.from_json(run.read_state(), cfg.experiment.name)
    try:
        async with Servers(cfg, hosts, run, events, None) as servers:
            pool = SlotPool(local_slots(2), cfg.collect, events)
            ex = Experiment(cfg, run, hosts, events, env, pool, servers, Noise(1.0, 0.01, 3), None, state)
            for v in versions:
                await evals.evaluate(ex, LOOP, v)
    finally:
        events.close()


def version_eval(run: RunDir) -> dict[tuple[str, int, str], dict]:
    rows = metrics.read(run.metrics("version_eval"), metrics.VERSION_EVAL).to_pylist()
    return {(r["loop"], r["version"], r["probe"]): r for r in rows}


def launches(counter: Path) -> Counter:
    return Counter(counter.read_text().split()) if counter.exists() else Counter()


def test_probes_v0_and_a_version_once_each(tmp_path):
    run, counter = RunDir(tmp_path / "run"), tmp_path / "launches"
    with ScriptedResearcher(plans()) as sr:
        anyio.run(probe, run.root, sr.base_url + "/v1", DepthEnv(counter), 0, 2)
        asked, sr_requests = len(sr.requests), list(sr.requests)
        anyio.run(probe, run.root, sr.base_url + "/v1", DepthEnv(counter), 0, 2)  # a resumed run
        assert len(sr.requests) == asked  # nothing asked again
    got = version_eval(run)
    assert sorted(got) == sorted((loop, v, p) for loop, v in (("shared", 0), ("A-S", 2)) for p in metrics.PROBES)
    for loop, v in (("shared", 0), ("A-S", 2)):
        zs, tr, code = (got[(loop, v, p)] for p in metrics.PROBES)
        assert zs["values"] == pytest.approx([1 + (i + 1) / 100 + DEPTH / 1000 for i in range(N_ZERO_SHOT)])
        assert zs["best"] == pytest.approx(1.012) and zs["n_ok"] == N_ZERO_SHOT
        # the best zero-shot train.py (x = 1) at the transfer depth, transfer_runs times, each paired
        # with the seed train.py (x = 0) at that depth
        assert tr["values"] == pytest.approx([1 + 1 / 100 + TRANSFER_DEPTH / 1000] * TRANSFER_RUNS)
        assert tr["detail"] == (f"3/3 runs at DEPTH={TRANSFER_DEPTH} (success, success, success); seed train.py at "
                                f"DEPTH={TRANSFER_DEPTH}, same seeds: 3/3 ok, mean {1 + TRANSFER_DEPTH / 1000:.4f}; "
                                "paired delta (version - seed) +0.0100 over 3 pairs")
        assert code["values"] == [1.0] + [0.0] * (N_CODE - 1)
        assert code["mean"] == pytest.approx(1 / N_CODE) and code["best"] == 1.0
        assert code["detail"] == f"1/{N_CODE} HumanEval problems passed: HumanEval/53"
    # every probe ran once: zero-shot rollouts and the transfer per version, none on the second call
    runs = ("zs000", "zs001", "zs002", *(f"{s}transfer{i}" for s in ("", "seed-") for i in range(TRANSFER_RUNS)))
    want = {f"{loop}-v{v}-{k}" for loop, v in (("shared", 0), ("A-S", 2)) for k in runs}
    assert launches(counter) == Counter(want)
    assert asked == 2 * (N_ZERO_SHOT * 3 + N_CODE)  # edit, run, finish; one per problem
    # paired: each version asked the same problems with the same seeds (the experiment seed, 0, + i)
    code_asks = [(r["seed"], r["messages"][-1]["content"]) for r in sr_requests
                 if r["messages"][-1]["content"].startswith("Complete this Python function")]
    assert code_asks[:N_CODE] == code_asks[N_CODE:] and [seed for seed, _ in code_asks[:N_CODE]] == list(range(N_CODE))
    rows = pq.read_table(run.probes("A-S").traces("probe", 2)).to_pylist()
    assert {(r["loop"], r["version"], r["memory"], r["conditioning_stamp"]) for r in rows} == {("probe", 2, "", "")}
    assert load.traces(run).num_rows == 0  # the loop's curves never see probe rollouts
    phases = [(e["loop"], e["phase"]) for e in iter_events(run.events) if e["kind"] == "phase" and e["phase"].startswith("eval")]
    assert phases == [("shared", "eval"), ("shared", "eval_done"), ("A-S", "eval"), ("A-S", "eval_done")]


def test_an_infra_failure_is_recorded_as_such_and_retried_on_resume(tmp_path):
    run, counter = RunDir(tmp_path / "run"), tmp_path / "launches"
    with ScriptedResearcher(plans()) as sr:
        anyio.run(probe, run.root, sr.base_url + "/v1", DepthEnv(counter, broken_transfer=True), 2)
        failed = version_eval(run)[("A-S", 2, "transfer")]
        assert failed["n"] == 0 and math.isnan(failed["best"])  # no sample blamed on the researcher
        # the transfer's runs share the pool at once: each slot fails one of them and is quarantined
        assert failed["detail"].startswith("infra_error with no slot left: every slot is quarantined") and "unreachable" in failed["detail"]
        assert failed["detail"].endswith(f"{2 * TRANSFER_RUNS}/{2 * TRANSFER_RUNS} transfer runs found no working slot")
        assert not any(e["kind"] == "alarm" and e["alarm"] == "drift" for e in iter_events(run.events))
        asked, before = len(sr.requests), launches(counter)
        anyio.run(probe, run.root, sr.base_url + "/v1", DepthEnv(counter), 2)
        assert len(sr.requests) == asked  # zero-shot and code were done: only the transfer runs again
    assert launches(counter) - before == Counter(f"A-S-v2-{s}transfer{i}" for s in ("", "seed-") for i in range(TRANSFER_RUNS))
    # the retried transfer re-runs a train.py: it needs no researcher server
    assert sum(e["kind"] == "server_started" for e in iter_events(run.events)) == 1
    assert version_eval(run)[("A-S", 2, "transfer")]["values"] == pytest.approx([1.022] * TRANSFER_RUNS)


def test_drift_alarm_fires_once_per_loop_and_version(tmp_path):
    run, counter = RunDir(tmp_path / "run"), tmp_path / "launches"
    # zero-shot improves V0 → V2 while the code probe stalls: proxy drift over a window of 2
    history = [("shared", 0, 1.30, 0.5), ("A-S", 1, 1.20, 0.5), ("A-S", 2, 1.10, 0.5)]
    metrics.record_version_eval(run, [
        metrics.version_eval_row("evals-test", "A", loop, v, probe, [value], "recorded")
        for loop, v, bpb, code in history
        for probe, value in (("zero_shot", bpb), ("transfer", bpb), ("code", code))
    ])
    with ScriptedResearcher(plans()) as sr:
        anyio.run(probe, run.root, sr.base_url + "/v1", DepthEnv(counter), 1, 2)
        anyio.run(probe, run.root, sr.base_url + "/v1", DepthEnv(counter), 2)  # resumed: state.json remembers
        assert sr.requests == [] and not counter.exists()  # every probe was on record
    alarms = [e for e in iter_events(run.events) if e["kind"] == "alarm"]
    assert len(alarms) == 1 and alarms[0]["alarm"] == "drift" and alarms[0]["loop"] == "A-S"
    assert "held-out code stalled 0.5000 -> 0.5000" in alarms[0]["message"] and alarms[0]["version"] == 2
    assert list(run.read_state()["alarms"]) == ["drift A-S v1", "drift A-S v2"]
