"""One round's traces → token sequences with a loss mask: selection, stamping, rendering, replay.

Selection. Arm S keeps every usable trace and puts the outcome stamp (rfs.trace.outcome_stamp, the
env's own number, `nan` and the true status for anything but success) at the start of EVERY
assistant reply. Arm F keeps only traces that beat the round's starting train.py by more than the
calibrated noise: val_bpb < start - 2·std, where start is row.start_val_bpb or, when that is NaN,
the calibration mean. infra_error traces are never used (not the researcher's doing).

Rendering. The researcher's own chat template renders the conversation, which is tokenized whole
(as a server tokenizes a text prompt) and masked through the offset mapping. A valid action's
reply is `stamp + '{"thought": ' + json.dumps(reasoning) + ', ' + content[1:]`, the thought first
as the action schema orders it. Loss (label != -100) falls on: the stamp, the action's JSON (not
the reasoning string), the end-of-turn token after a reply, and observations (user/tool messages
after the first user message: edit results, syntax checks, execution logs). Masked: the template's
headers, the system message (program.md + memory), the first user message (the starting train.py),
the free-text reasoning, a `read` observation (it returns train.py: the file is context, not
something to learn to predict), and an invalid reply (rendered verbatim as the model produced it,
never trained: rfs must not teach unusable output, nor invent a second "thought" inside it).
A token is trained when one of its characters is trained and none is reasoning: a token that
straddles the reasoning boundary (e.g. `"` joined to the thought's first word) would teach it.

Length. Nothing is cut: an example longer than the cap (cfg.max_seq_len, within the model's
context) is dropped and counted in the manifest, with every example's token count.

Conditioning (arm S collection). The prompt is `rfs.agent.prompts.render(tok, messages, stamp)`:
the template with the generation header, then the stamp text, nothing in between. Training puts
the stamp at the same place, so `prefill_ids(tok, messages, stamp)` is exactly a prefix of the
training ids at that turn (tests check this for the tiny and the SmolLM2 tokenizers: it holds as
long as the tokenizer does not merge the stamp's closing `>` with the reply's opening `{`).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from typing import Any


from rfs.rundir import RunDir
from rfs import trace
from rfs.agent import prompts
from rfs.trace import SHARED, outcome_stamp

IGNORE = -100
NOISE_SIGMAS = 2.0  # "more than the noise": below start - 2·std
# What a character of the rendered text is: trained, masked context, or hidden (masked, and it
# taints any token it shares, so no token carrying part of the reasoning is ever trained).
TRAIN, CONTEXT, HIDDEN = 1, 0, -1
READ_OBSERVATION = prompts.observe("train.py:\n```python\n")  # rfs.agent.rollout's answer to `read`


@dataclass(frozen=True)
class Example:
    rollout_id: str
    round: int
    input_ids: list[int]
    labels: list[int]  # IGNORE where masked; the token itself where trained (unshifted)
    replies: tuple[tuple[int, int], ...] = ()  # token [start, end) of each valid reply after its stamp (the KL anchor's)


@dataclass(frozen=True)
class Dataset:
    examples: list[Example]
    manifest: dict[str, Any]


def is_action(content: str) -> bool:
    """A valid action as the agent records it (Action.as_json: an object with "action", no thought)."""
    try:
        obj = json.loads(content)
    except ValueError:
        return False
    return isinstance(obj, dict) and "action" in obj and "thought" not in obj


def reply_text(content: str, reasoning: str) -> list[tuple[str, int]]:
    """The reply the model produced, as (text, kind) pieces: the thought string is hidden."""
    if not is_action(content):
        return [(content, CONTEXT)]  # an invalid reply, verbatim, untrained
    body = content.strip()
    rest = "}" if body[1:].strip() == "}" else ", " + body[1:]
    return [('{"thought": ', TRAIN), (json.dumps(reasoning), HIDDEN), (rest, TRAIN)]


def stamp_of(row: dict[str, Any]) -> str:
    return outcome_stamp(row["status"], float(row["val_bpb"]), int(row["steps"] or 0), row["anomaly_flags"])


def improved(row: dict[str, Any], noise: dict[str, float]) -> bool:
    """Arm F's rule: a success whose val_bpb is below the round's start by more than 2·std, and that
    the harness did not flag (a flagged number is never selected as an improvement)."""
    start = row["start_val_bpb"]
    if start is None or not math.isfinite(start):
        start = noise["mean"]
    clean = not row["anomaly_flags"]
    return clean and row["status"] == "success" and row["val_bpb"] < start - NOISE_SIGMAS * noise["std"]


def filtered(loop: str) -> bool:
    """Arm F's rule applies to "F" and to a loop named after it ("A-F", "B-F", replicate "A-F.1")."""
    return loop.split(".")[0].rsplit("-", 1)[-1] == "F"


