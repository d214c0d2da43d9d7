"""The tests' tiny researcher (rfs/rehearsal/tiny_model.py builds it) and realistic trace rows for it."""

from __future__ import annotations

import math

from rfs import trace
from rfs.rehearsal.tiny_model import build  # noqa: F401  (the tests build their model here)

PROGRAM_MD = "You are a careful ML researcher. Edit train.py to lower val_bpb. Reply with one JSON action."
TRAIN_PY = "def train(model, data, lr=3e-4, steps=100):\n    for step in range(steps):\n        loss = model(data)\n"


def messages(reasoning: str = "lower the learning rate", log: str = "val_bpb: 1.234\nsteps: 120") -> list[dict]:
    """A realistic two-action conversation in the agent's convention (thought kept in `reasoning`)."""
    return [
        {"role": "system", "content": PROGRAM_MD, "reasoning": ""},
        {"role": "user", "content": "train.py:\n" + TRAIN_PY, "reasoning": ""},
        {"role": "assistant", "content": '{"action": "set", "name": "lr", "value": 0.001}', "reasoning": reasoning},
        {"role": "tool", "content": "edit applied; syntax ok\n" + log, "reasoning": ""},
        {"role": "assistant", "content": '{"action": "finish"}', "reasoning": "done"},
    ]


def trace_row(rollout_id: str, status: str = "success", val_bpb: float = 1.2, round_: int = 1, loop: str = "A-S",
              start_val_bpb: float = 1.3, steps: int = 120, msgs: list[dict] | None = None) -> dict:
    """A complete trace row (rfs.trace.SCHEMA) with the fields consolidation reads filled in."""
    return trace.new_row(
        experiment="t", loop=loop, arc="A", round=round_, version=round_ - 1, rollout_id=rollout_id,
        host="local", slot="s0", env="builtin", start_val_bpb=start_val_bpb, researcher_model="tiny",
        action_space="hparams", response_schema="{}", schema_enforced=True,
        messages=msgs if msgs is not None else messages(), final_train_py=TRAIN_PY,
        exit_code=0 if status == "success" else 1, status=status, val_bpb=val_bpb if status == "success" else math.nan,
        steps=steps, training_seconds=1.0, wall_seconds=1.0, turns=2, tool_calls=1, valid_actions=2, edit_attempts=1,
        finished_at=1.0,
    )
