"""The shared-prefix step: a round's traces open on the same first turn (system prompt, program.md,
train.py), so a step computes that prefix once for every example that shares it, not once each.

Exact, not approximate: the prefix's forward pass stays in the autograd graph, its key/value cache
is repeated for each example's suffix, and the backward pass sums every suffix's gradient into the
one prefix computation, which is what the plain step computes example by example. The loss is the
same sum of cross-entropies over the same trained tokens (tests/test_prefix.py checks loss and
gradients against `fit.batch_loss` on the tiny model). With LoRA dropout on, the prefix shares one
dropout mask where the plain step draws one per example: equal in distribution, not bit for bit.
It needs gradient checkpointing off (the prefix's cache is the point; a 135M model's activations
fit a CPU's memory without it).

The vocabulary projection (a third of a 135M model's matmul weights) runs only at positions with
a trained target, plus the prefix's last: masked prompt tokens need none.

`PrefixBatch` is a step: examples grouped by their common prefix (`batches`); `batch_loss` is the
drop-in for `fit.batch_loss` on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rfs.consolidate.dataset import IGNORE, Example


@dataclass(frozen=True)
class PrefixBatch:
    """One step: examples sharing their first `prefix` tokens (ids and labels alike)."""

    examples: tuple[Example, ...]
    prefix: int

    @property
    def real(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def computed(self) -> int:
        """Token positions the step computes: the prefix once, then each padded suffix."""
        return self.prefix + len(self.examples) * max(len(e.input_ids) - self.prefix for e in self.examples)

    @property
    def trained(self) -> int:
        return sum(sum(t != IGNORE for t in _targets(e)) for e in self.examples)


def _targets(e: Example) -> list[int]:
    return e.labels[1:] + [IGNORE]  # as fit._targets: shifted within the example


def common_prefix(examples: list[Example] | tuple[Example, ...]) -> int:
    """The longest run of leading positions where every example has the same id and label, kept
    one short of the shortest example so that every example has a suffix of at least one token."""
    first, n = examples[0], min(len(e.input_ids) for e in examples) - 1
    p = 0
    while p < n and all(e.input_ids[p] == first.input_ids[p] and e.labels[p] == first.labels[p] for e in examples):
        p += 1
    return p


def batches(examples: list[Example], batch_tokens: int, min_prefix: int = 1) -> list[PrefixBatch]:
    """Steps of examples that share a prefix, each holding at most batch_tokens real tokens.

    The budget counts real tokens, as packing's does, so a step trains on as much as a packed one
    (the same optimization) and computes less. Examples are ordered by their ids (so equal
    openings sit together) and added to a step while it still shares `min_prefix` tokens.
    """
    ordered = sorted(examples, key=lambda e: (e.input_ids, e.round, e.rollout_id))
    steps: list[PrefixBatch] = []
    group: list[Example] = []
    for e in ordered:
        trial = [*group, e]
        p = common_prefix(trial) if len(trial) > 1 else 0
        fits = PrefixBatch(tuple(trial), p).real <= batch_tokens
        if group and (len(trial) == 1 or (p >= min_prefix and fits)):
            group = trial
            continue
        if group:
            steps.append(PrefixBatch(tuple(group), common_prefix(group) if len(group) > 1 else 0))
        group = [e]
    if group:
        steps.append(PrefixBatch(tuple(group), common_prefix(group) if len(group) > 1 else 0))
    return steps


def batch_loss(model: Any, batch: PrefixBatch, device: str) -> torch.Tensor:
    """Summed cross-entropy over the batch's trained tokens, the shared prefix computed once."""
    exs, p, b = batch.examples, batch.prefix, len(batch.examples)
    if p and getattr(model, "is_gradient_checkpointing", False):
        # checkpointing drops the cache, and its recomputation would append to it a second time
        raise ValueError("the shared-prefix step needs consolidate.gradient_checkpointing = false")
    first = exs[0]
    loss = torch.zeros((), device=device)
    cache = None
    if p:
        head = _targets(first)[: p - 1]
        # the vocabulary projection only at the prefix's trained positions (masked program.md and
        # train.py need none) and at its last, which predicts each example's first suffix token
        keep = [i for i, t in enumerate(head) if t != IGNORE] + [p - 1]
        out = model(input_ids=torch.tensor([first.input_ids[:p]], device=device), use_cache=True,
                    logits_to_keep=torch.tensor(keep, device=device))
        cache = out.past_key_values
        logits = out.logits[0].float()  # [len(keep), V]
        if len(keep) > 1:  # prefix tokens are the same targets in every example, so they count b times
            tgt = torch.tensor([head[i] for i in keep[:-1]], device=device)
            loss = loss + b * torch.nn.functional.cross_entropy(logits[:-1], tgt, reduction="sum")
        # position p-1 predicts each example's first suffix token
        last = torch.tensor([_targets(e)[p - 1] for e in exs], device=device)
        loss = loss + torch.nn.functional.cross_entropy(logits[-1:].expand(b, -1), last, ignore_index=IGNORE,
                                                        reduction="sum")
        cache.batch_repeat_interleave(b)  # the one prefix, seen by every suffix (repeats stay in the graph)
    width = max(len(e.input_ids) - p for e in exs)
    ids = torch.zeros((b, width), dtype=torch.long)
    tgt = torch.full((b, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((b, p + width), dtype=torch.long)
    mask[:, :p] = 1
    for i, e in enumerate(exs):
        n = len(e.input_ids) - p
        ids[i, :n] = torch.tensor(e.input_ids[p:])
        tgt[i, :n] = torch.tensor(_targets(e)[p:])
        mask[i, p : p + n] = 1
    positions = torch.arange(p, p + width).expand(b, width)
    # the vocabulary projection only where some example has a trained target (tool output is masked)
    cols = (tgt != IGNORE).any(dim=0).nonzero().flatten()
    logits = model(input_ids=ids.to(device), position_ids=positions.to(device), attention_mask=mask.to(device),
                   past_key_values=cache, use_cache=cache is not None, logits_to_keep=cols.to(device)).logits
    return loss + torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tgt[:, cols].flatten().to(device),
                                                    ignore_index=IGNORE, reduction="sum")
