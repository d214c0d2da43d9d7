"""Tokens/s of rfs's LoRA fit vs TRL's SFTTrainer and vs the machine's own matmul rate.

Both train one epoch over the same token ids and labels (rfs.consolidate.dataset's rendering of
realistic trace rows whose execution logs vary in length), with the same LoRA spec, optimizer
settings and tokens per step; the KL anchor is off in both (TRL has none). rfs packs examples with
little padding ("rfs_pack": packed rows, rfs's default; "rfs_bucket": length buckets); TRL pads
each batch to its longest example (its default). tokens/s counts real tokens only; "fill" is real
tokens over computed positions. "rfs_prefix" is rfs.consolidate.prefix's step: the examples'
shared first turn computed once per step (through the one-line hook in fit.batch_loss that the
bench installs, `_prefix_hook`). A small untimed warm-up precedes the timed runs. The variants are
interleaved, `--repeats` times, and the JSON gives min and median of each.

The machine's rate: the median fp32 (CPU) or bf16 (GPU) GFLOP/s of an n×n matmul on the same
threads, converted to tokens/s for this model at 4 FLOPs per matmul weight per token for a LoRA
fit (forward 2, the backward's activation gradients 2; the frozen base needs no weight gradients,
the adapters' are negligible; a full fit would be 6) — attention's own FLOPs left out, so the
rate is an upper bound and the fraction of it reached is conservative.
Gradient checkpointing is off in every variant unless --gc (it recomputes the forward: pure
cost on a CPU with memory to spare, and the prefix step needs the cache it drops).

    python bench/consolidate.py [--model DIR] [--repeats 3] [--examples 32] [--device cpu|cuda] [--threads N] [--gc]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from rfs.consolidate import dataset, fit, prefix  # noqa: E402


VARIANTS = ("pack", "bucket", "prefix")
ENV = Path(__file__).resolve().parents[1] / "env" / "builtin"
PROGRAM_MD, TRAIN_PY = (ENV / "program.md").read_text(), (ENV / "train.py").read_text()


def examples(tok, n: int, max_len: int, seed: int) -> list[dataset.Example]:
    """Trace rows as a round has them: the built-in env's program.md and seed train.py as the first
    turn (shared by every rollout), then actions with execution logs of varying length."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        log = "\n".join(f"| step {s} loss {rng.uniform(2, 5):.3f} lr {rng.uniform(0, 1e-3):.2e}" for s in range(rng.randint(0, 25)))
        msgs = tiny_model.messages(reasoning=f"try idea {i}", log=log + "\nval_bpb: 1.2")
        msgs[0]["content"], msgs[1]["content"] = PROGRAM_MD, "train.py:\n" + TRAIN_PY
        rows.append(tiny_model.trace_row(f"b{i}", val_bpb=rng.uniform(1.1, 1.4), msgs=msgs))
    return dataset.examples_of(tok, rows, "S", None, max_len)


@contextlib.contextmanager
def _prefix_hook():
    """fit.batch_loss dispatching a PrefixBatch to prefix.batch_loss: the one line the fit needs."""
    plain = fit.batch_loss
    fit.batch_loss = lambda m, b, d: prefix.batch_loss(m, b, d) if isinstance(b, prefix.PrefixBatch) else plain(m, b, d)
    try:
        yield
    finally:
        fit.batch_loss = plain


def steps_of(exs: list[dataset.Example], cfg: ConsolidateCfg, strategy: str) -> list:
    return prefix.batches(exs, cfg.batch_tokens) if strategy == "prefix" else fit.batches(exs, cfg, strategy)


def run_rfs(model_dir: Path, exs: list[dataset.Example], cfg: ConsolidateCfg, device: str, strategy: str) -> float:
    model = fit.lora(fit.load(model_dir, device)[0], cfg, seed=0)
    steps = steps_of(exs, cfg, strategy)
    with _prefix_hook():
        t0 = time.perf_counter()
        fit.fit(model, steps, [], None, cfg, device, seed=0)
        return time.perf_counter() - t0


def shaped(model_dir: Path, layers: int, out: Path) -> Path:
    """A randomly initialised model of model_dir's architecture and tokenizer with `layers` layers:
    the real vocabulary and hence the real traces' token counts, at a fraction of the compute."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def matmul_flops(device: str, n: int = 1024, repeats: int = 5) -> list[float]:
    """FLOP/s of an n×n matmul (2n³ FLOPs) in the fit's dtype, timed over a few dozen products."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    out = []
    for _ in range(repeats + 1):  # the first is a warm-up
        k = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.5:
            a @ b
            k += 1
        if device != "cpu":
            torch.cuda.synchronize()
        out.append(2 * n**3 * k / (time.perf_counter() - t0))
    return out[1:]


