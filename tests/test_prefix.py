"""The shared-prefix step gives the plain step's loss and gradients (within float tolerance) on the
tiny model with LoRA: real traces rendered as consolidation renders them, sharing their first turn."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import tiny_model
from rfs.config import ConsolidateCfg
from rfs.consolidate import dataset, fit, prefix

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
CFG = ConsolidateCfg(lora_r=4, lora_alpha=8, lora_dropout=0.0, max_seq_len=4096, batch_tokens=1 << 16,
                     gradient_checkpointing=False,
                     reason="tiny test model; no dropout, so the two steps are the same function")


@pytest.fixture(scope="module")
def v0(tmp_path_factory) -> Path:
    return tiny_model.build(tmp_path_factory.mktemp("v0"))


def traces(tok, n: int = 4) -> list[dataset.Example]:
    rows = [tiny_model.trace_row(f"r1-{i}", val_bpb=1.2 - 0.01 * i,
                                 msgs=tiny_model.messages(reasoning="idea " * (i + 1), log=f"val_bpb: {1.2 - 0.01 * i:.3f}"))
            for i in range(n)]
    return dataset.examples_of(tok, rows, "A-S", None, CFG.max_seq_len)


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


def masked_opening(e: dataset.Example, n: int) -> dataset.Example:
    return dataclasses.replace(e, labels=[dataset.IGNORE] * n + e.labels[n:])


@pytest.mark.parametrize("opening", ["as rendered", "masked"])
def test_shared_prefix_step_equals_the_plain_step(v0, opening):
    """As rendered, arm S's stamp opens the first reply inside the shared prefix (trained tokens
    there); masked, the prefix is all prompt and only its last position is projected."""
    tok = AutoTokenizer.from_pretrained(v0)
    exs = traces(tok)
    if opening == "masked":
        exs = [masked_opening(e, prefix.common_prefix(exs)) for e in exs]
    model = fit.lora(fit.load(v0, "cpu")[0], CFG, seed=0)
    with torch.no_grad():  # LoRA B starts at zero: move it, so the adapter's gradients are not trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    model.train()
    (steps,) = prefix.batches(exs, CFG.batch_tokens)
    assert steps.prefix >= 64  # the shared first turn (system prompt, program.md, train.py)
    shared = prefix.batch_loss(model, steps, "cpu")
    shared.backward()
    g_shared = grads(model)
    (plain_batch,) = fit.bucketed(exs, CFG.batch_tokens)
    plain = fit.batch_loss(model, plain_batch, "cpu")
    plain.backward()
    g_plain = grads(model)
    assert steps.trained == plain_batch.trained and steps.real == plain_batch.real
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-4)
    assert g_plain and all(g.abs().sum() > 0 for g in g_plain.values())
    for name, g in g_plain.items():  # float32 sums in another order: within 1e-5 of each gradient's scale
        assert (g_shared[name] - g).abs().max() <= 1e-5 * g.abs().max(), name


def test_batches_group_shared_openings_and_keep_everything_once(v0):
    tok = AutoTokenizer.from_pretrained(v0)
    exs = traces(tok, 6)
    other = dataclasses.replace(exs[0], rollout_id="x", input_ids=[7] + exs[0].input_ids[1:])  # a different opening
    steps = prefix.batches([*exs, other], CFG.batch_tokens)
    assert sorted(e.rollout_id for s in steps for e in s.examples) == sorted(e.rollout_id for e in [*exs, other])
    assert [len(s.examples) for s in steps] == [1, 6] or [len(s.examples) for s in steps] == [6, 1]
    six = next(s for s in steps if len(s.examples) == 6)
    assert six.computed < six.real  # the shared opening is computed once, not six times
    small = prefix.batches(exs, batch_tokens=six.real // 2)  # a budget of real tokens splits a group
    assert len(small) > 1 and all(s.real <= six.real // 2 or len(s.examples) == 1 for s in small)
