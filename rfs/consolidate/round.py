"""One round's traces → V_{n+1}: dataset, KL anchor, LoRA fit, merge, atomic publish, metrics.

Resume contract: the new version appears under models/<loop>/v<round> only when complete (built in
a `.partial` dir, fsynced, renamed). A crash mid-fit leaves no version; the rerun deletes the
leftover and refits from the parent with the same seed, so it never trains twice on a half model
and produces what an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer

from rfs import atomic, tables
from rfs.config import ConsolidateCfg
from rfs.devices import pick_device
from rfs.consolidate import anchor as anchors
from rfs.consolidate import dataset, fit, memory
from rfs.consolidate.publish import partial, publish
from rfs.events import EventLog
from rfs.rundir import RunDir

_CURVE = pa.list_(pa.struct([("step", pa.int64()), ("loss", pa.float64()), ("kl", pa.float64()), ("lr", pa.float64())]))
METRICS_SCHEMA = pa.schema([
    ("loop", pa.string()), ("round", pa.int32()), ("version", pa.int32()), ("seed", pa.int64()),
    ("trained", pa.bool_()), ("examples", pa.int64()), ("replay", pa.int64()), ("steps", pa.int64()),
    ("tokens_seen", pa.int64()), ("seconds", pa.float64()), ("tokens_per_s", pa.float64()),
    ("loss_before", pa.float64()), ("loss_after", pa.float64()), ("val_is_train", pa.bool_()),
    ("kl_before", pa.float64()), ("kl_after", pa.float64()),
    ("effective_rank_mean", pa.float64()), ("effective_rank_min", pa.float64()), ("effective_rank_max", pa.float64()),
    ("dataset_sha256", pa.string()), ("train_curve", _CURVE), ("val_curve", _CURVE),
])


def anchor_prompts(examples: list[dataset.Example], n: int) -> tuple[list[list[int]], list[int]]:
    """Up to n distinct (conversation through a reply, first KL position): every trace's first reply,
    then every second reply, … so the anchor spans the traces before it spans the turns. An entry
    ends before the reply's last token (its end-of-turn needs no logits past it); its KL positions
    are those that predict the reply (from the token before its first on)."""
    out: list[list[int]] = []
    starts: list[int] = []
    seen: set[tuple[int, ...]] = set()
    for turn in range(max((len(e.replies) for e in examples), default=0)):
        for e in examples:
            if turn < len(e.replies) and len(out) < n:
                lo, hi = e.replies[turn]
                ids = e.input_ids[: hi - 1]
                if lo >= 1 and hi - 1 > lo - 1 and tuple(ids) not in seen:
                    seen.add(tuple(ids))
                    out.append(ids)
                    starts.append(lo - 1)
    return out, starts


def ensure_anchor(run: RunDir, loop: str, v0_dir: Path, examples: list[dataset.Example], cfg: ConsolidateCfg,
                  device: str, max_memory: dict[int | str, int] | None = None) -> anchors.Anchor | None:
    """Load the loop's stored anchor, computing it from V0 the first time (fixed from then on)."""
    if cfg.kl_lambda == 0:
        return None
    where = run.kl_anchor(loop)
    found = anchors.load(where)
    if found is not None:
        return found
    prompts, starts = anchor_prompts(examples, cfg.kl_prompts)
    if not prompts:
        return None
    v0, _ = fit.load(v0_dir, device, max_memory)
    anchors.save(anchors.compute(v0.eval(), prompts, device, starts), where, v0_dir)
    del v0
    return anchors.load(where)


HOLD_OUT_EVERY = 4  # one trace of the round's in four (at least one) is held out of the fit


def split(examples: list[dataset.Example], selected: int) -> tuple[list[dataset.Example], list[dataset.Example], bool]:
    """(train, val, val_is_train). Val is every 4th of the round's own traces (the first
    `selected`; replay always trains), so loss_before/after measure traces the fit never saw. A
    round of one trace has nothing to hold out: val is the train set, and the row says so."""
    current, replayed = examples[:selected], examples[selected:]
    if len(current) < 2:
        return examples, examples, True
    held = set(range(HOLD_OUT_EVERY - 1, len(current), HOLD_OUT_EVERY)) or {len(current) - 1}
    val = [e for i, e in enumerate(current) if i in held]
    return [e for i, e in enumerate(current) if i not in held] + replayed, val, False


def append_metrics(run: RunDir, row: dict[str, Any]) -> None:
    """The round's row in metrics/consolidate.parquet; a rerun of a round replaces its row."""
    tables.upsert(run.metrics("consolidate"), METRICS_SCHEMA, ("loop", "round"), [row])


def _curve(points: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{"step": int(p["step"]), "loss": p["loss"], "kl": p.get("kl", math.nan), "lr": p.get("lr", math.nan)} for p in points]


@torch.no_grad()
def merge(model: Any) -> Any:
    """Fold every LoRA's scaling·B·A into its base weight, one weight at a time, then drop the adapters.

    Each sum is done in fp32 for that one tensor and stored in the weight's own dtype (bf16 on GPU):
    one rounding, and the extra memory is one weight in fp32, never an fp32 copy of the model
    (~130 GB at 32B). Weights stay on whichever device a device map put them.
    """
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        w = module.get_base_layer().weight
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            a = module.lora_A[name].weight.to(w.device).float()  # [r, in]
            b = module.lora_B[name].weight.to(w.device).float()  # [out, r]
            delta = (b @ a) * module.scaling[name]
            w.copy_((w.float() + (delta.T if getattr(module, "fan_in_fan_out", False) else delta)).to(w.dtype))
    return model.unload()  # the base model, adapters removed, nothing merged again


