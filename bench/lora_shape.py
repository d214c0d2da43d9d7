"""rfs's LoRA consolidation at a cluster model's shape: tokens/s, peak GPU memory, merge time.

The model is randomly initialised from a transformers config built here (no hub, no weights):
`qwen7b` has Qwen2.5-Coder-7B's dimensions, `tiny` is a smoke test that runs on a CPU in seconds.
Random weights cost the same FLOPs and bytes as trained ones, so the figures hold for the real model.
Examples are random token sequences whose first `--masked` fraction is an untrained prompt (the
system message, program.md and the starting train.py dominate a trace). The fit is rfs's own:
fit.lora (locked LoRA defaults), fit.batches (packed rows), fit.fit (AdamW, LR schedule, optional
KL anchor), then round.merge (W + BA in fp32, stored back in the training dtype).

Step times are taken between consecutive optimizer steps (the device is synchronised at each); the
first `--warmup` are dropped. One configuration per process: an out-of-memory is reported as such.

    python bench/lora_shape.py --shape tiny --device cpu --steps 4 --warmup 1
    python bench/lora_shape.py --shape qwen7b [--batch-tokens 16384] [--grad-ckpt] [--anchor 4]

Measured 2026-11-24, one H100 80GB, torch 2.11, transformers 5.17, peft 0.21.0, qwen7b, r=64 on all
seven projections (161.5M LoRA params, fp32), 4 anchor prompts, real tokens per step ~97% of computed:
- the locked defaults (16384 tokens/step, no checkpointing) run out of memory (77.7 GiB at the OOM);
- --grad-ckpt, 16384/step: 3.78 s median step (3.26 min), 3,860 tok/s median, peak 47.3 GiB;
- no checkpointing, --batch-tokens 4096: 0.93 s median step (0.78 min), 4,020 tok/s, peak 64.0 GiB;
- merge (fp32 sum, back to bf16) 0.12-0.14 s on the GPU, peak 30.1 GiB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen2Config  # noqa: E402

from rfs.config import ConsolidateCfg  # noqa: E402
from rfs.consolidate import anchor as anchors  # noqa: E402
from rfs.consolidate import fit, round as rounds  # noqa: E402
from rfs.devices import pick_device  # noqa: E402
from rfs.consolidate.dataset import IGNORE, Example  # noqa: E402

SHAPES = {
    # Qwen2.5-Coder-7B's config.json, dimensions only
    "qwen7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                   intermediate_size=18944, vocab_size=152064, rope_theta=1e6, max_position_embeddings=32768,
                   rms_norm_eps=1e-6, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1024, rope_theta=1e6, max_position_embeddings=4096,
                 rms_norm_eps=1e-6, tie_word_embeddings=False),
}


def build(shape: str, device: str) -> torch.nn.Module:
    """Random weights made where they will live, in the training dtype (bf16 on GPU, fp32 on CPU)."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        return AutoModelForCausalLM.from_config(Qwen2Config(**SHAPES[shape]), dtype=dtype)


def examples(vocab: int, tokens: int, lengths: tuple[int, int], masked: float, seed: int) -> list[Example]:
    """Random sequences totalling >= `tokens`; the first `masked` fraction of each is untrained prompt."""
    rng = random.Random(seed)
    out: list[Example] = []
    while sum(len(e.input_ids) for e in out) < tokens:
        n = rng.randint(*lengths)
        ids = [rng.randrange(vocab) for _ in range(n)]
        cut = int(masked * n)
        out.append(Example(f"r{len(out)}", 0, ids, [IGNORE] * cut + ids[cut:], ((cut, len(ids)),)))
    return out


