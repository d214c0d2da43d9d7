"""Research environments: where a train.py becomes a trustworthy val_bpb."""

from __future__ import annotations

from typing import Callable

from rfs.config import EnvCfg
from rfs.envs.autoresearch import AutoresearchEnv
from rfs.envs.base import Environment, RunResult
from rfs.envs.builtin import BuiltinEnv
from rfs.hosts import Slot
from rfs.launch.base import JobOutcome, Launcher


def environment(cfg: EnvCfg) -> Environment:
    if cfg.name == "builtin":
        return BuiltinEnv(cfg)
    return AutoresearchEnv(cfg)


async def execute(
    env: Environment,
    launcher: Launcher,
    slot: Slot,
    train_py: str,
    rollout_id: str,
    on_line: Callable[[str], None] | None = None,
) -> tuple[RunResult, JobOutcome]:
    """Train and evaluate one train.py on a slot: the environment's job, run by the launcher."""
    outcome = await launcher.run(slot, env.job(train_py, slot, rollout_id), on_line)
    return env.result(outcome), outcome


__all__ = ["Environment", "RunResult", "environment", "execute"]
