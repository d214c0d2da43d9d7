"""The autoresearch environment: Karpathy's autoresearch at a pinned commit, on a GPU host.

Its evaluation lives in the pristine prepare.py that train.py imports, so the guard is the
restore + sha256 check: the host runner (`python -m rfs.envs.autoresearch run …`, started by the
job) copies the pinned prepare.py into the working directory, runs the edited train.py with the
checkout's own environment, checks prepare.py is unchanged, re-emits train.py's lines with a "| "
prefix and prints the summary with both hashes. vendor.sh makes the checkout (never on CI).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from rfs import ROOT
from rfs.config import EnvCfg
from rfs.envs.base import RunResult
from rfs.envs.builtin import TAIL_LINES, count, manifest, number, outcome_result, parse_summary
from rfs.hosts import Slot
from rfs.launch.base import WORKDIR, Job, JobOutcome

ENV_DIR = ROOT / "env" / "autoresearch"
STATUSES = ("success", "crash", "timeout", "harness_violation", "syntax_error", "infra_error")


def upstream(path: Path = ENV_DIR / "UPSTREAM") -> dict[str, str]:
    """UPSTREAM's `key = value` lines: url, commit, prepare_sha256, train_sha256."""
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            out[key.strip()] = value.strip()
    return out


def parse_autoresearch(output: str) -> dict[str, str]:
    """autoresearch's own summary: the `key: value` lines after its `---` line."""
    return parse_summary(output.replace("\r", "\n"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class AutoresearchEnv:
    name = "autoresearch"

    def __init__(self, cfg: EnvCfg, checkout: str = ""):
        self.cfg = cfg
        # Where vendor.sh put the pinned clone on every GPU host (same path on each).
        self.checkout = checkout or os.environ.get("RFS_AUTORESEARCH", "env/autoresearch/checkout")

    def prepare(self) -> None:
        """Nothing to do here: vendor.sh prepares each GPU host; the runner reports a missing one."""

    def program_md(self) -> str:
        return (ENV_DIR / "program.md").read_text()

    def seed_train_py(self) -> str:
        checkout = ROOT / self.checkout
        path = checkout / ".rfs-pristine" / "train.py"
        if not path.exists():
            raise RuntimeError(f"autoresearch is not vendored here: run env/autoresearch/vendor.sh {checkout}")
        return path.read_text()

    def harness_hashes(self) -> dict[str, str]:
        up = upstream()
        return {
            "autoresearch/program.md": manifest()["autoresearch/program.md"],
            "autoresearch/prepare.py": up["prepare_sha256"],
            "autoresearch/train.py": up["train_sha256"],
        }

    def job(self, train_py: str, slot: Slot, rollout_id: str) -> Job:
        checkout = str(Path(slot.root) / self.checkout)
        argv = (slot.python, "-m", "rfs.envs.autoresearch", "run", "--workdir", WORKDIR, "--checkout", checkout,
                "--kill-after", f"{(self.cfg.timeout_s + self.cfg.budget_s) / 2:g}")
        env = {"PYTHONPATH": slot.root, "CUDA_VISIBLE_DEVICES": str(max(slot.gpu, 0))}
        return Job(rollout_id, argv, {"train.py": train_py.encode()}, self.cfg.timeout_s, env)

    def result(self, outcome: JobOutcome) -> RunResult:
        early = outcome_result(outcome)
        if early is not None:
            return early
        text = outcome.output.decode(errors="replace")
        tail = "\n".join(text.splitlines()[-TAIL_LINES:])
        summary = parse_summary(text)
        status = summary.get("status", "")
        if status not in STATUSES:
            return RunResult("crash", exit_code=outcome.exit_code, wall_seconds=outcome.wall_seconds,
                             detail=f"the runner printed no summary (exit {outcome.exit_code})", stdout_tail=tail)
        bpb = number(summary, "val_bpb")
        return RunResult(
            status,
            val_bpb=bpb if status == "success" else math.nan,
            steps=count(summary, "num_steps"),
            tokens=int(number(summary, "total_tokens_M", 0.0) * 1e6),
            training_seconds=number(summary, "training_seconds", 0.0),
            wall_seconds=outcome.wall_seconds,
            peak_memory_mb=number(summary, "peak_vram_mb", 0.0),
            exit_code=outcome.exit_code,
            detail=summary.get("detail", ""),
            stdout_tail=tail,
            summary=summary,
        )


# --- the host runner --------------------------------------------------------------------------------


def _train(checkout: Path, workdir: Path, kill_after: float) -> tuple[int | None, str]:
    """Run train.py with the checkout's interpreter; echo its lines prefixed; kill the group at the limit."""
    python = checkout / ".venv" / "bin" / "python"
    proc = subprocess.Popen([str(python), "train.py"], cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[str] = []

    def pump() -> None:
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append(line)
            print("| " + line.replace("\r", "\n| "), flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=kill_after)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        code = None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        reader.join(timeout=5)
    return code, "\n".join(lines)


def _run(args) -> dict[str, str]:
    checkout, workdir = Path(args.checkout), Path(args.workdir)
    pinned = upstream(Path(args.upstream))
    pristine = checkout / ".rfs-pristine" / "prepare.py"
    if not pristine.exists() or not (checkout / ".venv" / "bin" / "python").exists():
        return {"status": "infra_error", "detail": f"no vendored autoresearch at {checkout} (run vendor.sh)"}
    before = _sha(pristine)
    if before != pinned["prepare_sha256"]:
        return {"status": "infra_error", "detail": f"{pristine} is not the pinned prepare.py", "prepare_sha256_before": before}
    shutil.copyfile(pristine, workdir / "prepare.py")
    out = {"prepare_sha256_before": before, "train_py_sha256": _sha(workdir / "train.py")}
    try:
        compile((workdir / "train.py").read_bytes(), "train.py", "exec")
    except SyntaxError as exc:
        return {**out, "status": "syntax_error", "detail": f"train.py line {exc.lineno}: {exc.msg}"}
    code, text = _train(checkout, workdir, args.kill_after)
    after = _sha(workdir / "prepare.py") if (workdir / "prepare.py").exists() else "missing"
    out["prepare_sha256_after"] = after
    raw = parse_autoresearch(text)
    if after != before:
        return {**out, "status": "harness_violation", "detail": "prepare.py was modified during the run"}
    if code is None:
        return {**out, "status": "timeout", "detail": f"train.py ran past {args.kill_after:g}s"}
    out.update((k, v) for k, v in raw.items() if k not in ("status", "detail"))
    bpb = number(raw, "val_bpb")
    if code != 0:
        last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "no output")
        return {**out, "status": "crash", "detail": f"train.py exited {code}: {last.strip()[:200]}"}
    if not math.isfinite(bpb):
        return {**out, "status": "crash", "detail": "train.py printed no finite val_bpb"}
    return {**out, "status": "success", "detail": f"{raw.get('num_steps', '?')} steps; prepare.py unchanged"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m rfs.envs.autoresearch")
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run one edited train.py in a launcher working directory (on the GPU host)")
    run.add_argument("--workdir", required=True)
    run.add_argument("--checkout", required=True)
    run.add_argument("--kill-after", type=float, required=True)
    run.add_argument("--upstream", default=str(ENV_DIR / "UPSTREAM"), help="the pins (tests use their own)")
    args = p.parse_args(argv)
    summary = _run(args)
    summary.setdefault("val_bpb", "nan")
    if summary["status"] != "success":
        summary["val_bpb"] = "nan"
    print("---")
    for key, value in summary.items():
        print(f"{key + ':':24s}{value}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
