"""Whole rollouts: the scripted researcher (the one test double) over loopback HTTP, the real
built-in environment and LocalLauncher for training. Every row must pass rfs.trace.validate."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import anyio
import pytest

from rfs import ROOT
from rfs.agent import Executed, ResearcherClient, RolloutSpec, ServerDown, rollout
from rfs.config import EnvCfg, ResearcherCfg
from rfs.events import EventLog, iter_events
from rfs.trace import validate
from tests.scripted_researcher import DIE, ScriptedResearcher, action

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SEED_PY = (ROOT / "env" / "builtin" / "train.py").read_text()
PROGRAM = (ROOT / "env" / "builtin" / "program.md").read_text()
CODE = ResearcherCfg(backend="vllm", action_space="code", max_turns=6, turn_timeout_s=30.0)
HPARAMS = ResearcherCfg(backend="llamacpp", action_space="hparams", max_turns=4, max_tokens=192, turn_timeout_s=30.0)
LR = "LEARNING_RATE = 3e-3"


def spec(seed: int = 100, start: str = SEED_PY) -> RolloutSpec:
    sha = hashlib.sha256(SEED_PY.encode()).hexdigest()
    return RolloutSpec(
        experiment="t", loop="A-S", arc="A", round=1, version=0, thread=0, rollout_id=f"r{seed}", seed=seed,
        start_train_py=start, start_val_bpb=math.nan, memory="", conditioning_stamp="", researcher_model="scripted",
        researcher_weights_sha256="", env_name="builtin", program_md=PROGRAM, seed_train_py_sha256=sha,
        program_md_sha256=hashlib.sha256(PROGRAM.encode()).hexdigest(),
    )


def _training(timeout_s: float):
    """The wave's RunTraining, done for real: BuiltinEnv's job on a local slot through LocalLauncher."""
    builtin = pytest.importorskip("rfs.envs.builtin", reason="the built-in environment has not landed")
    from rfs.envs import execute
    from rfs.hosts import HostsFile, slots
    from rfs.launch.local import LocalLauncher

    env = builtin.BuiltinEnv(EnvCfg(name="builtin", budget_s=2.0, timeout_s=timeout_s, device="cpu"))
    env.prepare()
    slot = slots(HostsFile())[0]

    async def run(train_py: str) -> Executed:
        result, outcome = await execute(env, LocalLauncher(), slot, train_py, "agent-test")
        return Executed(result, slot.host, slot.name, "cpu", outcome.job_id, 0, "")

    return run


@pytest.fixture(scope="module")
def training():
    return _training(timeout_s=60.0)  # generous: a contended machine starts torch slowly


@pytest.fixture(scope="module")
def impatient():
    return _training(timeout_s=8.0)  # 2 s budget + 3 s allowance: a hang ends in seconds


async def never(train_py: str) -> Executed:
    raise AssertionError("this rollout must not reach training")


def play(plan: list, cfg: ResearcherCfg, run_training, tmp_path: Path, start: str = SEED_PY) -> dict:
    async def go():
        with ScriptedResearcher({100: plan}) as server:
            async with ResearcherClient(server.base_url, "scripted", cfg) as client:
                events = EventLog(tmp_path / "events.jsonl")
                return await rollout(spec(100, start), cfg, client, run_training, events)

    row = anyio.run(go)
    validate(row)
    return row


def edit(search: str, replace: str) -> str:
    return action("edit", "change it", path="train.py", search=search, replace=replace)


def test_a_good_hparams_edit_succeeds(training, tmp_path):
    plan = [action("set", "a bit higher", name="LEARNING_RATE", value=0.005), action("run"), action("finish", "done")]
    row = play(plan, HPARAMS, training, tmp_path)
    assert row["status"] == "success", row["detail"]
    assert math.isfinite(row["val_bpb"]) and row["steps"] > 0 and row["exit_code"] == 0
    assert "+LEARNING_RATE = 0.005" in row["diff"] and row["edit_attempts"] == 1
    assert (row["turns"], row["valid_actions"], row["invalid_actions"], row["tool_calls"]) == (3, 3, 0, 2)
    assistant = [m for m in row["messages"] if m["role"] == "assistant"]
    assert json.loads(assistant[0]["content"]) == {"action": "set", "name": "LEARNING_RATE", "value": 0.005}
    assert assistant[0]["reasoning"] == "a bit higher" and row["schema_enforced"]
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
    turns = [e for e in iter_events(tmp_path / "events.jsonl") if e["kind"] == "turn"]
    assert [e["action"] for e in turns] == ["set", "run", "finish"]


def test_a_syntax_error_fixed_on_retry_succeeds(training, tmp_path):
    broken = "LEARNING_RATE = = 5e-3"
    plan = [edit(LR, broken), action("run"), edit(broken, "LEARNING_RATE = 5e-3"), action("run"), action("finish")]
    row = play(plan, CODE, training, tmp_path)
    assert row["status"] == "success", row["detail"]
    assert row["edit_attempts"] == 2
    observations = [m["content"] for m in row["messages"] if m["role"] == "user"][1:]
    assert "SyntaxError" in observations[1] and "val_bpb" in observations[-1]


def test_a_hanging_train_py_times_out(impatient, tmp_path):
    plan = [action("edit", "wait", path="train.py", content="import time\nwhile True:\n    time.sleep(1)\n"), action("run")]
    row = play(plan, CODE, impatient, tmp_path)
    assert row["status"] == "timeout", row["detail"]
    assert math.isnan(row["val_bpb"])


def test_garbage_is_agent_error(tmp_path):
    plan = ["I would love to help!", "```json\n{\"action\":", "\x00\x07\x1b", "{}", "[1, 2]", "{\"action\": \"run\"} {\"action\": \"run\"}"]
    row = play(plan, CODE, never, tmp_path)
    assert row["status"] == "agent_error"
    assert (row["valid_actions"], row["invalid_actions"], row["turns"]) == (0, 6, 6)
    assert row["final_train_py"] == SEED_PY and row["diff"] == ""
    assert all("invalid action" in m["content"] for m in row["messages"][2:] if m["role"] == "user")


def test_insisting_on_editing_prepare_py_is_a_harness_violation(tmp_path):
    hostile = action("edit", "make eval kinder", path="prepare.py", search="def", replace="def")
    row = play([hostile, hostile], CODE, never, tmp_path)
    assert row["status"] == "harness_violation" and "prepare.py" in row["detail"]
    assert row["edit_attempts"] == 0 and row["final_train_py"] == SEED_PY


def test_one_refused_harness_edit_is_forgiven(tmp_path):
    hostile = action("edit", "oops", path="prepare.py", content="x = 1\n")
    row = play([hostile, action("finish")], CODE, never, tmp_path)
    assert row["status"] == "no_edit" and "refused" in row["messages"][3]["content"]


def test_running_an_unchanged_file_is_no_edit_and_trains_nothing(tmp_path):
    row = play([action("read", "look", path="train.py"), action("run")], CODE, never, tmp_path)
    assert row["status"] == "no_edit" and row["exit_code"] is None
    assert SEED_PY in row["messages"][3]["content"]


def test_syntax_retries_run_out(tmp_path):
    plan = [edit(LR, "LEARNING_RATE = (")] + [action("run")] * 3
    row = play(plan, CODE, never, tmp_path)
    assert row["status"] == "syntax_error" and row["edit_attempts"] == 1


def test_server_killed_mid_rollout_raises_server_down_for_the_wave(tmp_path):
    with pytest.raises(ServerDown):
        play([edit(LR, "LEARNING_RATE = 5e-3"), DIE], CODE, never, tmp_path)


def test_a_conditioned_rollout_prefills_every_reply_with_the_stamp(tmp_path):
    stamp = "<val_bpb=0.950 status=success steps=900>"

    async def go():
        with ScriptedResearcher({100: [action("read", path="train.py"), action("finish")]}) as server:
            async with ResearcherClient(server.base_url, "scripted", CODE) as client:
                row = await rollout(dataclasses.replace(spec(), conditioning_stamp=stamp), CODE, client, never)
            return row, server.requests

    row, requests = anyio.run(go)
    validate(row)
    assert row["conditioning_stamp"] == stamp and row["status"] == "no_edit"
    assert all(r["messages"][-1] == {"role": "assistant", "content": stamp} for r in requests)
    assert requests[1]["messages"][2]["content"].startswith(stamp + "{")  # history keeps the stamp
    assert not any(m["content"].startswith("<val_bpb") for m in row["messages"])  # the trace keeps it apart


@pytest.mark.slow
def test_the_real_embedded_researcher_acts_validly_on_llamacpp(training, tmp_path):
    """SmolLM2-135M on llama.cpp, constrained by the hparams schema: every reply is a valid action."""
    pytest.importorskip("llama_cpp.server")
    from rfs import config
    from rfs.hosts import HostsFile, ServerCfg
    from rfs.serve import make_server
    from rfs.setup import embedded_gguf

    cfg = config.load().researcher
    events = EventLog(tmp_path / "events.jsonl")
    server = make_server(cfg, HostsFile(server=ServerCfg(cpus=(0,))), embedded_gguf(), "v0", tmp_path / "server.log", events)

    async def go():
        await server.start()
        try:
            async with ResearcherClient(server.base_url, "v0", cfg) as client:
                return await rollout(spec(), cfg, client, training, events)
        finally:
            await server.stop()

    row = anyio.run(go)
    validate(row)
    assert row["schema_enforced"] and row["invalid_actions"] == 0 and row["valid_actions"] >= 1
    assert row["edit_attempts"] >= 1 and row["status"] in ("success", "crash", "timeout"), row["detail"]


def test_the_researcher_time_cap_stops_the_loop(tmp_path):
    async def go():
        with ScriptedResearcher({100: [action("read", path="train.py")] * 6}) as server:
            async with ResearcherClient(server.base_url, "scripted", CODE) as client:
                return await rollout(spec(), CODE, client, never, wall_s=1e-9)  # spent by the first reply

    row = anyio.run(go)
    validate(row)
    assert row["turns"] == 1 and row["status"] == "no_edit" and "cap on researcher time" in row["detail"]
