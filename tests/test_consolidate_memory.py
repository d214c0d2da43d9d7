"""The fit's memory estimate: its arithmetic on known shapes (CPU only)."""

from __future__ import annotations

import dataclasses

import pytest

from rfs.config import ConsolidateCfg
from rfs.consolidate.memory import GIB, FitTooLarge, check, estimate, max_memory, param_count

# Qwen2.5-32B's and Qwen2.5-7B's config.json shapes
QWEN_32B = {"hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 40,
            "num_key_value_heads": 8, "vocab_size": 152064, "tie_word_embeddings": False}
QWEN_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False}


def test_parameter_counts_match_the_published_sizes():
    # published: 32.5 B and 7.6 B (biases on q/k/v, a few M, are left out)
    assert param_count(QWEN_32B) / 1e9 == pytest.approx(32.5, rel=0.01)
    assert param_count(QWEN_7B) / 1e9 == pytest.approx(7.6, rel=0.01)


def test_lora_and_the_parts_add_up():
    cfg = ConsolidateCfg()
    e = estimate(QWEN_7B, cfg)
    h, i, kv, layers = 3584, 18944, 512, 28
    per_layer = 64 * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h))  # q, o; k, v; gate, up; down
    assert e.lora_params == layers * per_layer
    assert e.lora_gib == pytest.approx(e.lora_params * 16 / GIB)
    assert e.weights_gib == pytest.approx(param_count(QWEN_7B) * 2 / GIB)
    assert e.logits_gib == pytest.approx(16384 * 152064 * 8 / GIB)
    assert e.total_gib == pytest.approx(e.weights_gib + e.lora_gib + e.activations_gib + e.logits_gib)
    assert "GiB" in e.line() and "1 device" in e.line()


def test_checkpointing_cuts_activations_and_32b_needs_more_than_one_h100():
    cfg = ConsolidateCfg()
    on, off = estimate(QWEN_32B, cfg), estimate(QWEN_32B, dataclasses.replace(cfg, gradient_checkpointing=False))
    assert off.activations_gib > 10 * on.activations_gib
    assert on.total_gib > 80 and estimate(QWEN_32B, cfg, devices=4).per_device_gib() < 80
    half = estimate(QWEN_32B, dataclasses.replace(cfg, batch_tokens=8192))
    assert half.activations_gib == pytest.approx(on.activations_gib / 2)


def test_a_fit_that_cannot_fit_is_refused_and_a_spread_one_gets_per_gpu_budgets():
    cfg = ConsolidateCfg()
    one = estimate(QWEN_32B, cfg)  # ~61 GiB of bf16 weights alone, plus activations and logits
    with pytest.raises(FitTooLarge, match="consolidate.devices"):
        check(one, [80.0])
    check(one, [])  # devices unknown (CPU): printed, not checked
    four = estimate(QWEN_32B, cfg, devices=4)
    check(four, [80.0] * 4)
    budgets = max_memory(four, [80.0] * 4)
    rest = (four.total_gib - four.weights_gib) / 4
    assert budgets == {i: int((80.0 - rest) * GIB) for i in range(4)}
    assert sum(budgets.values()) > four.weights_gib * GIB  # the weights fit within the budgets
