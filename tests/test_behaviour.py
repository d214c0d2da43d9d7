"""The behaviour shift: first actions of V_n, V_{n-1} and V0 through real HTTP (the scripted
researcher, a TEST DOUBLE, stands in for each version's server), recorded in metrics/behaviour."""

from __future__ import annotations

import json
from types import SimpleNamespace

import anyio
import pytest

from rfs import config, tables
from rfs.agent.client import ResearcherClient
from rfs.envs import environment
from rfs.evals import behaviour
from rfs.rundir import RunDir
from scripted_researcher import ScriptedResearcher, action

N = 6


def _set(name: str, value: float) -> str:
    return action("set", name=name, value=value)


V0_REPLIES = [_set("LEARNING_RATE", 0.03)] * 4 + [_set("DEPTH", 3)] * 2
V0_AGAIN = [_set("LEARNING_RATE", 0.03)] * 3 + [_set("DEPTH", 3)] * 3  # other seeds: TV 1/6 from V0's


class FakeServers:
    """TEST DOUBLE for rfs.loop.serving.Servers: each (key, version) is a scripted researcher on loopback."""

    def __init__(self, cfg: config.Config, by_version: dict[tuple[str, int], ScriptedResearcher]):
        self.cfg, self.by_version, self.asked = cfg, by_version, []

    async def serve(self, key: str, version: int) -> SimpleNamespace:
        self.asked.append((key, version))
        server = self.by_version[(key, version)]
        return SimpleNamespace(client=ResearcherClient(server.base_url, "scripted", self.cfg.researcher))


def _ex(tmp_path, by_version):
    cfg = config.load(None, {"eval": {"behaviour_samples": N}})
    return SimpleNamespace(cfg=cfg, env=environment(cfg.env), noise=SimpleNamespace(mean=3.475),
                           run=RunDir(tmp_path), servers=FakeServers(cfg, by_version))


def _plans(replies):
    return {0: list(replies), behaviour.NOISE_SEED_OFFSET: list(V0_AGAIN)}


def _row(run, r):
    return next(x for x in tables.read(run.metrics("behaviour"), behaviour.SCHEMA).to_pylist() if x["round"] == r)


def test_a_version_that_changed_is_measured_against_v0_and_its_parent(tmp_path):
    v1 = [_set("LEARNING_RATE", 0.00134)] * 6
    v2 = [_set("LEARNING_RATE", 0.00134)] * 3 + [_set("LEARNING_RATE", 0.03)] * 3
    with ScriptedResearcher(_plans(V0_REPLIES)) as s0, ScriptedResearcher(_plans(v1)) as s1, \
            ScriptedResearcher(_plans(v2)) as s2:
        ex = _ex(tmp_path, {("v0", 0): s0, ("A-S", 1): s1, ("A-S", 2): s2})
        anyio.run(behaviour.measure, ex, "A-S", 1)
        anyio.run(behaviour.measure, ex, "A-S", 2)
        # every version was asked the loop's opening, the same seeds for each
        first = s1.requests
        assert [r["seed"] for r in first] == list(range(N))
        assert [r["seed"] for r in s2.requests] == list(range(N))
        assert first[0]["messages"][1]["content"].startswith("train.py's val_bpb: 3.4750")
    zero, one, two = (_row(ex.run, r) for r in (0, 1, 2))
    assert zero["tv_noise"] == pytest.approx(1 / 6) and not zero["changed"]
    assert json.loads(one["distribution"]) == {"LEARNING_RATE=0.00134": 6}
    assert one["tv_v0"] == pytest.approx(1.0) and one["tv_prev"] == pytest.approx(1.0) and one["changed"]
    assert two["tv_prev"] == pytest.approx(0.5) and two["tv_v0"] == pytest.approx(0.5)
    top = json.loads(one["top_changes"])
    assert top[0] == ["LEARNING_RATE=0.00134", 0.0, 1.0]
    md = behaviour.behaviour_md(ex.run)
    assert "| A-S | 1 | 6 | 1.00 | 1.00 | 0.17 | changed" in md
    # V0 is sampled once per loop (kept as round 0), not again each round
    assert ex.servers.asked.count(("v0", 0)) == 1


def test_a_researcher_that_did_not_change_says_so(tmp_path):
    same = [_set("LEARNING_RATE", 0.03)] * 4 + [_set("DEPTH", 3)] * 2
    with ScriptedResearcher(_plans(V0_REPLIES)) as s0, ScriptedResearcher(_plans(same)) as s1:
        ex = _ex(tmp_path, {("v0", 0): s0, ("A-S", 1): s1})
        anyio.run(behaviour.measure, ex, "A-S", 1)
    one = _row(ex.run, 1)
    assert one["tv_v0"] == 0.0 and not one["changed"]
    assert "no change beyond sampling noise" in behaviour.behaviour_md(ex.run)


def test_tv_and_top_changes():
    assert behaviour.tv({"a": 2}, {"a": 1}) == 0.0
    assert behaviour.tv({"a": 1}, {"b": 3}) == 1.0
    assert behaviour.top_changes({"a": 3, "b": 1}, {"a": 1, "b": 1, "c": 2}) == [("a", 0.75, 0.25), ("c", 0.0, 0.5)]  # b did not move