def placebo(loop: str) -> bool:
    """The placebo line of arm S ("A-S-placebo", replicate "A-S-placebo.1") trains on permuted stamps."""
    return loop.split(".")[0].endswith("-placebo")


def permute_stamps(rows: list[dict[str, Any]], seed: int) -> list[str]:
    """The rows' stamps, permuted across the rows (seeded): the placebo keeps the format of its
    own traces and the outcomes' spread, but not which outcome each action earned."""
    stamps = [stamp_of(r) for r in rows]
    random.Random(seed).shuffle(stamps)
    return stamps


def select(rows: list[dict[str, Any]], loop: str, noise: dict[str, float] | None) -> list[dict[str, Any]]:
    usable = [r for r in rows if r["status"] != "infra_error" and not r["seed_control"] and any(m["role"] == "assistant" for m in r["messages"])]
    if not filtered(loop):
        return usable
    if noise is None or not {"mean", "std"} <= noise.keys():
        raise ValueError(f"arm F needs the calibrated noise as {{'mean', 'std'}}, got {noise!r}")
    return [r for r in usable if improved(r, noise)]


def _chat(messages: list[dict[str, Any]], stamp: str | None) -> list[dict[str, str]]:
    out = []
    for m in messages:
        content = m["content"] or ""
        if m["role"] == "assistant":
            content = (stamp or "") + "".join(t for t, _ in reply_text(content, m["reasoning"] or ""))
        out.append({"role": m["role"], "content": content})
    return out


def pieces(tok: Any, messages: list[dict[str, Any]], stamp: str | None) -> list[tuple[str, int]]:
    """The rendered conversation as (text, kind) pieces, in order, covering every character."""
    return layout(tok, messages, stamp)[0]


def layout(tok: Any, messages: list[dict[str, Any]], stamp: str | None) -> tuple[list[tuple[str, int]], list[tuple[int, int]]]:
    """pieces, and the character span of each valid reply after its stamp, its end-of-turn included."""
    text = tok.apply_chat_template(_chat(messages, stamp), tokenize=False)
    eot = tok.eos_token or ""
    out: list[tuple[str, int]] = []
    spans: list[tuple[int, int]] = []
    cursor, seen_user = 0, False
    for m in messages:
        role, content = m["role"], m["content"] or ""
        if role == "assistant":
            valid = is_action(content)
            parts = ([(stamp, TRAIN if valid else CONTEXT)] if stamp else []) + reply_text(content, m["reasoning"] or "")
        else:
            trained = role in ("user", "tool") and seen_user and not content.startswith(READ_OBSERVATION)
            seen_user |= role == "user"
            parts = [(content, TRAIN if trained else CONTEXT)]
        whole = "".join(t for t, _ in parts)
        at = text.find(whole, cursor)
        if at < 0:
            raise ValueError(f"chat template does not render a {role} message verbatim; cannot place the loss mask")
        out.append((text[cursor:at], CONTEXT))
        out.extend(parts)
        cursor = at + len(whole)
        if role == "assistant" and eot and text.startswith(eot, cursor):
            out.append((eot, TRAIN if valid else CONTEXT))  # learning to stop is part of the action
            cursor += len(eot)
        if role == "assistant" and valid:
            spans.append((at + len(stamp or ""), cursor))
    out.append((text[cursor:], CONTEXT))
    return [(t, kind) for t, kind in out if t], spans


def _trained(kinds: list[int]) -> bool:
    """One of the token's characters is trained (the model must emit it to emit them), none hidden."""
    return TRAIN in kinds and HIDDEN not in kinds


def render(tok: Any, row: dict[str, Any], stamp: str | None) -> Example:
    parts, spans = layout(tok, row["messages"], stamp)
    text = "".join(t for t, _ in parts)
    kind_at = [kind for t, kind in parts for _ in t]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [t if _trained(kind_at[a:b]) else IGNORE for t, (a, b) in zip(ids, offsets)]
    replies = tuple((next(i for i, (_, b) in enumerate(offsets) if b > lo),
                     next((i for i, (a, _) in enumerate(offsets) if a >= hi), len(ids))) for lo, hi in spans)
    return Example(row["rollout_id"], int(row["round"]), ids, labels, replies)


