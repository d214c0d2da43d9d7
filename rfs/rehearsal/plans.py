"""The scripted researcher's replies for a whole experiment (the loop tests and the rehearsal).

Every rollout reads the `x = N` of the train.py it was given and writes `x = N - (thread + 1)` for
even threads (better: val_bpb = 1 + x/100) and `x = N + 5` for odd ones (worse), so arc B's
seeding, arm F's filtering and CTRL's memory all show in the traces.

    python -m rfs.rehearsal.plans EXPERIMENT.toml ROUNDS serve MODEL --port P ...

is the stand-in `vllm` serving them (the `vllm` executable `rfs rehearse` writes).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from rfs import config
from rfs.loop.plan import rollout_seed
from rfs.rehearsal import vllm_standin
from rfs.rehearsal.scripted_researcher import action


def _edit(thread: int):
    def reply(messages: list[dict[str, Any]]) -> str:
        given = int(re.search(r"x = (-?\d+)", next(m["content"] for m in messages if m["role"] == "user")).group(1))
        x = given - (thread + 1) if thread % 2 == 0 else given + 5
        return action("edit", path="train.py", content=f"x = {x}\n")
    return reply


def plans(cfg: config.Config, rounds: int) -> dict[int, list]:
    """A plan for every rollout seed the driver will use, keyed as the scripted researcher expects
    (every line of a replicate draws the same seeds: the design is paired)."""
    return {
        rollout_seed(cfg.experiment.seed, k, r, t): [_edit(t), action("run"), action("finish")]
        for k in range(cfg.experiment.replicates) for r in range(1, rounds + 1) for t in range(cfg.collect.rollouts)
    }


if __name__ == "__main__":
    sys.exit(vllm_standin.main(sys.argv[3:], plans(config.load(Path(sys.argv[1])), int(sys.argv[2]))))
