"""What the researcher reads: the system prompt, the first user message and every observation.

Observations are plain text in user messages (llama.cpp chat templates do not all accept a `tool`
role without tool calls), each opening with `[observation]` so a reader of the trace can tell
them from the opening brief.
"""

from __future__ import annotations

import math
from typing import Any

from rfs.agent import hparams
from rfs.envs.base import RunResult

STDOUT_TAIL_CHARS = 2000

_CODE_FORMAT = """\
# How you act
Each reply is exactly one JSON object, one action, and nothing else:
- {{"thought": "...", "action": "edit", "path": "train.py", "search": "<exact text, found once>", "replace": "<new text>"}}
{whole_file}- {{"thought": "...", "action": "read", "path": "train.py", "start": 100, "end": 160}}     (numbered lines 100..160)
- {{"thought": "...", "action": "read", "path": "train.py"}}
- {{"thought": "...", "action": "run"}}     (trains and evaluates train.py; one run per session)
- {{"thought": "...", "action": "finish"}}
Edit with search/replace: a search of a few lines, copied exactly, with the change in replace.
You may edit train.py only. Lower val_bpb is better."""
_WHOLE_FILE = '- {"thought": "...", "action": "edit", "path": "train.py", "content": "<the whole new train.py>"}\n'

_HPARAMS_FORMAT = """\
# How you act
Each reply is exactly one JSON object, one action, and nothing else:
- {"thought": "...", "action": "set", "name": "<a hyperparameter>", "value": <a value in its range>}
- {"thought": "...", "action": "run"}     (trains and evaluates train.py; one run per session)
- {"thought": "...", "action": "finish"}
Lower val_bpb is better."""


# The hparams space acts on the hyperparameter block alone, so its opening is that block plus this
# contract, not program.md + the whole train.py: 410 tokens instead of 3,093 with SmolLM2's template,
# so every example fits the fit's sequence length whole (the same opening for every line).
_HPARAMS_CONTRACT = ("You tune the hyperparameters of a small GPT's train.py; a harness trains it for a fixed "
                     "time budget and reports val_bpb (validation bits per byte; lower is better).")


def system(program_md: str, space: str, memory: str = "", *, whole_file: bool = False) -> str:
    """whole_file: the code space offers whole-file edits (only where the file fits the reply)."""
    parts = [_HPARAMS_CONTRACT if space == "hparams" else program_md.rstrip()]
    if memory:
        parts.append("# What earlier sessions found\n" + memory.rstrip())
    code = _CODE_FORMAT.format(whole_file=_WHOLE_FILE if whole_file else "")
    parts.append(code if space == "code" else _HPARAMS_FORMAT)
    return "\n\n".join(parts)


def first_user(train_py: str, space: str, start_val_bpb: float) -> str:
    known = f"{start_val_bpb:.4f}" if math.isfinite(start_val_bpb) else "unknown"
    if space == "hparams":
        text = f"train.py's val_bpb: {known}. The hyperparameters you may set:\n" + hparams.summary(hparams.parse(train_py)) + "\n"
    else:
        text = f"This is train.py (its val_bpb: {known}):\n\n```python\n{train_py}\n```\n"
    return text + "\nReply with your first action."


def observe(text: str) -> str:
    return f"[observation] {text}"


def run_report(result: RunResult) -> str:
    lines = [f"status: {result.status}"]
    if result.status == "success":
        lines.append(f"val_bpb: {result.val_bpb:.4f}")
    lines += [f"steps: {result.steps}", f"training_seconds: {result.training_seconds:.1f}"]
    if result.detail:
        lines.append(f"detail: {result.detail}")
    tail = result.stdout_tail[-STDOUT_TAIL_CHARS:]
    return "\n".join(lines) + f"\n\nstdout (tail):\n{tail}\n\nThe run is done; reply with finish."


def render(tok: Any, messages: list[dict[str, str]], stamp: str = "") -> str:
    """The text of a conversation up to the researcher's next reply, in the model's own chat
    template, then the stamp that reply opens with. The one rendering for both sides: arm S's
    conditioned requests (rfs.agent.client) and the prompts training and its anchor see
    (rfs.consolidate.dataset), so the stamp sits in exactly the same place in both."""
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + stamp
