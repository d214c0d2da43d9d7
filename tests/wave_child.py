"""A real wave controller for tests and benchmarks: run_wave over the scripted researcher and SleepEnv.

SleepEnv is a tiny real Environment: its job is a shell script (through the real launcher)
that appends the rollout_id to a counter file the moment it starts, sleeps, and prints a harness
summary whose val_bpb comes from the train.py the researcher wrote. The counter file is how a
test counts launches per rollout across kills.

    python -m tests.wave_child RUN_DIR BASE_URL COUNTER --n N --slots K --sleep S
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import anyio

from rfs import config
from rfs.collect.slots import SlotPool
from rfs.collect.wave import run_wave
from rfs.envs.base import RunResult
from rfs.events import EventLog
from rfs.hosts import HostsFile, Slot
from rfs.launch.base import Job, JobOutcome
from rfs.rundir import RunDir

SEED_TRAIN_PY = "x = 0\n"
# The job: count the launch first, then "train" (sleep), then print the summary. val_bpb is
# 1 + x/100, so each rollout's number is its own and a mixed-up row would show. A shell script
# of builtins but `sleep`, not Python: a simulated run stands for work on another machine, so it
# should cost this machine next to nothing, and what tests and benches see is rfs.
_HARNESS = """
echo {rollout_id} >> {counter}
sleep {seconds}
read -r line < train.py
v=$(( 100 + ${{line#*=}} ))  # val_bpb in hundredths, printed with integer arithmetic only
sign=; if [ $v -lt 0 ]; then sign=-; v=$(( -v )); fi
echo "| training done"
printf 'val_bpb: %s%d.%02d0000\\n' "$sign" $(( v / 100 )) $(( v % 100 ))
echo "steps: 10"
echo "training_seconds: {seconds}"
"""


class SleepEnv:
    name = "sleep"

    def __init__(self, counter: Path, seconds: float, broken_slots: frozenset[str] = frozenset()):
        self.counter, self.seconds, self.broken_slots = str(counter), seconds, broken_slots

    def prepare(self) -> None:
        pass

    def program_md(self) -> str:
        return "Lower val_bpb by editing train.py.\n"

    def seed_train_py(self) -> str:
        return SEED_TRAIN_PY

    def harness_hashes(self) -> dict[str, str]:
        return {}

    def job(self, train_py: str, slot: Slot, rollout_id: str) -> Job:
        if slot.name in self.broken_slots:  # a slot whose host is gone: the infrastructure's failure
            raise ConnectionError(f"slot {slot.name} is unreachable")
        script = _HARNESS.format(counter=shlex.quote(self.counter), rollout_id=shlex.quote(rollout_id), seconds=self.seconds)
        return Job(rollout_id, ("/bin/sh", "-c", script), {"train.py": train_py.encode()}, timeout_s=60.0 + self.seconds)

    def result(self, outcome: JobOutcome) -> RunResult:
        text = outcome.output.decode(errors="replace")
        summary = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line and not line.startswith("|"))
        bpb = float(summary.get("val_bpb", "nan"))
        ok = outcome.exit_code == 0 and math.isfinite(bpb)
        return RunResult(
            status="success" if ok else ("timeout" if outcome.timed_out else "crash"),
            val_bpb=bpb if ok else math.nan,
            steps=int(summary.get("steps", 0)),
            training_seconds=float(summary.get("training_seconds", 0.0)),
            wall_seconds=outcome.wall_seconds,
            exit_code=outcome.exit_code,
            detail="ok" if ok else f"exit {outcome.exit_code}",
            stdout_tail=text[-2000:],
            summary=summary,
        )


def specs(n: int, *, loop: str = "A-S", round_: int = 1) -> list:
    from rfs.agent.rollout import RolloutSpec

    return [
        RolloutSpec(
            experiment="wave-test", loop=loop, arc="A", round=round_, version=0, thread=i,
            rollout_id=f"{loop}-r{round_}-t{i:03d}", seed=seed(i), start_train_py=SEED_TRAIN_PY,
            start_val_bpb=math.nan, memory="", conditioning_stamp="", researcher_model="scripted",
            researcher_weights_sha256="", env_name="sleep", program_md="Lower val_bpb.\n",
            seed_train_py_sha256="", program_md_sha256="",
        )
        for i in range(n)
    ]


def seed(i: int) -> int:
    return 1000 * (i + 1)  # the scripted researcher tells rollouts apart by seed; far more apart than max_turns


def plans(n: int) -> dict[int, list]:
    """Rollout i writes x = i + 1 (the seed has x = 0), runs it once, and finishes."""
    from tests.scripted_researcher import action

    return {
        seed(i): [action("edit", path="train.py", content=f"x = {i + 1}\n"), action("run"), action("finish")]
        for i in range(n)
    }


def wave_config(budget_s: float = 1.0, action_space: str = "code", **collect: int) -> config.Config:
    return config.load(
        None,
        {
            "experiment": {"preset": "cluster", "name": "wave-test"},
            "env": {"budget_s": budget_s, "timeout_s": budget_s + 60.0},
            "researcher": {"backend": "vllm", "model": "scripted", "action_space": action_space, "max_turns": 4, "turn_timeout_s": 30.0},
            "collect": collect,
        },
    )


def local_slots(k: int) -> list[Slot]:
    return [Slot(f"s{i}", "local", "localhost", (), -1, sys.executable, ".") for i in range(k)]


async def wave(root: Path, base_url: str, env: SleepEnv, n: int, k: int, cfg: config.Config | None = None, **kw) -> Path:
    """One run_wave with a fresh client, pool and event log, as a controller process would do it."""
    from rfs.agent.client import ResearcherClient

    cfg = cfg or wave_config(budget_s=env.seconds)
    run = RunDir(Path(root))
    events = EventLog(run.events)
    pool = SlotPool(local_slots(k), cfg.collect, events)
    async with ResearcherClient(base_url, "scripted", cfg.researcher) as client:
        try:
            return await run_wave(run, kw.pop("specs", None) or specs(n), cfg=cfg, env=env, pool=pool,
                                  hosts=HostsFile(), client=client, events=events, **kw)
        finally:
            events.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("base_url")
    p.add_argument("counter")
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--sleep", type=float, default=0.3)
    a = p.parse_args()
    out = anyio.run(wave, Path(a.run_dir), a.base_url, SleepEnv(Path(a.counter), a.sleep), a.n, a.slots)
    print(out, flush=True)


if __name__ == "__main__":
    main()
