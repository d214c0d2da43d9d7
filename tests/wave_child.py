"""A real wave controller for tests and benchmarks: run_wave over the scripted researcher and SleepEnv
(rfs/rehearsal/jobs.py: the stand-in jobs, re-exported here for the tests).

    python -m tests.wave_child RUN_DIR BASE_URL COUNTER --n N --slots K --sleep S
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import anyio

from rfs import config
from rfs.collect.slots import SlotPool
from rfs.collect.wave import run_wave
from rfs.events import EventLog
from rfs.hosts import HostsFile, Slot
from rfs.rehearsal.jobs import SEED_TRAIN_PY, SleepEnv  # noqa: F401  (re-exported for the tests)
from rfs.rundir import RunDir


def specs(n: int, *, loop: str = "A-S", round_: int = 1) -> list:
    from rfs.agent.rollout import RolloutSpec

    return [
        RolloutSpec(
            experiment="wave-test", loop=loop, arc="A", round=round_, version=0, thread=i,
            rollout_id=f"{loop}-r{round_}-t{i:03d}", seed=seed(i), start_train_py=SEED_TRAIN_PY,
            start_val_bpb=math.nan, memory="", conditioning_stamp="", researcher_model="scripted",
            researcher_weights_sha256="", env_name="sleep", program_md="Lower val_bpb.\n",
            seed_train_py_sha256="", program_md_sha256="",
        )
        for i in range(n)
    ]


def seed(i: int) -> int:
    return 1000 * (i + 1)  # the scripted researcher tells rollouts apart by seed; far more apart than max_turns


def plans(n: int) -> dict[int, list]:
    """Rollout i writes x = i + 1 (the seed has x = 0), runs it once, and finishes."""
    from rfs.rehearsal.scripted_researcher import action

    return {
        seed(i): [action("edit", path="train.py", content=f"x = {i + 1}\n"), action("run"), action("finish")]
        for i in range(n)
    }


def wave_config(budget_s: float = 1.0, action_space: str = "code", **collect: int) -> config.Config:
    return config.load(
        None,
        {
            "experiment": {"preset": "cluster", "name": "wave-test"},
            "env": {"budget_s": budget_s, "timeout_s": budget_s + 60.0},
            "researcher": {"backend": "vllm", "model": "scripted", "action_space": action_space, "max_turns": 4, "turn_timeout_s": 30.0},
            "collect": collect,
        },
    )


def local_slots(k: int) -> list[Slot]:
    return [Slot(f"s{i}", "local", "localhost", (), -1, sys.executable, ".") for i in range(k)]


async def wave(root: Path, base_url: str, env: SleepEnv, n: int, k: int, cfg: config.Config | None = None, **kw) -> Path:
    """One run_wave with a fresh client, pool and event log, as a controller process would do it."""
    from rfs.agent.client import ResearcherClient

    cfg = cfg or wave_config(budget_s=env.seconds)
    run = RunDir(Path(root))
    events = EventLog(run.events)
    pool = SlotPool(local_slots(k), cfg.collect, events)
    async with ResearcherClient(base_url, "scripted", cfg.researcher) as client:
        try:
            return await run_wave(run, kw.pop("specs", None) or specs(n), cfg=cfg, env=env, pool=pool,
                                  hosts=HostsFile(), client=client, events=events, **kw)
        finally:
            events.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("base_url")
    p.add_argument("counter")
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--sleep", type=float, default=0.3)
    a = p.parse_args()
    out = anyio.run(wave, Path(a.run_dir), a.base_url, SleepEnv(Path(a.counter), a.sleep), a.n, a.slots)
    print(out, flush=True)


if __name__ == "__main__":
    main()