def fit_memory(model_dir: Path, cfg: ConsolidateCfg, device: str, events: EventLog | None, loop: str,
               round_: int) -> dict[int | str, int] | None:
    """Print (and record) the fit's memory estimate before anything loads; raise FitTooLarge when it
    exceeds the GPUs'. The device map's per-GPU budgets when the base is spread (consolidate.devices > 1)."""
    shape = json.loads((model_dir / "config.json").read_text())
    try:
        est = memory.estimate(shape, cfg, weight_bytes=2 if device.startswith("cuda") else 4, devices=cfg.devices)
    except KeyError as exc:  # not a decoder shape the estimate knows: the fit still runs, unchecked
        print(f"rfs: {loop} round {round_}: fit memory not estimated (config.json has no {exc})", flush=True)
        return None
    print(f"rfs: {loop} round {round_}: {est.line()}", flush=True)
    if events:
        events.emit("fit_memory", loop=loop, round=round_, total_gib=est.total_gib,
                    per_device_gib=est.per_device_gib(), devices=est.devices)
    gib = fit.device_gib(device, cfg.devices)
    memory.check(est, gib)
    return memory.max_memory(est, gib) if gib and cfg.devices > 1 else None


def seq_cap(model_dir: Path, cfg: ConsolidateCfg) -> int:
    """The longest example a round may hold: cfg.max_seq_len within the model's context window."""
    context = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings") or cfg.max_seq_len
    return min(cfg.max_seq_len, int(context))


def consolidate(run: RunDir, loop: str, round_: int, parent_dir: Path, v0_dir: Path, cfg: ConsolidateCfg,
                noise: dict | None, events: EventLog | None = None, device: str = "auto", seed: int = 0) -> Path:
    """Fit round `round_`'s traces (+ replay) into parent_dir's model → models/<loop>/v<round_>."""
    final = run.model(loop, round_)
    if (final / "manifest.json").exists():
        return final
    t0 = time.perf_counter()
    device = pick_device(device)
    tok = AutoTokenizer.from_pretrained(parent_dir)
    data = dataset.build(run, loop, round_, tok, seq_cap(Path(parent_dir), cfg), cfg.replay_fraction, cfg.replay_rounds,
                         noise, seed)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial(final)
    res, erank = fit.FitResult(), {"mean": math.nan, "min": math.nan, "max": math.nan}
    if data.examples:
        max_memory = fit_memory(Path(parent_dir), cfg, device, events, loop, round_)
        anchor = ensure_anchor(run, loop, Path(v0_dir), data.examples[: data.manifest["selected"]], cfg, device, max_memory)
        model, tok = fit.load_for_training(Path(parent_dir), cfg, device, seed, max_memory)
        train, val, val_is_train = split(data.examples, data.manifest["selected"])
        # The shared opening computed once per step (exact); gradient checkpointing cannot keep its cache.
        train_batches = fit.batches(train, cfg, "pack" if cfg.gradient_checkpointing else "prefix")
        order = fit.stream(train_batches, cfg.epochs, seed)  # the fit's own step order: step s trains order[s-1]
        on_step = (lambda s, loss, kl: events.emit("train_step", loop=loop, round=round_, step=s, total=len(order),
                                                   tokens=order[s - 1].real, loss=loss, kl=kl)) if events else None
        res = fit.fit(model, train_batches, fit.batches(val, cfg), anchor, cfg, device, seed, on_step)
        res.val_is_train = val_is_train
        erank = fit.effective_rank(model)
        model.save_pretrained(tmp / "adapter")
        merge(model).save_pretrained(tmp)
    else:  # arm F with nothing above the noise: the new version is the parent, unchanged, and says so
        AutoModelForCausalLM.from_pretrained(parent_dir).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    atomic.write_json(tmp / "dataset.json", data.manifest)
    manifest = {
        "loop": loop, "round": round_, "version": round_, "parent": str(parent_dir),
        "parent_version": _version_of(Path(parent_dir)), "v0": str(v0_dir), "seed": seed, "device": device,
        "trained": bool(data.examples), "dataset_sha256": data.manifest["sha256"],
        "hyperparameters": dataclasses.asdict(cfg), "steps": res.steps, "tokens_seen": res.tokens_seen,
        "loss_before": res.loss_before, "loss_after": res.loss_after, "kl_before": res.kl_before,
        "kl_after": res.kl_after, "effective_rank": erank,
    }
    atomic.write_json(tmp / "manifest.json", manifest)  # written last: its presence means complete
    publish(tmp, final)
    seconds = time.perf_counter() - t0
    append_metrics(run, {
        "loop": loop, "round": round_, "version": round_, "seed": seed, "trained": bool(data.examples),
        "examples": len(data.examples), "replay": data.manifest["replay"], "steps": res.steps,
        "tokens_seen": res.tokens_seen, "seconds": seconds, "tokens_per_s": res.tokens_seen / res.seconds if res.seconds else 0.0,
        "loss_before": res.loss_before, "loss_after": res.loss_after, "val_is_train": res.val_is_train,
        "kl_before": res.kl_before, "kl_after": res.kl_after, "effective_rank_mean": erank["mean"],
        "effective_rank_min": erank["min"], "effective_rank_max": erank["max"], "dataset_sha256": data.manifest["sha256"],
        "train_curve": _curve(res.train_curve), "val_curve": _curve(res.val_curve),
    })
    if events:
        events.emit("consolidated", loop=loop, round=round_, version=round_, seconds=round(seconds, 3),
                    loss_before=res.loss_before, loss_after=res.loss_after)
    return final


def _version_of(model_dir: Path) -> int | None:
    """The parent's version from its manifest; V0 (no manifest) is version 0."""
    m = model_dir / "manifest.json"
    return json.loads(m.read_text())["version"] if m.exists() else 0
