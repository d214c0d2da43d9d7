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
from transformers import AutoModelForCausalLM, AutoTokenizer

from rfs import atomic, tables
from rfs.config import ConsolidateCfg
from rfs.consolidate import anchor as anchors
from rfs.consolidate import dataset, fit
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


def anchor_prompts(examples: list[dataset.Example], n: int) -> list[list[int]]:
    """What each selected trace showed the researcher before its first trained token."""
    out = []
    for e in examples:
        first = next((i for i, lab in enumerate(e.labels) if lab != dataset.IGNORE), len(e.labels))
        if first:
            out.append(e.input_ids[:first])
    return out[:n]


def ensure_anchor(run: RunDir, loop: str, v0_dir: Path, examples: list[dataset.Example], cfg: ConsolidateCfg,
                  device: str) -> anchors.Anchor | None:
    """Load the loop's stored anchor, computing it from V0 the first time (fixed from then on)."""
    if cfg.kl_lambda == 0:
        return None
    where = run.kl_anchor(loop)
    found = anchors.load(where)
    if found is not None:
        return found
    prompts = anchor_prompts(examples, cfg.kl_prompts)
    if not prompts:
        return None
    v0, _ = fit.load(v0_dir, device)
    anchors.save(anchors.compute(v0.eval(), prompts, device), where, v0_dir)
    del v0
    return anchors.load(where)


def split(examples: list[dataset.Example]) -> tuple[list[dataset.Example], list[dataset.Example], bool]:
    """Every 10th example is held out for the val curve; too few examples: val is the train set."""
    if len(examples) < 10:
        return examples, examples, True
    return [e for i, e in enumerate(examples) if i % 10 != 9], examples[9::10], False


def append_metrics(run: RunDir, row: dict[str, Any]) -> None:
    """The round's row in metrics/consolidate.parquet; a rerun of a round replaces its row."""
    tables.upsert(run.metrics("consolidate"), METRICS_SCHEMA, ("loop", "round"), [row])


def _curve(points: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{"step": int(p["step"]), "loss": p["loss"], "kl": p.get("kl", math.nan), "lr": p.get("lr", math.nan)} for p in points]


def merge(model: Any) -> Any:
    """W + BA summed in fp32, then stored in the training dtype (bf16 on GPU): one rounding, not two."""
    dtype = next(model.parameters()).dtype
    return model.float().merge_and_unload().to(dtype)


def consolidate(run: RunDir, loop: str, round_: int, parent_dir: Path, v0_dir: Path, cfg: ConsolidateCfg,
                noise: dict | None, events: EventLog | None = None, device: str = "auto", seed: int = 0) -> Path:
    """Fit round `round_`'s traces (+ replay) into parent_dir's model → models/<loop>/v<round_>."""
    final = run.model(loop, round_)
    if (final / "manifest.json").exists():
        return final
    t0 = time.perf_counter()
    device = fit.pick_device(device)
    tok = AutoTokenizer.from_pretrained(parent_dir)
    data = dataset.build(run, loop, round_, tok, cfg.max_seq_len, cfg.replay_fraction, cfg.replay_rounds, noise, seed)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial(final)
    res, erank = fit.FitResult(), {"mean": math.nan, "min": math.nan, "max": math.nan}
    if data.examples:
        anchor = ensure_anchor(run, loop, Path(v0_dir), data.examples[: data.manifest["selected"]], cfg, device)
        model, tok = fit.load_for_training(Path(parent_dir), cfg, device, seed)
        train, val, val_is_train = split(data.examples)
        train_batches = fit.batches(train, cfg)
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
