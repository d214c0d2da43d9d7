"""Research environments: where a train.py becomes a trustworthy val_bpb."""

from __future__ import annotations

from rfs.config import EnvCfg
from rfs.envs.base import Environment, RunResult


def environment(cfg: EnvCfg) -> Environment:
    if cfg.name == "builtin":
        from rfs.envs.builtin import BuiltinEnv

        return BuiltinEnv(cfg)
    from rfs.envs.autoresearch import AutoresearchEnv

    return AutoresearchEnv(cfg)


__all__ = ["Environment", "RunResult", "environment"]
