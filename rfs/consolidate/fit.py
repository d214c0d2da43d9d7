"""The LoRA fit: loss on the unmasked tokens plus λ·KL to V0, LR re-warm → cosine.

Batching without cross-contamination, two ways (bench/consolidate.py measures both against TRL's
SFTTrainer; on an H100, bf16: pack 1.76x, bucket 1.31x; on 8 CPU threads both 1.35x):
- pack (default): first-fit-decreasing rows of max_seq_len with position ids restarting per
  example and no attention mask, which transformers turns into a block-diagonal causal mask
  (masking_utils.find_packed_sequence_indices); ~97% of computed positions are real tokens.
- bucket: examples sorted by length, grouped up to batch_tokens of padded size, a padding mask;
  no attention is computed across examples at all, and padding stays small (~96% real).
Targets are shifted per example, so the last token of one example never predicts the next's first.
"""

from __future__ import annotations

import importlib.util
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from rfs.config import ConsolidateCfg
from rfs.consolidate.anchor import Anchor, kl_all, kl_on
from rfs.consolidate.dataset import IGNORE, Example
from rfs.consolidate import prefix
from rfs.consolidate.memory import GIB, FitTooLarge


@dataclass(frozen=True)
class Batch:
    """One optimizer step's tokens, [B, L]; targets are IGNORE on padding and across seams."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None  # None when packed: position resets isolate the examples
    real: int  # tokens that are not padding

    @property
    def trained(self) -> int:
        return int((self.targets != IGNORE).sum())


@dataclass
class FitResult:
    steps: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0
    loss_before: float = math.nan
    loss_after: float = math.nan
    kl_before: float = math.nan
    kl_after: float = math.nan
    val_is_train: bool = False
    train_curve: list[dict[str, float]] = field(default_factory=list)
    val_curve: list[dict[str, float]] = field(default_factory=list)


def _targets(e: Example) -> list[int]:
    """Next-token targets shifted within the example, so no seam is ever a target."""
    return e.labels[1:] + [IGNORE]


def _stack(rows: list[tuple[list[int], list[int], list[int]]], with_mask: bool) -> Batch:
    """Right-pad rows to one width. Padding is its own sequence (positions from 0, no targets)."""
    width = max(len(ids) for ids, _, _ in rows)
    ids, tgt, pos, mask = [], [], [], []
    for i, t, p in rows:
        pad = width - len(i)
        ids.append(i + [0] * pad)
        tgt.append(t + [IGNORE] * pad)
        pos.append(p + list(range(pad)))
        mask.append([1] * len(i) + [0] * pad)
    real = sum(len(i) for i, _, _ in rows)
    return Batch(torch.tensor(ids), torch.tensor(tgt), torch.tensor(pos), torch.tensor(mask) if with_mask else None, real)


def packed(examples: list[Example], max_len: int, batch_tokens: int) -> list[Batch]:
    """First-fit-decreasing rows of <= max_len tokens, batch_tokens // max_len rows per step."""
    bins: list[list[Example]] = []
    room: list[int] = []
    for e in sorted(examples, key=lambda e: (-len(e.input_ids), e.round, e.rollout_id)):
        i = next((i for i, r in enumerate(room) if r >= len(e.input_ids)), None)
        if i is None:
            bins.append([])
            room.append(max_len)
            i = len(bins) - 1
        bins[i].append(e)
        room[i] -= len(e.input_ids)
    rows = [([t for e in b for t in e.input_ids], [t for e in b for t in _targets(e)],
             [p for e in b for p in range(len(e.input_ids))]) for b in bins]
    per = max(1, batch_tokens // max_len)
    return [_stack(rows[i : i + per], with_mask=False) for i in range(0, len(rows), per)]


def bucketed(examples: list[Example], batch_tokens: int) -> list[Batch]:
    """Examples sorted by length and grouped so that padded size stays within batch_tokens.

    Similar lengths pad little, and unlike packed rows no attention is computed across examples.
    """
    ordered = sorted(examples, key=lambda e: (len(e.input_ids), e.round, e.rollout_id))
    groups: list[list[Example]] = []
    for e in ordered:
        if groups and (len(groups[-1]) + 1) * len(e.input_ids) <= batch_tokens:
            groups[-1].append(e)
        else:
            groups.append([e])
    return [_stack([(e.input_ids, _targets(e), list(range(len(e.input_ids)))) for e in g], with_mask=True) for g in groups]


def row_len(examples: list[Example], cfg: ConsolidateCfg) -> int:
    """A packed row: at least the longest example (the dataset drops what exceeds max_seq_len), else
    max_seq_len, or batch_tokens when a step is smaller, so one step is never wider than asked."""
    return max(max((len(e.input_ids) for e in examples), default=1), min(cfg.max_seq_len, cfg.batch_tokens))


def batches(examples: list[Example], cfg: ConsolidateCfg, strategy: str = "pack") -> list[Batch]:
    """One Batch per optimizer step. bench/consolidate.py measures the strategies: "prefix" computes
    the round's shared opening once per step (rfs/consolidate/prefix.py; exact, needs no gradient
    checkpointing), "pack" and "bucket" compute every example whole."""
    if strategy == "prefix":
        return prefix.batches(examples, cfg.batch_tokens)  # type: ignore[return-value]
    if strategy == "pack":
        return packed(examples, row_len(examples, cfg), cfg.batch_tokens)
    if strategy == "bucket":
        return bucketed(examples, cfg.batch_tokens)
    raise ValueError(f"batching strategy {strategy!r}: expected prefix, pack or bucket")


def device_gib(device: str, devices: int) -> list[float]:
    """The memory (GiB) of each GPU the fit runs on; empty on the CPU (nothing to check against)."""
    if not device.startswith("cuda"):
        return []
    if devices > torch.cuda.device_count():
        raise FitTooLarge(f"consolidate.devices = {devices}, but this host has {torch.cuda.device_count()} GPU(s): "
                          "lower it or run the fit on a bigger host")
    return [torch.cuda.get_device_properties(i).total_memory / GIB for i in range(devices)]


def load_kwargs(device: str, max_memory: dict[int | str, int] | None) -> dict[str, Any]:
    """from_pretrained's arguments: bf16 on GPU, fp32 on CPU; with max_memory, a device map that
    spreads the layers over those devices within those budgets (the 32B path)."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if max_memory is None:
        return {"dtype": dtype}
    return {"dtype": dtype, "device_map": "auto", "max_memory": max_memory}


def load(model_dir: Path, device: str, max_memory: dict[int | str, int] | None = None) -> tuple[Any, Any]:
    """The model on `device`, or spread by a device map over max_memory's devices."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, **load_kwargs(device, max_memory))
    if max_memory is None:
        model = model.to(device)
    return model, AutoTokenizer.from_pretrained(model_dir)


def lora(model: Any, cfg: ConsolidateCfg, seed: int) -> Any:
    """LoRA on the configured projections; everything else (embeddings, head) stays frozen."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in cfg.target_modules if t in present]
    if not targets:
        raise ValueError(f"none of {cfg.target_modules} is a module of this model")
    torch.manual_seed(seed)
    spec = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, spec)
    if cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # newer transformers; the old name goes in v6
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def load_for_training(model_dir: Path, cfg: ConsolidateCfg, device: str, seed: int,
                      max_memory: dict[int | str, int] | None = None) -> tuple[Any, Any]:
    """Unsloth's kernels when installed on one GPU (lazy: it pins its own torch), else transformers+peft.

    Both return a peft model over the same base with the same LoRA spec, so fit/merge are shared.
    The unsloth branch is untested here (no GPU in CI).
    """
    if device.startswith("cuda") and max_memory is None and importlib.util.find_spec("unsloth") is not None:
        from unsloth import FastLanguageModel

        model, tok = FastLanguageModel.from_pretrained(str(model_dir), dtype=torch.bfloat16, load_in_4bit=False,
                                                       max_seq_length=cfg.max_seq_len)
        model = FastLanguageModel.get_peft_model(
            model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.target_modules), bias="none", random_state=seed,
            use_gradient_checkpointing="unsloth" if cfg.gradient_checkpointing else False)
        return model, tok
    model, tok = load(model_dir, device, max_memory)
    return lora(model, cfg, seed), tok


def batch_logits(model: Any, batch: Batch, device: str) -> torch.Tensor:
    """No cache: with one, transformers would not detect the packing from the position ids."""
    mask = batch.attention_mask.to(device) if batch.attention_mask is not None else None
    return model(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device),
                 attention_mask=mask, use_cache=False).logits


def batch_loss(model: Any, batch: Batch, device: str) -> torch.Tensor:
    """Summed cross-entropy over the batch's trained tokens."""
    if isinstance(batch, prefix.PrefixBatch):
        return prefix.batch_loss(model, batch, device)
    logits = batch_logits(model, batch, device)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten().to(device),
                                             ignore_index=IGNORE, reduction="sum")


