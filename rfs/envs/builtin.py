"""The built-in environment: a CPU-scale byte-level GPT task with a trusted harness (env/builtin/).

The job runs env/builtin/harness.py on the slot's host; the harness trains the edited train.py
under a guard, evaluates the saved model in its own process and prints the summary this module
parses. Nothing train.py prints can become a val_bpb: its lines arrive prefixed with "| ".
"""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from pathlib import Path

from rfs import ROOT
from rfs.config import EnvCfg
from rfs.envs.base import RunResult
from rfs.hosts import Slot
from rfs.launch.base import WORKDIR, Job, JobOutcome

ENV_DIR = ROOT / "env" / "builtin"
MANIFEST = ROOT / "env" / "MANIFEST.sha256"
# Every file env/MANIFEST.sha256 pins (paths relative to env/). Regenerate after a deliberate change:
#   python -m rfs.envs.builtin > env/MANIFEST.sha256
PINNED = ("builtin/program.md", "builtin/prepare.py", "builtin/harness.py", "builtin/guard.py",
          "builtin/evaluate.py", "builtin/train.py", "builtin/sandbox.py", "autoresearch/program.md",
          "autoresearch/handover.py", "autoresearch/score.py")
HARNESS_STATUSES = ("success", "crash", "timeout", "harness_violation", "syntax_error", "infra_error")
TAIL_LINES = 40


def manifest(root: Path = ROOT) -> dict[str, str]:
    """<root>/env/MANIFEST.sha256 as {path relative to env/: sha256}."""
    out = {}
    for line in (root / "env" / "MANIFEST.sha256").read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            out[name.lstrip("*")] = digest
    return out


def manifest_text() -> str:
    """What env/MANIFEST.sha256 should hold for the files as they are now (sha256sum format)."""
    return "".join(f"{hashlib.sha256((ROOT / 'env' / name).read_bytes()).hexdigest()}  {name}\n" for name in PINNED)


def parse_summary(output: str) -> dict[str, str]:
    """The harness's unprefixed `key: value` lines after its last `---` line (train.py's are prefixed)."""
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "---"]
    if not starts:
        return {}
    summary = {}
    for line in lines[starts[-1] + 1 :]:
        key, sep, value = line.partition(":")
        if sep and key and not line.startswith(("|", " ")):
            summary[key.strip()] = value.strip()
    return summary


def number(summary: dict[str, str], key: str, default: float = math.nan) -> float:
    try:
        return float(summary[key])
    except (KeyError, ValueError):
        return default


def count(summary: dict[str, str], key: str) -> int:
    value = number(summary, key, 0.0)
    return int(value) if math.isfinite(value) else 0


def _tail(output: str) -> str:
    return "\n".join(output.splitlines()[-TAIL_LINES:])


def outcome_result(outcome: JobOutcome) -> RunResult | None:
    """The statuses a launcher decides on its own (no summary needed), else None."""
    text = outcome.output.decode(errors="replace")
    if outcome.infra_error:
        return RunResult("infra_error", exit_code=outcome.exit_code, wall_seconds=outcome.wall_seconds,
                         detail=outcome.infra_error, stdout_tail=_tail(text))
    if outcome.timed_out:
        return RunResult("timeout", exit_code=None, wall_seconds=outcome.wall_seconds,
                         detail=f"the job ran past its hard timeout ({outcome.wall_seconds:.0f}s)", stdout_tail=_tail(text))
    return None


class BuiltinEnv:
    name = "builtin"

    def __init__(self, cfg: EnvCfg):
        self.cfg = cfg

    def prepare(self) -> None:
        """Download the pinned corpus and write the split once (runs env/builtin/prepare.py)."""
        proc = subprocess.run([sys.executable, str(ENV_DIR / "prepare.py")], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"builtin env: prepare.py failed: {proc.stderr.strip()[-800:]}")

    def program_md(self) -> str:
        return (ENV_DIR / "program.md").read_text()

    def seed_train_py(self) -> str:
        return (ENV_DIR / "train.py").read_text()

    def harness_hashes(self) -> dict[str, str]:
        return {name: digest for name, digest in manifest().items() if name.startswith("builtin/")}

    def tolerance_s(self) -> float:
        """How far past the budget the harness's clock lets a run go (the model's export and the
        exit); a run still going then is killed: a timeout, never a success."""
        return max(5.0, 0.1 * self.cfg.budget_s)

    def grace_s(self) -> float:
        """Start-up allowance, until train.py draws its data: half of what the job timeout leaves
        beyond budget and tolerance, so evaluation still fits inside the launcher's timeout."""
        return max(2.0, (self.cfg.timeout_s - self.cfg.budget_s - self.tolerance_s()) / 2)

    def job(self, train_py: str, slot: Slot, rollout_id: str) -> Job:
        harness = str(Path(slot.root) / "env" / "builtin" / "harness.py")
        threads = max(1, len(slot.cpus))
        argv = (slot.python, harness, "--workdir", WORKDIR, "--budget", f"{self.cfg.budget_s:g}",
                "--device", self.cfg.device, "--threads", str(threads), "--grace", f"{self.grace_s():g}",
                "--tolerance", f"{self.tolerance_s():g}", "--eval-timeout", f"{self.grace_s():g}")
        return Job(rollout_id, argv, {"train.py": train_py.encode()}, self.cfg.timeout_s)

    def result(self, outcome: JobOutcome) -> RunResult:
        early = outcome_result(outcome)
        if early is not None:
            return early
        text = outcome.output.decode(errors="replace")
        summary = parse_summary(text)
        status = summary.get("status", "")
        if status not in HARNESS_STATUSES:
            return RunResult("crash", exit_code=outcome.exit_code, wall_seconds=outcome.wall_seconds,
                             detail=f"the harness printed no summary (exit {outcome.exit_code})",
                             stdout_tail=_tail(text), summary=summary)
        bpb = number(summary, "val_bpb")
        if status == "success" and not math.isfinite(bpb):
            status, summary["detail"] = "crash", f"val_bpb is {bpb}"
        return RunResult(
            status,
            val_bpb=bpb if status == "success" else math.nan,
            steps=count(summary, "num_steps"),
            tokens=count(summary, "num_tokens"),
            training_seconds=number(summary, "training_seconds", 0.0),
            wall_seconds=outcome.wall_seconds,
            peak_memory_mb=number(summary, "peak_memory_mb", 0.0),
            exit_code=outcome.exit_code,
            detail=summary.get("detail", ""),
            stdout_tail=_tail(text),
            summary=summary,
        )


if __name__ == "__main__":
    print(manifest_text(), end="")
