#!/usr/bin/env python3
"""STAND-IN for the `vllm` executable (a test double): it takes vLLM's own command line, records
what it was given, and serves the scripted researcher on the port it was told.

    vllm_standin.py serve MODEL --served-model-name ID --host H --port P [vLLM flags ...]
    vllm_standin.py --help | --version

Each start writes $RFS_VLLM_STANDIN_DIR/<pid>.json: argv, CUDA_VISIBLE_DEVICES and the flags, so
a test can check which GPUs each server was given and that the sampling flags were set.
Run as `python -m rfs.rehearsal.plans EXPERIMENT.toml ROUNDS serve ...` it serves the plans of that
experiment (the same replies the loop tests script); run alone, no plan at all (stdlib only, so any
python3 runs it). It holds no GPU memory: it runs beside anything on a user's real server GPUs.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the rfs checkout

from rfs.rehearsal.scripted_researcher import ScriptedResearcher  # noqa: E402

VERSION = "0.0.0+rfs-standin"


def main(argv: list[str], plans: dict[int, list] | None = None) -> int:
    if not argv or argv[0] in ("--help", "-h", "--version"):
        print(f"vllm {VERSION} (rfs stand-in): vllm serve MODEL --port P ...")
        return 0
    if argv[0] != "serve" or len(argv) < 2:
        print(f"unknown command {argv[:1]}", file=sys.stderr)
        return 2
    flags = dict(zip(argv[2::2], argv[3::2]))
    out = os.environ.get("RFS_VLLM_STANDIN_DIR")
    if out:
        record = {"argv": argv, "model": argv[1], "flags": flags, "pid": os.getpid(),
                  "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{os.getpid()}.json").write_text(json.dumps(record))
    server = ScriptedResearcher(plans or {}, model=flags["--served-model-name"], port=int(flags["--port"]))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with server:
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
