"""Consolidation: one round's traces → dataset (stamp/filter, mask, replay) → LoRA with a KL anchor
to V0 → merged model V_{n+1}. `consolidate()` is the entry point."""

from rfs.consolidate.round import consolidate

__all__ = ["consolidate"]
