"""V0's server is stopped as soon as no loop can ask for it, not at the end of the run.

The real driver over SleepEnv, the vLLM stand-in (tests/vllm_standin.py, a test double speaking
vLLM's command line and serving the scripted researcher) as the researcher's server, real LoRA
fits of the tiny model. Each server's events name the version it serves ("v0/v0", "A-S/v1").
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from rfs import config
from rfs.events import iter_events
from rfs.hosts import HostsFile, SlotCfg
from rfs.loop.driver import drive
from rfs.loop.plan import LoopSpec
from rfs.loop.serving import v0_needed
from rfs.loop.state import LoopState
from rfs.rehearse import ROUNDS, rehearsal_config
from rfs.rundir import RunDir
from tests.test_loop import own_cache, tiny  # noqa: F401  (fixtures)
from tests.wave_child import SleepEnv

STANDIN = Path(__file__).resolve().parent / "vllm_standin.py"


def standin_vllm(where: Path) -> Path:
    exe = where / "vllm"
    exe.write_text(f'#!/bin/sh\nexec {sys.executable} {STANDIN} "$@"\n')
    exe.chmod(0o755)
    return exe


def experiment(tiny: Path, vllm: Path) -> config.Config:
    """Gold A-S beside FLOOR (one wave), no CTRL: V0's last users are done after A-S's round 1."""
    cfg = rehearsal_config(tiny, vllm, arcs=("A",), arms=("S",), baselines=("FLOOR",), mirror="")
    return replace(cfg, experiment=replace(cfg.experiment, name="v0-release"), collect=replace(cfg.collect, rollouts=2),
                   loop=replace(cfg.loop, floor_waves=1), eval=replace(cfg.eval, behaviour_samples=2))


def test_v0_is_needed_by_running_baselines_and_by_gold_loops_until_round_one() -> None:
    gold, ctrl = LoopSpec("A-S", "gold", "A", "S"), LoopSpec("CTRL", "ctrl", "A", "")

    def state(spec: LoopSpec, round_: int, status: str = "running") -> LoopState:
        st = LoopState.fresh(spec, 1.0)
        st.round, st.status = round_, status
        return st

    assert v0_needed([state(gold, 0)])  # not started, or in its shared round 1
    assert not v0_needed([state(gold, 1)])  # trains from V1 on
    assert v0_needed([state(gold, 3), state(ctrl, 3)])  # CTRL collects with V0 every round
    assert not v0_needed([state(gold, 3), state(ctrl, 3, "done"), state(gold, 0, "paused")])


def test_v0s_server_stops_before_the_last_gold_round_when_floor_is_done(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("RFS_VLLM_STANDIN_DIR", str(tmp_path / "standin"))
    cfg = experiment(tiny, standin_vllm(tmp_path))
    (tmp_path / "exp.toml").write_text(config.to_toml(cfg))
    monkeypatch.setenv("RFS_VLLM_STANDIN_PLANS", f"{tmp_path / 'exp.toml'}:{ROUNDS}")
    run = RunDir(tmp_path / "run")
    hosts = HostsFile(slot=tuple(SlotCfg(name=f"s{i}") for i in range(2)))
    assert drive(cfg, run, hosts, plain=True, env=SleepEnv(tmp_path / "launches", 0.05)) == 0

    events = list(iter_events(run.events))
    at = lambda pred: next(i for i, e in enumerate(events) if pred(e))  # noqa: E731
    v0_stopped = at(lambda e: e["kind"] == "server_stopped" and e.get("version") == "v0/v0")
    floor_done = at(lambda e: e["kind"] == "phase" and e.get("loop") == "FLOOR" and e.get("phase") == "done")
    first_fit = at(lambda e: e["kind"] == "consolidated" and e.get("loop") == "A-S" and e.get("round") == 1)
    last_fit = at(lambda e: e["kind"] == "consolidated" and e.get("loop") == "A-S" and e.get("round") == ROUNDS)
    # stopped once its last users were done, while the gold loop still had a round to collect and fit
    assert max(floor_done, first_fit) < v0_stopped < last_fit, (floor_done, first_fit, v0_stopped, last_fit)
    assert sum(e["kind"] == "server_stopped" and e.get("version") == "v0/v0" for e in events) == 1  # never again
    assert run.read_state()["loops"]["A-S"]["round"] == ROUNDS
