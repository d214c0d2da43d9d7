"""Benchmark the built-in environment: data preparation (cold and warm) and the seed train.py.

    python bench/env_seed.py [--budget 30] [--repeats 3] [--core N]

Prints one JSON object. The seed runs through the real harness and the local launcher on one core;
the load average says what else the machine was doing (these numbers are only comparable between
runs on an equally quiet machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rfs import ROOT  # noqa: E402
from rfs.config import EnvCfg, load  # noqa: E402
from rfs.envs import execute  # noqa: E402
from rfs.envs.builtin import ENV_DIR, BuiltinEnv  # noqa: E402
from rfs.hosts import Slot  # noqa: E402
from rfs.launch.local import LocalLauncher  # noqa: E402
from rfs.launch.netns import isolation  # noqa: E402


def time_prepare(cache: str | None) -> float:
    env = dict(os.environ, RFS_CACHE=cache) if cache else dict(os.environ)
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ENV_DIR / "prepare.py")], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "values": values}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    embedded = load().env
    p.add_argument("--budget", type=float, default=embedded.budget_s)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--core", type=int, default=sorted(os.sched_getaffinity(0))[-1])
    args = p.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as cold:
        prepare_cold = time_prepare(cold)
    prepare_warm = time_prepare(None)
    cfg = EnvCfg(name="builtin", budget_s=args.budget, timeout_s=embedded.timeout_s - embedded.budget_s + args.budget, device="cpu")
    env = BuiltinEnv(cfg)
    slot = Slot(f"local-{args.core}", "local", "localhost", (args.core,), -1, sys.executable, str(ROOT))
    runs = []
    for i in range(args.repeats):
        result, _ = anyio.run(execute, env, LocalLauncher(), slot, env.seed_train_py(), f"bench-{i}")
        runs.append(result)
    ok = [r for r in runs if r.status == "success"]
    out = {
        "budget_s": args.budget,
        "repeats": args.repeats,
        "core": args.core,
        "network_isolation": str(isolation()),
        "prepare_cold_s": round(prepare_cold, 2),
        "prepare_warm_s": round(prepare_warm, 2),
        "statuses": [r.status for r in runs],
        "val_bpb": summary([r.val_bpb for r in ok]) if ok else None,
        "steps": summary([r.steps for r in ok]) if ok else None,
        "steps_per_s": summary([r.steps / r.training_seconds for r in ok if r.training_seconds > 0]) if ok else None,
        "wall_s": summary([round(r.wall_seconds, 1) for r in runs]),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
