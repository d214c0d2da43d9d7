"""A whole experiment in seconds, for the loop tests: the real driver over SleepEnv, the scripted
researcher (the one test double) and a tiny random Llama-shaped researcher that really trains.

    python -m tests.loop_child RUN_DIR BASE_URL MODEL_DIR COUNTER [--rounds R] [--rollouts N] [--sleep S] [--tui]

Every rollout reads the `x = N` of the train.py it was given and writes `x = N - (thread + 1)` for
even threads (better: val_bpb = 1 + x/100) and `x = N + 5` for odd ones (worse), so arc B's
seeding, arm F's filtering and CTRL's memory all show in the traces.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rfs import config
from rfs.hosts import HostsFile, SlotCfg
from rfs.loop.driver import drive
from rfs.trace import SHARED
from rfs.rehearsal.plans import plans  # noqa: F401  (the replies the loop tests script)
from rfs.rundir import RunDir
from rfs.rehearsal.jobs import SleepEnv

LOOPS = (SHARED, "A-S", "A-F", "B-S", "B-F", "CTRL", "FLOOR", "CTRL-B", "FLOOR-B")  # the lines without arm S's controls
CONTROL_LINES = ("A-S-placebo", "A-S-noprefill")


def experiment(model_dir: Path, base_url: str, rounds: int = 2, rollouts: int = 2, probes: bool = True,
               controls: tuple[str, ...] = (), replicates: int = 1, arcs: tuple[str, ...] = ("A", "B"),
               arms: tuple[str, ...] = ("S", "F"), mirror: str = "") -> config.Config:
    return config.load(None, {
        "mirror": {"url": mirror},
        "experiment": {"preset": "cluster", "name": "matrix", "arcs": list(arcs), "arms": list(arms),
                       "baselines": ["CTRL", "FLOOR"], "max_rounds": rounds, "controls": list(controls),
                       "replicates": replicates},
        "env": {"name": "builtin", "budget_s": 0.05, "timeout_s": 30.0, "calibration_k": 2},
        "researcher": {"backend": "external", "base_url": base_url + "/v1", "model": str(model_dir),
                       "action_space": "code", "max_turns": 4, "turn_timeout_s": 30.0},
        "collect": {"rollouts": rollouts},
        "consolidate": {"lora_r": 4, "lora_alpha": 4, "epochs": 1.0, "max_seq_len": 2048, "batch_tokens": 2048,
                        "kl_prompts": 2, "reason": "test: a tiny model fits in seconds"},
        "loop": {"floor_waves": 1, "max_concurrent": 6, "eval_every": 2 if probes else 0},
        "eval": {"zero_shot_rollouts": 2},
    })


def hosts(slots: int = 2) -> HostsFile:
    return HostsFile(slot=tuple(SlotCfg(name=f"s{i}") for i in range(slots)))


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("run_dir", "base_url", "model_dir", "counter"):
        p.add_argument(name)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rollouts", type=int, default=2)
    p.add_argument("--no-probes", action="store_true", help="loop.eval_every = 0")
    p.add_argument("--replicates", type=int, default=1)
    p.add_argument("--small", action="store_true", help="arc A, arm S only (with CTRL and FLOOR)")
    p.add_argument("--sleep", type=float, default=0.05, help="seconds each job sleeps")
    p.add_argument("--mirror", default="", help="mirror.url")
    p.add_argument("--tui", action="store_true", help="the TUI, as on a terminal (stdout must be one)")
    a = p.parse_args()
    cfg = experiment(Path(a.model_dir), a.base_url, a.rounds, a.rollouts, probes=not a.no_probes,
                     replicates=a.replicates, mirror=a.mirror, **({"arcs": ("A",), "arms": ("S",)} if a.small else {}))
    drive(cfg, RunDir(Path(a.run_dir)), hosts(), plain=not a.tui, env=SleepEnv(Path(a.counter), a.sleep))


if __name__ == "__main__":
    main()
