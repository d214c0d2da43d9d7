"""One real fit on the embedded researcher (SmolLM2-135M, converted by `rfs setup`) with realistic
trace rows built from the built-in environment's program.md and train.py. Slow: minutes on CPU."""

from __future__ import annotations

import json
import resource
import time

import pyarrow.parquet as pq
import pytest
import torch

import tiny_model
from rfs import ROOT, atomic, config, trace
from rfs.consolidate import consolidate
from rfs.rundir import RunDir

MODEL = config.cache_dir() / "models" / "smollm2-135m-instruct"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600), pytest.mark.skipif(not (MODEL / "config.json").exists(), reason=f"no {MODEL}; run rfs setup")]

SUMMARY = "---\nval_bpb:          {bpb}\ntraining_seconds: 30.0\nnum_steps:        {steps}\nstatus:           {status}\n"


def realistic_row(i: int, name: str, value: float, status: str, bpb: float, steps: int) -> dict:
    program, train_py = ((ROOT / "env" / "builtin" / f).read_text() for f in ("program.md", "train.py"))
    log = "".join(f"| step {s} loss {3.2 - 0.01 * s:.3f}\n" for s in range(0, steps, max(1, steps // 8)))
    if status == "crash":
        log += "| Traceback (most recent call last):\n| RuntimeError: shape mismatch\n"
    msgs = [
        {"role": "system", "content": program, "reasoning": ""},
        {"role": "user", "content": "The current train.py:\n" + train_py, "reasoning": ""},
        {"role": "assistant", "content": json.dumps({"action": "set", "name": name, "value": value}),
         "reasoning": f"{name} looks off for a 30 s budget; try {value}"},
        {"role": "tool", "content": f"set {name} = {value}; syntax ok", "reasoning": ""},
        {"role": "assistant", "content": json.dumps({"action": "run"}), "reasoning": "run it"},
        {"role": "tool", "content": log + SUMMARY.format(bpb=bpb if status == "success" else "nan", steps=steps, status=status), "reasoning": ""},
        {"role": "assistant", "content": json.dumps({"action": "finish"}), "reasoning": "done"},
    ]
    return tiny_model.trace_row(f"smol-{i}", status=status, val_bpb=bpb, steps=steps, start_val_bpb=2.40, loop="shared", msgs=msgs)


def test_real_fit_on_smollm2(tmp_path):
    run = RunDir(tmp_path)
    rows = [
        realistic_row(0, "LEARNING_RATE", 0.006, "success", 2.312, 410),
        realistic_row(1, "N_EMBD", 256, "success", 2.455, 230),
        realistic_row(2, "DEPTH", 12, "timeout", float("nan"), 40),
        realistic_row(3, "BATCH_SIZE", 64, "success", 2.351, 150),
        realistic_row(4, "WARMUP_STEPS", 0, "success", 2.398, 420),
        realistic_row(5, "SEQ_LEN", 512, "crash", float("nan"), 0),
    ]
    atomic.write_parquet(run.traces("shared", 1), trace.to_table(rows))
    cfg = config.load(None).consolidate  # the embedded preset
    t0 = time.perf_counter()
    out = consolidate(run, "S", 1, MODEL, MODEL, cfg, None, device="cpu", seed=0)
    seconds = time.perf_counter() - t0
    m = json.loads((out / "manifest.json").read_text())
    (metrics,) = pq.read_table(run.metrics("consolidate")).to_pylist()
    figures = {
        "seconds_total": round(seconds, 1), "fit_tokens_seen": m["tokens_seen"], "steps": m["steps"],
        "tokens_per_s": round(metrics["tokens_per_s"], 1), "loss_before": m["loss_before"], "loss_after": m["loss_after"],
        "kl_before": m["kl_before"], "kl_after": m["kl_after"], "effective_rank": m["effective_rank"],
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "model_mb": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 1),
        "threads": torch.get_num_threads(),
    }
    print("SMOLLM2_FIT", json.dumps(figures))
    assert m["trained"] and m["loss_after"] < m["loss_before"]