def matmul_weights(model_dir: Path) -> int:
    """Weights that every token multiplies: the Linear layers, lm_head included (not the embedding lookup)."""
    model = fit.load(model_dir, "cpu")[0]
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


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
    ap.add_argument("--max-len", type=int, default=4096, help="longer than a trace: a cut head loses the shared turn")
    ap.add_argument("--batch", type=int, default=4, help="TRL examples per step; rfs gets the same tokens per step")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shape-of", type=Path, help="a model dir: a random model of its config and tokenizer, cut to --layers layers")
    ap.add_argument("--variants", default="pack,bucket,prefix", help="rfs variants to time (TRL always)")
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing on (rfs pack/bucket and TRL only)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = a.model or (shaped(a.shape_of, a.layers, Path(tmp) / "model") if a.shape_of else
                                tiny_model.build(Path(tmp) / "model", hidden=a.hidden, layers=a.layers))
        variants = tuple(a.variants.split(","))
        tok = AutoTokenizer.from_pretrained(model_dir)
        exs = examples(tok, a.examples, a.max_len, seed=0)
        tokens = sum(len(e.input_ids) for e in exs)
        mean_len = tokens / len(exs)
        cfg = ConsolidateCfg(lora_r=16, lora_alpha=16, lora_dropout=0.05, epochs=1.0, max_seq_len=a.max_len,
                             batch_tokens=max(a.max_len, round(a.batch * mean_len / a.max_len) * a.max_len), kl_lambda=0.0,
                             gradient_checkpointing=a.gc)
        no_gc = dataclasses.replace(cfg, gradient_checkpointing=False)
        times: dict[str, list[float]] = {**{f"rfs_{v}": [] for v in variants}, "trl": []}
        flops: list[float] = []
        run_rfs(model_dir, exs[:4], cfg, a.device, "bucket")  # warm-up (allocator, kernels), untimed
        for _ in range(a.repeats):
            flops += matmul_flops(a.device, repeats=1)
            for v in variants:
                times[f"rfs_{v}"].append(run_rfs(model_dir, exs, no_gc if v == "prefix" else cfg, a.device, v))
            with contextlib.redirect_stdout(sys.stderr):  # TRL prints its own summary; stdout is our JSON
                times["trl"].append(run_trl(model_dir, exs, cfg, a.batch, Path(tmp) / "trl", a.device))
        tps = {k: [tokens / t for t in v] for k, v in times.items()}
        weights = matmul_weights(model_dir)
        machine = [f / (4 * weights) for f in flops]  # tokens/s the matmul rate allows a LoRA fit
        pre = prefix.batches(exs, cfg.batch_tokens)
        lengths = [len(e.input_ids) for e in exs]
        print(json.dumps({
            "model": str(a.model or (f"random {a.shape_of.name} shape, {a.layers} layers" if a.shape_of else
                                     f"random llama hidden={a.hidden} layers={a.layers}")), "device": a.device,
            "examples": len(exs), "tokens": tokens, "length_min_mean_max": [min(lengths), round(mean_len), max(lengths)],
            "threads": torch.get_num_threads(), "repeats": a.repeats,
            "fill": {k: fill(fit.batches(exs, cfg, k)) for k in ("bucket", "pack")}, "trl_fill": trl_fill(exs, a.batch),
            "prefix": {"steps": len(pre), "computed_over_real": sum(b.computed for b in pre) / tokens,
                       "mean_shared_prefix": statistics.fmean(b.prefix for b in pre)},
            "gradient_checkpointing": {"rfs_pack": a.gc, "rfs_bucket": a.gc, "rfs_prefix": False, "trl": a.gc},
            "matmul_weights": weights, "matmul_gflops": {"min": min(flops) / 1e9, "median": statistics.median(flops) / 1e9},
            "machine_tokens_per_s": {"min": min(machine), "median": statistics.median(machine),
                                     "flops_per_token": 4 * weights, "basis": "LoRA fit: 4 FLOPs per matmul weight per token"},
            "rfs_batch_tokens": cfg.batch_tokens, "trl_batch": a.batch,
            "tokens_per_s": {k: {"min": min(v), "median": statistics.median(v), "all": v} for k, v in tps.items()},
            "ratio_vs_trl_median": {k: statistics.median(tps[f"rfs_{k}"]) / statistics.median(tps["trl"]) for k in variants},
            "ratio_vs_trl_min": {k: min(tps[f"rfs_{k}"]) / min(tps["trl"]) for k in variants},
            "fraction_of_machine_median": {k: statistics.median(tps[f"rfs_{k}"]) / statistics.median(machine) for k in variants},
            "fraction_of_machine_min": {k: min(tps[f"rfs_{k}"]) / min(machine) for k in variants},
        }, indent=2))


if __name__ == "__main__":
    main()