def full_steps(exs: list[Example], cfg: ConsolidateCfg, steps: int) -> list[fit.Batch]:
    """The first `steps` packed batches with all their rows, so every timed step has the same shape."""
    rows = max(1, cfg.batch_tokens // cfg.max_seq_len)
    full = [b for b in fit.batches(exs, cfg) if b.input_ids.shape[0] == rows]
    if len(full) < steps:
        raise SystemExit(f"only {len(full)} full batches of {rows} rows; raise the example tokens")
    return full[:steps]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def run(a: argparse.Namespace, cfg: ConsolidateCfg, report: dict) -> None:
    t0 = time.perf_counter()
    model = build(a.shape, a.device)
    sync(a.device)
    report["init_s"] = time.perf_counter() - t0
    report["base_params"] = sum(p.numel() for p in model.parameters())
    exs = examples(model.config.vocab_size, int(1.5 * a.steps * cfg.batch_tokens), (a.min_len, cfg.max_seq_len), a.masked, 0)
    steps = full_steps(exs, cfg, a.steps)
    anchor = None
    if a.anchor:  # V0's top-k on the masked prompts, as round.ensure_anchor computes it
        anchor = anchors.compute(model.eval(), *rounds.anchor_prompts(exs, a.anchor), a.device)
    model = fit.lora(model, cfg, seed=0)
    report["lora_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report["lora_dtype"] = str(next(p for p in model.parameters() if p.requires_grad).dtype)
    stamps: list[float] = []

    def on_step(step: int, loss: float, kl: float) -> None:
        sync(a.device)
        stamps.append(time.perf_counter())

    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    res = fit.fit(model, steps, [], anchor, cfg, a.device, seed=0, on_step=on_step)
    report["fit_peak_gib"] = peak_gib(a.device)
    times = [end - start for start, end in zip(stamps, stamps[1:])][a.warmup - 1 :]  # [i]: step warmup+1+i
    real = statistics.mean(b.real for b in steps)
    report["step_tokens_real"] = real
    report["step_tokens_trained"] = statistics.mean(b.trained for b in steps)
    report["step_s"] = {"min": min(times), "median": statistics.median(times), "all": times}
    report["tokens_per_s"] = {"max": real / min(times), "median": real / statistics.median(times)}
    report["loss_first_last"] = [res.train_curve[0]["loss"], res.train_curve[-1]["loss"]]
    report["kl_last"] = res.train_curve[-1]["kl"]
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    merged = rounds.merge(model)
    sync(a.device)
    report["merge_s"] = time.perf_counter() - t1
    report["merge_peak_gib"] = peak_gib(a.device)
    report["merged_dtype"] = str(next(merged.parameters()).dtype)
    report["merged_params"] = sum(p.numel() for p in merged.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps in all, warm-up included")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the timings")
    ap.add_argument("--max-len", type=int, default=ConsolidateCfg.max_seq_len)
    ap.add_argument("--batch-tokens", type=int, default=ConsolidateCfg.batch_tokens)
    ap.add_argument("--min-len", type=int, default=1024, help="examples are uniform in [min-len, max-len] tokens")
    ap.add_argument("--masked", type=float, default=0.7, help="untrained prompt fraction of each example")
    ap.add_argument("--grad-ckpt", action="store_true", help="rfs's gradient_checkpointing switch")
    ap.add_argument("--anchor", type=int, default=4, help="KL anchor prompts (0: no anchor, kl_lambda 0)")
    a = ap.parse_args()
    if not 1 <= a.warmup < a.steps:
        ap.error("need 1 <= --warmup < --steps")
    a.device = pick_device(a.device)
    cfg = ConsolidateCfg(epochs=1.0, max_seq_len=a.max_len, batch_tokens=a.batch_tokens,
                         gradient_checkpointing=a.grad_ckpt, kl_lambda=ConsolidateCfg.kl_lambda if a.anchor else 0.0,
                         reason="bench: one pass over the timed steps")
    report: dict = {
        "shape": a.shape, "device": a.device,
        "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "cfg": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("reason",)},
        "steps": a.steps, "warmup": a.warmup, "masked": a.masked, "anchor_prompts": a.anchor,
    }
    try:
        run(a, cfg, report)
    except torch.OutOfMemoryError as e:
        report["oom"] = str(e).splitlines()[0]
        report["peak_gib_at_oom"] = peak_gib(a.device)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
