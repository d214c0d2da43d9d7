"""The LoRA fit's memory, estimated from the model's config.json before the fit starts.

Rough by design (within tens of percent): it says whether a shape can fit at all and how many
devices a sharded base needs, so a 32B fit that cannot fit fails in a second, not an hour in.
Parts: the frozen base weights, the LoRA adapters with their gradients and AdamW state (fp32),
the activations of one step of batch_tokens tokens (with gradient checkpointing only each
layer's input is kept, plus one layer recomputed at a time), and the fp32 logits of the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rfs.config import ConsolidateCfg
from rfs.errors import RfsError

GIB = 1 << 30
LORA_BYTES_PER_PARAM = 16  # fp32 weight, fp32 gradient, AdamW's two fp32 moments
# Saved activations per token of one decoder layer, in units of hidden (h) and intermediate (i)
# values: attention's q/k/v/o inputs and outputs, two norms and residuals (~8h), the MLP's
# gate/up/act/product (~4i); flash attention keeps no seq x seq matrix.
ACT_H, ACT_I = 8, 4


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    lora_params: int
    weights_gib: float
    lora_gib: float  # adapters, gradients, optimizer
    activations_gib: float
    logits_gib: float
    devices: int

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.lora_gib + self.activations_gib + self.logits_gib

    def per_device_gib(self) -> float:
        """The base is sharded across devices (a device map splits layers); the rest sits with the
        layers and the head, so it is split too, to first order."""
        return self.total_gib / self.devices

    def line(self) -> str:
        return (f"fit memory (estimate): {self.params / 1e9:.2f} B params {self.weights_gib:.1f} GiB"
                f" + LoRA {self.lora_params / 1e6:.1f} M params with grads and AdamW {self.lora_gib:.2f} GiB"
                f" + activations {self.activations_gib:.1f} GiB + logits {self.logits_gib:.1f} GiB"
                f" = {self.total_gib:.1f} GiB; {self.per_device_gib():.1f} GiB on each of {self.devices} device(s)")


def _shapes(model: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection LoRA may target, per layer."""
    h, i = model["hidden_size"], model["intermediate_size"]
    heads = model["num_attention_heads"]
    head_dim = model.get("head_dim") or h // heads
    kv = model.get("num_key_value_heads", heads) * head_dim
    q = heads * head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def param_count(model: dict[str, Any]) -> int:
    h, layers, vocab = model["hidden_size"], model["num_hidden_layers"], model["vocab_size"]
    per_layer = sum(a * b for a, b in _shapes(model).values()) + 2 * h  # projections and two norms
    embeddings = vocab * h * (1 if model.get("tie_word_embeddings", False) else 2)
    return embeddings + layers * per_layer + h


def estimate(model: dict[str, Any], cfg: ConsolidateCfg, *, weight_bytes: int = 2, devices: int = 1) -> MemoryEstimate:
    """The fit's memory for config.json `model` at cfg's LoRA rank, targets, batch_tokens and
    gradient checkpointing; weights in bf16 (weight_bytes=2) unless told."""
    h, i, layers, vocab = model["hidden_size"], model["intermediate_size"], model["num_hidden_layers"], model["vocab_size"]
    shapes = _shapes(model)
    lora = layers * sum(cfg.lora_r * (a + b) for name, (a, b) in shapes.items() if name in cfg.target_modules)
    tokens, act = cfg.batch_tokens, weight_bytes
    per_layer = tokens * (ACT_H * h + ACT_I * i) * act
    if cfg.gradient_checkpointing:
        activations = tokens * h * act * layers + per_layer  # each layer's input, one layer recomputed
    else:
        activations = per_layer * layers
    logits = tokens * vocab * 4 * 2  # fp32 logits and their gradient
    params = param_count(model)
    return MemoryEstimate(params, lora, params * weight_bytes / GIB, lora * LORA_BYTES_PER_PARAM / GIB,
                          activations / GIB, logits / GIB, max(1, devices))


class FitTooLarge(RfsError):
    """The fit's estimated memory exceeds the devices it would run on."""


def check(est: MemoryEstimate, device_gib: list[float]) -> None:
    """Raise before anything loads when a device's share exceeds the smallest device (unknown: no check)."""
    if device_gib and est.per_device_gib() > min(device_gib):
        raise FitTooLarge(f"{est.line()}, more than the {min(device_gib):.1f} GiB a device has: shard the base over "
                          "more GPUs (consolidate.devices) or lower consolidate.batch_tokens")


def max_memory(est: MemoryEstimate, device_gib: list[float]) -> dict[int, int]:
    """A device map's budget for the weights on each GPU (bytes): its memory less its share of the
    adapters, activations and logits, which the map does not place."""
    rest = (est.total_gib - est.weights_gib) / est.devices
    return {i: int(max(0.0, gib - rest) * GIB) for i, gib in enumerate(device_gib)}
