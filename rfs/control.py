"""The positive control: one round whose traces make one choice clearly best, consolidated once.

Every synthetic trace opens as the embedded loop does (the compact hparams opening of the built-in
env) and takes one action, `set`. The traces that set TARGET carry the best stamp (success at
GOOD_BPB); every other trace sets something else and carries a bad stamp (success at 3.7-4.2). The
real consolidation (rfs.consolidate.consolidate, from V0) fits them into V1; then V0 and V1, each
served by llama.cpp exactly as a loop serves them, are asked for their first action conditioned on
the good stamp as arm S asks (rfs.loop.round._stamp: the best so far less the stamp margin). V1
must choose TARGET far more often than V0: the instrument's proof that its weight update teaches.
"""

from __future__ import annotations

import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from rfs import trace
from rfs.agent import hparams
from rfs.agent.client import ResearcherClient
from rfs.config import Config, ConsolidateCfg
from rfs.consolidate import consolidate
from rfs.envs import environment
from rfs.evals.behaviour import first_actions, opening
from rfs.hosts import HostsFile
from rfs.rundir import RunDir
from rfs.serve import make_server
from rfs.setup import setup_embedded

LOOP = "A-S"  # arm S: every reply stamped, nothing filtered
TARGET = ("LEARNING_RATE", 0.00134)  # a value of the grid V0 rarely picks (it favours 0.03)
GOOD_BPB, GOOD_STEPS = 3.30, 600
BAD_BPB = (3.7, 4.2)
THOUGHTS = ("Try a change.", "This may lower val_bpb.", "Adjust one hyperparameter.", "A small step.")


def rows(train_py: str, program_md: str, start_bpb: float, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n synthetic trace rows: the first half set TARGET and carry the good stamp, the rest set
    any other value (any name) and carry a bad one. Same opening, same thoughts for both."""
    rng = random.Random(seed)
    params = hparams.parse(train_py)
    others = [(p.name, v) for p in params for v in hparams.grid(p) if (p.name, v) != TARGET]
    messages = opening(program_md, train_py, "hparams", start_bpb)
    out = []
    for i in range(n):
        good = i < (n + 1) // 2
        name, value = TARGET if good else rng.choice(others)
        bpb = GOOD_BPB if good else rng.uniform(*BAD_BPB)
        action = json.dumps({"action": "set", "name": name, "value": value})
        chat = [{**m, "reasoning": ""} for m in messages] + [
            {"role": "assistant", "content": action, "reasoning": THOUGHTS[i % len(THOUGHTS)]}]
        out.append(trace.new_row(
            experiment="control", loop=LOOP, arc="A", round=1, version=0, thread=i, rollout_id=f"control-{i:03d}",
            seed=seed + i, env="builtin", start_val_bpb=start_bpb, action_space="hparams", messages=chat,
            final_train_py=hparams.apply(train_py, name, value), status="success", val_bpb=bpb,
            steps=GOOD_STEPS if good else rng.randint(300, 900), turns=1, valid_actions=1, edit_attempts=1,
        ))
    return out


def good_stamp(margin: float) -> str:
    """What arm S pre-fills once its best so far is the good traces' score (rfs.loop.round._stamp)."""
    return trace.outcome_stamp("success", GOOD_BPB - margin, GOOD_STEPS)


def rate(labels: list[str]) -> float:
    want = f"{TARGET[0]}={TARGET[1]!r}"
    return sum(x == want for x in labels) / len(labels)


async def _sample(cfg: Config, hosts: HostsFile, model_dir: Path, name: str, log: Path, messages: list[dict[str, str]],
                  train_py: str, n: int, stamp: str) -> list[str]:
    server = make_server(cfg.researcher, hosts, model_dir, f"control/{name}", log)
    await server.start()
    try:
        async with ResearcherClient(server.base_url, f"control/{name}", cfg.researcher, model_dir=model_dir,
                                    enforced=server.enforces_schema) as client:
            return await first_actions(client, cfg.researcher, messages, train_py, n, seed=0, prefill=stamp)
    finally:
        await server.stop()


async def control(cfg: Config, hosts: HostsFile, fit: ConsolidateCfg, *, examples: int, samples: int,
                  where: Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Build the round, consolidate it from V0 with `fit`, sample both versions; the figures as a dict."""
    t0 = time.monotonic()
    run = RunDir(Path(where or tempfile.mkdtemp(prefix="rfs-control-")))
    env = environment(cfg.env)
    train_py, program_md = env.seed_train_py(), env.program_md()
    start = 3.475  # the seed's val_bpb as the loop's opening shows it (the embedded calibration, docs/LOG.md)
    path = run.traces(LOOP, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(trace.to_table(rows(train_py, program_md, start, examples, seed)), path)  # validated
    run.logs.mkdir(parents=True, exist_ok=True)
    v0 = setup_embedded()
    t_fit = time.monotonic()
    v1 = consolidate(run, LOOP, 1, v0, v0, fit, None, seed=seed)
    fit_s = time.monotonic() - t_fit
    messages = opening(program_md, train_py, "hparams", start)
    stamp = good_stamp(cfg.loop.stamp_margin)
    t_sample = time.monotonic()
    got = {name: await _sample(cfg, hosts, d, name, run.logs / f"server-control-{name}.log", messages, train_py,
                               samples, stamp) for name, d in (("v0", v0), ("v1", v1))}
    manifest = json.loads((v1 / "manifest.json").read_text())
    r0, r1 = rate(got["v0"]), rate(got["v1"])
    return {
        "target": f"{TARGET[0]}={TARGET[1]!r}", "stamp": stamp, "examples": examples, "samples": samples,
        "rate_v0": r0, "rate_v1": r1, "ratio": r1 / r0 if r0 else float("inf"),
        "fit": {k: getattr(fit, k) for k in ("epochs", "lr", "lora_r", "batch_tokens", "kl_lambda")},
        "steps": manifest["steps"], "loss_before": manifest["loss_before"], "loss_after": manifest["loss_after"],
        "fit_s": round(fit_s, 1), "sample_s": round(time.monotonic() - t_sample, 1),
        "wall_s": round(time.monotonic() - t0, 1), "run": str(run.root),
        "top_v0": _top(got["v0"]), "top_v1": _top(got["v1"]),
    }


def _top(labels: list[str]) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for x in labels:
        counts[x] = counts.get(x, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])[:5]


# Where the control's fit departs from the embedded preset's (measured: docs/LOG.md, issue 17):
# the preset's 3 epochs at 1e-3 learn the reply format but not which action the stamp asks for.
FIT = {"epochs": 6.0, "lr": 2e-3, "gradient_checkpointing": False}


def fit_cfg(base: ConsolidateCfg, epochs: float | None = None, lr: float | None = None) -> ConsolidateCfg:
    """The embedded preset's ConsolidateCfg with the control's changes (FIT), then any override."""
    given = {k: v for k, v in (("epochs", epochs), ("lr", lr)) if v is not None}
    return dataclasses.replace(base, **(FIT | given))
