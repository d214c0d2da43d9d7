"""The positive control: its synthetic round (fast), and the whole control through llama.cpp (slow)."""

from __future__ import annotations

import json

import anyio
import pytest

from rfs import config, hosts, trace
from rfs.agent import hparams
from rfs.consolidate import dataset
from rfs.control import BAD_BPB, GOOD_BPB, TARGET, control, fit_cfg, good_stamp, rows
from rfs.envs import environment
from rfs.evals.behaviour import opening


def _round(n=12):
    env = environment(config.load(None).env)
    return env, rows(env.seed_train_py(), env.program_md(), 3.475, n)


def test_one_value_always_carries_the_best_stamp():
    env, out = _round()
    trace.to_table(out)  # every row is a valid trace row
    acts = [json.loads(r["messages"][-1]["content"]) for r in out]
    good = [r for r, a in zip(out, acts) if (a["name"], a["value"]) == TARGET]
    bad = [r for r, a in zip(out, acts) if (a["name"], a["value"]) != TARGET]
    assert len(good) == len(bad) == 6
    assert all(dataset.stamp_of(r) == trace.outcome_stamp("success", GOOD_BPB, r["steps"]) for r in good)
    assert all(BAD_BPB[0] <= r["val_bpb"] <= BAD_BPB[1] for r in bad)
    assert max(r["val_bpb"] for r in good) < min(r["val_bpb"] for r in bad)
    # the loop's own compact opening, and the value applied to the file is one the grid offers
    assert all([m["content"] for m in r["messages"][:2]] ==
               [m["content"] for m in opening(env.program_md(), env.seed_train_py(), "hparams", 3.475)] for r in out)
    params = {p.name: p for p in hparams.parse(env.seed_train_py())}
    assert all(a["value"] in hparams.grid(params[a["name"]]) for a in acts)
    # arm S keeps them all (nothing filtered), each reply stamped with its own outcome
    assert len(dataset.select(out, "A-S", None)) == len(out)


def test_the_conditioning_stamp_is_the_good_traces_score_less_the_margin():
    assert good_stamp(0.01) == f"<val_bpb={GOOD_BPB - 0.01:.3f} status=success steps=600>"
    base = config.load(None).consolidate
    assert fit_cfg(base, lr=5e-3).lr == 5e-3 and fit_cfg(base).lora_r == base.lora_r


@pytest.mark.slow
def test_v1_chooses_the_best_stamped_value_far_more_often_than_v0(tmp_path):
    cfg = config.load(None)
    res = anyio.run(lambda: control(cfg, hosts.load(None), fit_cfg(cfg.consolidate), examples=16, samples=50,
                                    where=tmp_path))
    assert res["rate_v1"] >= res["rate_v0"] + 0.3, res