@torch.no_grad()
def eval_loss(model: Any, val: list[Batch], device: str) -> float:
    was = model.training
    model.eval()
    total = sum(float(batch_loss(model, b, device)) for b in val)
    model.train(was)
    return total / max(1, sum(b.trained for b in val))


def schedule(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear re-warm from 0, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def stream(steps: list[Batch], epochs: float, seed: int) -> list[Batch]:
    """Steps in training order: a fresh seeded shuffle per epoch, a fractional last epoch."""
    out: list[Batch] = []
    for e in range(math.ceil(epochs)):
        order = list(range(len(steps)))
        random.Random(seed + e).shuffle(order)
        out += [steps[i] for i in order]
    return out[: max(1, round(epochs * len(steps)))]


def fit(model: Any, train: list[Batch], val: list[Batch], anchor: Anchor | None, cfg: ConsolidateCfg,
        device: str, seed: int, on_step: Callable[[int, float, float], None] | None = None) -> FitResult:
    t0 = time.perf_counter()
    res = FitResult()
    kl_weight = cfg.kl_lambda if anchor is not None and len(anchor) else 0.0
    steps = stream(train, cfg.epochs, seed)
    total, warmup = len(steps), max(1, math.ceil(cfg.warmup_ratio * len(steps)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, total, warmup))
    eval_every = max(1, total // 4)
    res.loss_before = eval_loss(model, val, device)
    res.kl_before = kl_all(model, anchor, device) if anchor is not None else math.nan
    res.val_curve.append({"step": 0, "loss": res.loss_before})
    torch.manual_seed(seed)  # dropout masks: a rerun after a crash repeats the same fit
    model.train()
    for step, batch in enumerate(steps, start=1):
        loss = batch_loss(model, batch, device) / max(1, batch.trained)
        loss.backward()
        loss_value = float(loss.detach())
        res.tokens_seen += batch.real
        kl = 0.0
        if kl_weight:
            kl_t = kl_on(model, anchor, (step - 1) % len(anchor), device)
            (kl_weight * kl_t).backward()
            kl = float(kl_t.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        res.train_curve.append({"step": step, "loss": loss_value, "kl": kl, "lr": sched.get_last_lr()[0]})
        if on_step:
            on_step(step, loss_value, kl)
        if step % eval_every == 0 or step == total:
            res.val_curve.append({"step": step, "loss": eval_loss(model, val, device)})
    model.eval()
    res.steps = total
    res.loss_after = res.val_curve[-1]["loss"]
    res.kl_after = kl_all(model, anchor, device) if anchor is not None else math.nan
    res.seconds = time.perf_counter() - t0
    return res


@torch.no_grad()
def effective_rank(model: Any) -> dict[str, float]:
    """Entropy effective rank exp(H(σ/Σσ)) of each module's B·A, via QR so only an r×r SVD runs."""
    ranks = []
    for _, m in model.named_modules():
        if not hasattr(m, "lora_A") or "default" not in getattr(m, "lora_A", {}):
            continue
        a = m.lora_A["default"].weight.float()  # [r, in]
        b = m.lora_B["default"].weight.float()  # [out, r]
        s = torch.linalg.svdvals(torch.linalg.qr(b).R @ torch.linalg.qr(a.T).R.T)
        p = s / s.sum() if s.sum() > 0 else s
        ranks.append(float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())) if s.sum() > 0 else 0.0)
    if not ranks:
        return {"mean": math.nan, "min": math.nan, "max": math.nan}
    return {"mean": sum(ranks) / len(ranks), "min": min(ranks), "max": max(ranks)}
