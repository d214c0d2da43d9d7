"""CTRL's memory: the experience a gold loop puts into weights, put into the prompt instead.

The rule (docs/ctrl_memory.md): CTRL's memory holds what arm S trains on — every usable trace of
CTRL's own earlier rounds (all but infra_error and the seed controls, failures included) — in
tokens of the researcher's own tokenizer, within half of the served context window left after the
fixed prompt (program.md and the starting train.py); the other half is the conversation's. When
the traces do not all fit, the ones kept hold successes and failures in the proportion the rounds
had (successes best first, failures most recent first). A conversation that still overflows the
window is the researcher's failure (status context_overflow), never a dropped infra_error.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Any, Callable

from rfs.config import Config
from rfs.serve.llamacpp import N_CTX

HEADER = "## Memory of your past experiments (successes best first, then failures; val_bpb lower is better)\n"
# Without the researcher's tokenizer (an external server), tokens are bounded from characters: BPE
# tokenizers put 3.5–4 characters of English or code in a token, so 3 overestimates the tokens.
CHARS_PER_TOKEN = 3

Count = Callable[[str], int]


def context_window(cfg: Config) -> int:
    """The served context window: llama.cpp's n_ctx, vLLM's max_model_len (an external server is
    taken at the max_model_len the config declares for it)."""
    return N_CTX if cfg.researcher.backend == "llamacpp" else cfg.researcher.vllm.max_model_len


def chars_bound(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


@cache
def token_counter(model_dir: Path | None) -> Count:
    """Tokens of a text in the researcher's tokenizer, or the characters' bound without one."""
    if model_dir is None or not (model_dir / "tokenizer_config.json").exists():
        return chars_bound
    from transformers import AutoTokenizer  # train extra, heavy: only when the tokenizer is on disk

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def budget_tokens(cfg: Config, fixed_prompt: str, count: Count) -> int:
    """Half of the window left after the fixed prompt; `loop.ctrl_memory_tokens` caps it lower."""
    half = max(0, (context_window(cfg) - count(fixed_prompt)) // 2)
    cap = cfg.loop.ctrl_memory_tokens
    return min(half, cap) if cap > 0 else half


def usable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What arm S trains on (rfs.consolidate.dataset.select): the researcher's traces with a reply."""
    return [r for r in rows if r["status"] != "infra_error" and not r["seed_control"]
            and any(m["role"] == "assistant" for m in r["messages"])]


def _entry(row: dict[str, Any]) -> str:
    bpb = row["val_bpb"]
    outcome = f"val_bpb={bpb:.4f}" if isinstance(bpb, float) and math.isfinite(bpb) else "no val_bpb"
    changed = [l for l in row["diff"].splitlines() if l[:1] in "+-" and l[:3] not in ("+++", "---")]
    body = "\n".join(changed) or "(no change to train.py)"
    return f"- round {row['round']}: {outcome}, status={row['status']}, steps={row['steps']}\n{body}\n"


def choose(rows: list[dict[str, Any]], budget: int, count: Count) -> list[dict[str, Any]]:
    """The traces the memory holds: each next one from whichever group (successes, failures) is
    furthest below its share of the rows, while entries fit; an entry too long to fit is passed over."""
    rows = usable(rows)
    ok = sorted((r for r in rows if r["status"] == "success"), key=lambda r: r["val_bpb"])
    failed = sorted((r for r in rows if r["status"] != "success"), key=lambda r: (-r["round"], r["rollout_id"]))
    share = len(ok) / len(rows) if rows else 0.0
    used, chosen = count(HEADER), []
    while ok or failed:
        taken_ok = sum(r["status"] == "success" for r in chosen)
        group = ok if ok and (not failed or taken_ok < share * (len(chosen) + 1)) else failed
        row = group.pop(0)
        cost = count(_entry(row))
        if used + cost <= budget:
            chosen.append(row)
            used += cost
    return chosen


def build_memory(rows: list[dict[str, Any]], budget: int, count: Count = chars_bound) -> str:
    """Rows are trace rows from earlier rounds; the text fits `budget` tokens as `count` counts them."""
    chosen = choose(rows, budget, count)
    while chosen:  # entries counted apart may merge a token at a seam: the whole text is what counts
        ok = sorted((r for r in chosen if r["status"] == "success"), key=lambda r: r["val_bpb"])
        text = HEADER + "".join(_entry(r) for r in ok + [r for r in chosen if r["status"] != "success"])
        if count(text) <= budget:
            return text
        chosen.pop()
    return ""
