"""Consolidation: one round's traces → dataset (stamp/filter, mask, replay) → LoRA with a KL anchor
to V0 → merged model V_{n+1}. `consolidate()` is the entry point; `render_prompt_with_prefill()` is
what arm-S collection uses to put the stamp exactly where training put it."""

from rfs.consolidate.dataset import prefill_ids, render_prompt_with_prefill
from rfs.consolidate.round import consolidate

__all__ = ["consolidate", "prefill_ids", "render_prompt_with_prefill"]
