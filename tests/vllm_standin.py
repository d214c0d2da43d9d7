#!/usr/bin/env python3
"""STAND-IN for the `vllm` executable (a test double): it takes vLLM's own command line, records
what it was given, and serves the scripted researcher on the port it was told.

    vllm_standin.py serve MODEL --served-model-name ID --host H --port P [vLLM flags ...]
    vllm_standin.py --help | --version

Each start writes $RFS_VLLM_STANDIN_DIR/<pid>.json: argv, CUDA_VISIBLE_DEVICES and the flags, so
a test can check which GPUs each server was given and that the sampling flags were set.
With $RFS_VLLM_STANDIN_PLANS=<experiment.toml>:<rounds>, it serves tests/loop_child.py's plans for
that experiment (the same replies the loop tests script), else no plan at all.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.scripted_researcher import ScriptedResearcher  # noqa: E402

VERSION = "0.0.0+rfs-standin"


def main(argv: list[str]) -> int:
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
    plans = {}
    if spec := os.environ.get("RFS_VLLM_STANDIN_PLANS"):
        from rfs import config
        from tests.loop_child import plans as loop_plans

        path, rounds = spec.rsplit(":", 1)
        plans = loop_plans(config.load(Path(path)), int(rounds))
    server = ScriptedResearcher(plans, model=flags["--served-model-name"], port=int(flags["--port"]))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with server:
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
