"""Controller CPU time per agent turn, with the scripted researcher (the test double) on loopback.

Prints JSON. The researcher runs in a child process so time.process_time() counts only the
controller: prompt building, HTTP, parsing, edits and trace rows. Training is an instant callback
(a stand-in for the wave's RunTraining), so the number is the agent's own overhead per turn.

    /work/venv/bin/python bench/agent_turns.py [--repeats 5] [--concurrency 1 48]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rfs.agent.client import ResearcherClient  # noqa: E402
from rfs.agent.rollout import Executed, RolloutSpec, rollout  # noqa: E402
from rfs.config import ResearcherCfg  # noqa: E402
from rfs.envs.base import RunResult  # noqa: E402
from tests.scripted_researcher import ScriptedResearcher, action  # noqa: E402

TRAIN_PY = "".join(f"LAYER_{i} = {i}  # a line of a plausible train.py\n" for i in range(300))
PLAN = [
    action("read", "look first", path="train.py"),
    action("edit", "change one line", path="train.py", search="LAYER_7 = 7", replace="LAYER_7 = 8"),
    action("run", "measure it"),
    action("finish", "done"),
]
SPACING = 100  # plan keys are rollout seeds; the agent sends seed + turn


def _serve(n: int, queue: mp.Queue) -> None:
    with ScriptedResearcher({SPACING * i: PLAN for i in range(n)}) as server:
        queue.put(server.base_url)
        time.sleep(3600)


async def _instant(train_py: str) -> Executed:
    result = RunResult("success", val_bpb=1.0, steps=10, exit_code=0, stdout_tail="step 10 loss 1.0\n" * 20)
    return Executed(result, "localhost", "bench", "cpu", "", 0, "")


def _spec(i: int) -> RolloutSpec:
    return RolloutSpec(
        "bench", "S", "A", 1, "v0", i, f"r{i}", SPACING * i, TRAIN_PY, float("nan"), "", "", "scripted", "", "bench",
        "Improve train.py.", "", "",
    )


async def _wave(base_url: str, n: int) -> tuple[float, int]:
    cfg = ResearcherCfg(backend="vllm", action_space="code", max_turns=6)
    rows: list[dict] = []
    async with ResearcherClient(base_url, "scripted", cfg) as client:

        async def one(i: int) -> None:
            rows.append(await rollout(_spec(i), cfg, client, _instant))

        t0 = time.process_time()
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
        cpu = time.process_time() - t0
    assert all(r["status"] == "success" for r in rows), {r["status"] for r in rows}
    return cpu, sum(r["turns"] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 48])
    args = ap.parse_args()
    queue: mp.Queue = mp.get_context("fork").Queue()
    child = mp.get_context("fork").Process(target=_serve, args=(max(args.concurrency), queue), daemon=True)
    child.start()
    base_url = queue.get(timeout=30)
    out = {"bench": "agent_turns", "unit": "controller CPU ms per turn", "repeats": args.repeats, "results": []}
    try:
        for n in args.concurrency:
            per_turn = []
            for _ in range(args.repeats):
                cpu, turns = anyio.run(_wave, base_url, n)
                per_turn.append(1000 * cpu / turns)
            out["results"].append({
                "concurrent_rollouts": n, "turns_per_wave": turns,
                "min_ms": round(min(per_turn), 3), "median_ms": round(statistics.median(per_turn), 3),
            })
    finally:
        child.terminate()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
