"""Decode speed and memory of the embedded researcher server (llama.cpp, pinned cores). Prints JSON.

    python bench/serve_tokens.py [--gguf PATH | --model-dir DIR] [--threads 1] [--requests 5] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import anyio
import httpx

from rfs.serve.base import free_port
from rfs.serve.llamacpp import LlamaCppServer
from rfs.setup import embedded_gguf

PROMPT = "Explain in a few sentences how the learning rate affects training a small language model."


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def bench(model: Path, work: Path, threads: int, requests: int, max_tokens: int) -> dict:
    server = LlamaCppServer(model, "bench", free_port(), work / "server.log", cpus=tuple(range(threads)), threads=threads)
    t0 = time.monotonic()
    await server.start()
    startup = time.monotonic() - t0
    rates = []
    try:
        async with httpx.AsyncClient(timeout=300) as client:
            for i in range(requests):
                body = {"model": "bench", "messages": [{"role": "user", "content": PROMPT}],
                        "max_tokens": max_tokens, "temperature": 0.8, "seed": i}
                t = time.monotonic()
                reply = (await client.post(server.base_url + "/chat/completions", json=body)).json()
                rates.append(reply["usage"]["completion_tokens"] / (time.monotonic() - t))
        rss = rss_mb(server.pid)
    finally:
        await server.stop()
    return {"model": str(model), "threads": threads, "requests": requests, "max_tokens": max_tokens,
            "startup_s": round(startup, 2), "tok_per_s_min": round(min(rates), 1),
            "tok_per_s_median": round(statistics.median(rates), 1), "rss_mb": round(rss, 0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--model-dir", type=Path, help="a safetensors dir; converted (and timed) first")
    ap.add_argument("--qtype", default="q8_0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    model, convert_s = args.gguf or embedded_gguf(), None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model_dir:
            from rfs.serve.convert import hf_to_gguf

            t = time.monotonic()
            model = hf_to_gguf(args.model_dir, embedded_gguf(), work / "model.gguf", args.qtype)
            convert_s = round(time.monotonic() - t, 1)
        result = anyio.run(bench, model, work, args.threads, args.requests, args.max_tokens)
    print(json.dumps({**result, "convert_s": convert_s, "qtype": args.qtype if args.model_dir else "as shipped"}))


if __name__ == "__main__":
    main()
