"""STAND-IN jobs: SleepEnv, a tiny real Environment whose job sleeps and prints a harness summary.

Its job is a shell script of builtins but `sleep` (no Python, no rfs checkout needed), run through
the real launcher on any slot (local, ssh, SLURM): it optionally appends the rollout_id to a
counter file the moment it starts (how a test counts launches per rollout across kills), sleeps,
and prints a harness summary whose val_bpb comes from the train.py the researcher wrote
(1 + x/100 for `x = N`), so each rollout's number is its own and a mixed-up row would show.
A simulated run stands for work on another machine, so it costs this one next to nothing.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

from rfs.envs.base import RunResult
from rfs.hosts import Slot
from rfs.launch.base import Job, JobOutcome

SEED_TRAIN_PY = "x = 0\n"
_COUNT = "echo {rollout_id} >> {counter}\n"
_HARNESS = """
sleep {seconds}
read -r line < train.py
v=$(( 100 + ${{line#*=}} ))  # val_bpb in hundredths, printed with integer arithmetic only
sign=; if [ $v -lt 0 ]; then sign=-; v=$(( -v )); fi
echo "| training done"
echo "| gpus: ${{CUDA_VISIBLE_DEVICES-unset}} ${{SLURM_STEP_GPUS-unset}}"  # what the launcher (or SLURM) gave the job
printf 'val_bpb: %s%d.%02d0000\\n' "$sign" $(( v / 100 )) $(( v % 100 ))
echo "steps: 10"
echo "training_seconds: {seconds}"
"""


class SleepEnv:
    name = "sleep"

    def __init__(self, counter: Path | None, seconds: float, broken_slots: frozenset[str] = frozenset()):
        """counter: a file on every slot's host (a test's own machine) to count launches in; None: none."""
        self.counter, self.seconds, self.broken_slots = (str(counter) if counter else ""), seconds, broken_slots

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
        count = _COUNT.format(counter=shlex.quote(self.counter), rollout_id=shlex.quote(rollout_id)) if self.counter else ""
        script = count + _HARNESS.format(seconds=self.seconds)
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
