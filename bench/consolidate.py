"""Tokens/s of rfs's LoRA fit vs TRL's SFTTrainer on the same data, model, LoRA and machine.

Both train one epoch over the same token ids and labels (rfs.consolidate.dataset's rendering of
realistic trace rows whose execution logs vary in length), with the same LoRA spec, optimizer
settings and tokens per step; the KL anchor is off in both (TRL has none). rfs packs examples with
little padding ("rfs_pack": packed rows, rfs's default; "rfs_bucket": length buckets); TRL pads
each batch to its longest example (its default). tokens/s counts real tokens only; "fill" is real
tokens over computed positions. A small untimed warm-up precedes the timed runs. The two are interleaved, `--repeats` times, and the JSON gives min and median of each.

    python bench/consolidate.py [--model DIR] [--repeats 3] [--examples 32] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import tiny_model  # noqa: E402
from rfs.config import ConsolidateCfg  # noqa: E402
from rfs.consolidate import dataset, fit  # noqa: E402


def examples(tok, n: int, max_len: int, seed: int) -> list[dataset.Example]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        log = "\n".join(f"| step {s} loss {rng.uniform(2, 5):.3f} lr {rng.uniform(0, 1e-3):.2e}" for s in range(rng.randint(0, 25)))
        rows.append(tiny_model.trace_row(f"b{i}", val_bpb=rng.uniform(1.1, 1.4),
                                         msgs=tiny_model.messages(reasoning=f"try idea {i}", log=log + "\nval_bpb: 1.2")))
    return dataset.examples_of(tok, rows, "S", None, max_len)


def run_rfs(model_dir: Path, exs: list[dataset.Example], cfg: ConsolidateCfg, device: str, strategy: str) -> float:
    model = fit.lora(fit.load(model_dir, device)[0], cfg, seed=0)
    steps = fit.batches(exs, cfg, strategy)
    t0 = time.perf_counter()
    fit.fit(model, steps, [], None, cfg, device, seed=0)
    return time.perf_counter() - t0


def run_trl(model_dir: Path, exs: list[dataset.Example], cfg: ConsolidateCfg, batch: int, out: Path, device: str) -> float:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_dict({"input_ids": [e.input_ids for e in exs], "labels": [e.labels for e in exs]})
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=batch, num_train_epochs=cfg.epochs,
                     learning_rate=cfg.lr, lr_scheduler_type="cosine",
                     warmup_steps=math.ceil(cfg.warmup_ratio * math.ceil(len(exs) / batch)),
                     weight_decay=cfg.weight_decay, max_length=cfg.max_seq_len, packing=False, report_to=[],
                     save_strategy="no", logging_strategy="no", use_cpu=device == "cpu", bf16=device != "cpu", seed=0,
                     dataloader_num_workers=0, max_grad_norm=1.0, disable_tqdm=True,
                     gradient_checkpointing=cfg.gradient_checkpointing)  # TRL defaults it on; rfs's cfg says off
    spec = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    model = fit.load(model_dir, device)[0]  # the same dtype as rfs: bf16 on GPU, fp32 on CPU
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, peft_config=spec)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0


def fill(steps: list[fit.Batch]) -> float:
    """Real tokens over computed positions (1.0: no padding)."""
    return sum(b.real for b in steps) / sum(b.input_ids.numel() for b in steps)


def trl_fill(exs: list[dataset.Example], batch: int) -> float:
    """The same for TRL's default: batches in dataset order, padded to their longest example."""
    lens = [len(e.input_ids) for e in exs]
    groups = [lens[i : i + batch] for i in range(0, len(lens), batch)]
    return sum(lens) / sum(max(g) * len(g) for g in groups)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a model dir; default: a small random Llama built here")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4, help="TRL examples per step; rfs gets the same tokens per step")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = a.model or tiny_model.build(Path(tmp) / "model", hidden=a.hidden, layers=a.layers)
        tok = AutoTokenizer.from_pretrained(model_dir)
        exs = examples(tok, a.examples, a.max_len, seed=0)
        tokens = sum(len(e.input_ids) for e in exs)
        mean_len = tokens / len(exs)
        cfg = ConsolidateCfg(lora_r=16, lora_alpha=16, lora_dropout=0.05, epochs=1.0, max_seq_len=a.max_len,
                             batch_tokens=max(a.max_len, round(a.batch * mean_len / a.max_len) * a.max_len), kl_lambda=0.0)
        times: dict[str, list[float]] = {"rfs_pack": [], "rfs_bucket": [], "trl": []}
        run_rfs(model_dir, exs[:4], cfg, a.device, "bucket")  # warm-up (allocator, kernels), untimed
        for _ in range(a.repeats):
            times["rfs_pack"].append(run_rfs(model_dir, exs, cfg, a.device, "pack"))
            times["rfs_bucket"].append(run_rfs(model_dir, exs, cfg, a.device, "bucket"))
            with contextlib.redirect_stdout(sys.stderr):  # TRL prints its own summary; stdout is our JSON
                times["trl"].append(run_trl(model_dir, exs, cfg, a.batch, Path(tmp) / "trl", a.device))
        tps = {k: [tokens / t for t in v] for k, v in times.items()}
        lengths = [len(e.input_ids) for e in exs]
        print(json.dumps({
            "model": str(a.model or f"random llama hidden={a.hidden} layers={a.layers}"), "device": a.device,
            "examples": len(exs), "tokens": tokens, "length_min_mean_max": [min(lengths), round(mean_len), max(lengths)],
            "threads": torch.get_num_threads(), "repeats": a.repeats,
            "fill": {k: fill(fit.batches(exs, cfg, k)) for k in ("bucket", "pack")}, "trl_fill": trl_fill(exs, a.batch),
            "rfs_batch_tokens": cfg.batch_tokens, "trl_batch": a.batch,
            "tokens_per_s": {k: {"min": min(v), "median": statistics.median(v), "all": v} for k, v in tps.items()},
            "ratio_vs_trl_median": {k: statistics.median(tps[f"rfs_{k}"]) / statistics.median(tps["trl"]) for k in ("pack", "bucket")},
            "ratio_vs_trl_min": {k: min(tps[f"rfs_{k}"]) / min(tps["trl"]) for k in ("pack", "bucket")},
        }, indent=2))


if __name__ == "__main__":
    main()