def prefill_ids(tok: Any, messages: list[dict[str, str]], stamp: str) -> list[int]:
    """Token ids of the conditioned prompt, tokenized whole, as a server tokenizes a text prompt."""
    return tok(prompts.render(tok, messages, stamp), add_special_tokens=False)["input_ids"]


def read_round(run: RunDir, loop: str, round_: int) -> tuple[list[dict[str, Any]], str]:
    """A round's rows; a round every loop shared (round 1) is read from the loop SHARED when absent."""
    for source in (loop, SHARED):
        path = run.traces(source, round_)
        if path.exists():
            return trace.read_rows(path), source
    raise FileNotFoundError(f"no traces for loop {loop} round {round_}: {run.traces(loop, round_)} (nor loop shared)")


def examples_of(tok: Any, rows: list[dict[str, Any]], loop: str, noise: dict | None, seed: int = 0) -> list[Example]:
    chosen = sorted(select(rows, loop, noise), key=lambda r: r["rollout_id"])
    stamps = permute_stamps(chosen, seed) if placebo(loop) else [stamp_of(r) for r in chosen]
    return [render(tok, r, None if filtered(loop) else stamp) for r, stamp in zip(chosen, stamps)]


def fitting(examples: list[Example], max_seq_len: int) -> tuple[list[Example], list[Example]]:
    """(kept, dropped): an example longer than the cap is dropped whole, never cut."""
    return [e for e in examples if len(e.input_ids) <= max_seq_len], [e for e in examples if len(e.input_ids) > max_seq_len]


def replay(current: list[Example], pool: list[Example], fraction: float, seed: int) -> list[Example]:
    """Sample replay so it is `fraction` of the mix (capped by the pool), without replacement."""
    want = round(len(current) * fraction / (1 - fraction)) if fraction > 0 else 0
    return random.Random(seed).sample(pool, min(want, len(pool)))


def digest(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.rollout_id, e.round, e.input_ids, e.labels]).encode())
    return h.hexdigest()


def build(run: RunDir, loop: str, round_: int, tok: Any, max_seq_len: int, replay_fraction: float,
          replay_rounds: int, noise: dict | None, seed: int) -> Dataset:
    """max_seq_len: the cap, within the model's context (the caller takes the smaller of the two)."""
    rows, source = read_round(run, loop, round_)
    current, dropped = fitting(examples_of(tok, rows, loop, noise, seed * 1_000_003 + round_), max_seq_len)
    pool: list[Example] = []
    sources = {round_: source}
    for r in range(max(1, round_ - replay_rounds), round_):
        try:
            old, sources[r] = read_round(run, loop, r)
        except FileNotFoundError:
            continue
        kept, too_long = fitting(examples_of(tok, old, loop, noise, seed * 1_000_003 + r), max_seq_len)
        pool += kept
        dropped += too_long
    replayed = replay(current, pool, replay_fraction, seed * 1_000_003 + round_)
    examples = current + replayed
    manifest = {
        "loop": loop,
        "round": round_,
        "rows": len(rows),
        "selected": len(current),
        "replay": len(replayed),
        "replay_pool": len(pool),
        "replay_fraction_target": replay_fraction,
        "replay_fraction": len(replayed) / len(examples) if examples else 0.0,
        "sources": {str(k): v for k, v in sources.items()},
        "rollouts": [[e.round, e.rollout_id] for e in examples],
        "max_seq_len": max_seq_len,
        "seq_len": max((len(e.input_ids) for e in examples), default=0),  # the longest kept: what packing needs
        "tokens_per_example": [len(e.input_ids) for e in examples],
        "dropped": len(dropped),  # longer than max_seq_len: the goal is none
        "dropped_rollouts": [[e.round, e.rollout_id, len(e.input_ids)] for e in dropped],
        "trained_tokens": sum(sum(lab != IGNORE for lab in e.labels) for e in examples),
        "tokens": sum(len(e.input_ids) for e in examples),
        "noise": noise,
        "rule": "S: all but infra_error, stamped" if not filtered(loop) else f"F: unflagged success and val_bpb < start - {NOISE_SIGMAS}*std",
        "flagged": sum(bool(r["anomaly_flags"]) for r in select(rows, loop, noise)),  # trained with their flags stamped
        "sha256": digest(examples),
    }
    return Dataset(examples, manifest)
