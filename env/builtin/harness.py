"""The trusted runner of the built-in environment, one training run per call:

    python env/builtin/harness.py --workdir W --budget S --device cpu --threads T

Checks its own files against env/MANIFEST.sha256, restores pristine prepare.py and program.md into
W, trains W/train.py under guard.py with only the training split's path, kills it (and anything it
started) at the budget plus a start-up allowance, checks prepare.py is untouched, evaluates the
saved model in a separate process, and prints an autoresearch-style summary. Every line train.py
prints is re-emitted with a "| " prefix, so the unprefixed summary can only come from here.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ENV_DIR = Path(__file__).resolve().parent
MANIFEST = ENV_DIR.parent / "MANIFEST.sha256"
PRISTINE = ("prepare.py", "program.md")
PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG = 36, 1
GUARD_CHANNEL_CLOSED = 97  # guard.py's exit code when its violation pipe was tampered with


class Outcome(Exception):
    """Ends the run early with a status and a one-line reason."""

    def __init__(self, status: str, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_manifest() -> None:
    """This host's harness files must be the pinned ones; a mismatch is the host's fault."""
    try:
        lines = MANIFEST.read_text().splitlines()
    except OSError as exc:
        raise Outcome("infra_error", f"cannot read {MANIFEST}: {exc}") from None
    mine = [ln.split(maxsplit=1) for ln in lines if ln.strip()]
    mine = [(digest, name.lstrip("*")) for digest, name in mine if name.lstrip("*").startswith(ENV_DIR.name + "/")]
    if not mine:
        raise Outcome("infra_error", f"{MANIFEST} pins no {ENV_DIR.name}/ files")
    for digest, name in mine:
        path = ENV_DIR.parent / name
        if not path.exists() or _sha(path) != digest:
            raise Outcome("infra_error", f"harness file {name} on this host differs from env/MANIFEST.sha256")


def _libc_prctl(option: int, arg: int) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)


def _die_with_parent() -> None:
    _libc_prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _reap_orphans() -> None:
    """As child subreaper we inherit every process train.py left behind; kill and reap them all."""
    for _ in range(50):
        kids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid():
                kids.append(int(stat.parent.name))
        if not kids:
            return
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def _pump(stream, sink) -> threading.Thread:
    def run() -> None:
        for raw in iter(stream.readline, b""):
            sink(raw.decode(errors="replace").rstrip("\n"))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def train(workdir: Path, data: Path, args, stats: dict, echo) -> tuple[int | None, bool, list[str]]:
    """Run train.py under the guard; return (exit code, timed out, guard violations)."""
    read_fd, write_fd = os.pipe()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RFS_")}
    env.update(
        RFS_TRAIN_DATA=str(data / "train.bin"),
        RFS_TIME_BUDGET=str(args.budget),
        RFS_DEVICE=args.device,
        RFS_THREADS=str(args.threads),
        RFS_GUARD_FD=str(write_fd),
        RFS_GUARD_CACHE=str(data.parent.parent),  # the whole cache, not just this env's data
        OMP_NUM_THREADS=str(args.threads),
        PYTHONUNBUFFERED="1",
    )
    started = time.time()
    proc = subprocess.Popen(
        [sys.executable, str(ENV_DIR / "guard.py"), "train.py"],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        pass_fds=(write_fd,), process_group=0, preexec_fn=_die_with_parent,
    )
    os.close(write_fd)
    violations: list[str] = []
    pumps = [_pump(proc.stdout, echo), _pump(os.fdopen(read_fd, "rb"), violations.append)]
    timed_out = False
    try:
        proc.wait(timeout=args.budget + args.grace)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _kill_group(proc.pid)
        proc.wait()
        _reap_orphans()
    for p in pumps:
        p.join(timeout=5)
    stats["training_wall"] = time.time() - started
    stats["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return proc.returncode, timed_out, violations


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def evaluate(workdir: Path, args) -> dict:
    env = dict(os.environ, RFS_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(
        [sys.executable, str(ENV_DIR / "evaluate.py"), str(workdir)],
        cwd=ENV_DIR, env=env, capture_output=True, text=True, timeout=args.eval_timeout,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise Outcome("infra_error", f"the evaluator exited {proc.returncode}: {proc.stderr.strip()[-200:]}")
    return json.loads(lines[-1])


def _last_error(lines: list[str]) -> str:
    for line in reversed(lines):
        if line.strip():
            return line.strip()[:200]
    return "no output"


def run(args, summary: dict) -> None:
    workdir = Path(args.workdir).resolve()
    check_manifest()
    import prepare  # only once it is known to be the pinned file

    try:
        data = prepare.prepare()
    except Exception as exc:
        raise Outcome("infra_error", f"data not available on this host: {exc}") from None
    for name in PRISTINE:
        shutil.copyfile(ENV_DIR / name, workdir / name)
    pristine = _sha(ENV_DIR / "prepare.py")
    source = (workdir / "train.py").read_bytes()
    try:
        compile(source, "train.py", "exec")
    except SyntaxError as exc:
        raise Outcome("syntax_error", f"train.py line {exc.lineno}: {exc.msg}") from None
    tail: list[str] = []

    def echo(line: str) -> None:
        tail.append(line)
        del tail[:-20]
        print("| " + line, flush=True)

    stats: dict = {}
    code, timed_out, violations = train(workdir, data, args, stats, echo)
    summary.update(training_seconds=stats["training_wall"], peak_memory_mb=stats["peak_memory_mb"])
    info = _read_info(workdir)
    summary.update(num_steps=info.get("steps", 0), num_tokens=info.get("tokens", 0))
    if "training_seconds" in info:
        summary["training_seconds"] = info["training_seconds"]
    if violations:
        raise Outcome("harness_violation", f"guard denied {violations[0]}")
    if not (workdir / "prepare.py").exists() or _sha(workdir / "prepare.py") != pristine:
        raise Outcome("harness_violation", "prepare.py was modified during the run")
    if code == GUARD_CHANNEL_CLOSED:
        raise Outcome("harness_violation", "train.py closed the harness guard's channel")
    if timed_out:
        raise Outcome("timeout", f"training ran past the budget of {args.budget:g}s + {args.grace:g}s start-up allowance")
    if code != 0:
        raise Outcome("crash", f"train.py exited {code}: {_last_error(tail)}")
    if not (workdir / "model.pt2").exists():
        raise Outcome("crash", "train.py finished without saving a model (prepare.save_model)")
    verdict = evaluate(workdir, args)
    if "violation" in verdict:
        raise Outcome("harness_violation", verdict["violation"])
    if "error" in verdict:
        raise Outcome("crash", verdict["error"])
    bpb = float(verdict["val_bpb"])
    if not math.isfinite(bpb):
        raise Outcome("crash", f"val_bpb is {bpb}")
    summary.update(val_bpb=bpb, status="success", detail=f"{summary['num_steps']} steps, evaluated by the harness")


def _read_info(workdir: Path) -> dict:
    try:
        info = json.loads((workdir / "model.json").read_text())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--budget", type=float, required=True, help="training seconds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grace", type=float, default=20.0, help="start-up allowance before a hard kill")
    p.add_argument("--eval-timeout", type=float, default=120.0)
    args = p.parse_args()
    _libc_prctl(PR_SET_CHILD_SUBREAPER, 1)
    # The launcher stops us with SIGTERM; unwinding through train()'s finally kills the training run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    summary = {"val_bpb": math.nan, "training_seconds": 0.0, "peak_memory_mb": 0.0, "num_steps": 0, "num_tokens": 0}
    try:
        run(args, summary)
    except Outcome as out:
        summary.update(status=out.status, detail=out.detail)
    except subprocess.TimeoutExpired:
        summary.update(status="timeout", detail=f"the evaluator ran past {args.eval_timeout:g}s on this model")
    if summary["status"] != "success":
        summary["val_bpb"] = math.nan
    summary["total_seconds"] = time.time() - started
    print("---")
    for key in ("val_bpb", "training_seconds", "total_seconds", "peak_memory_mb", "num_steps", "num_tokens"):
        value = summary[key]
        text = f"{value:.6f}" if key == "val_bpb" else f"{value:.1f}" if isinstance(value, float) else str(value)
        print(f"{key + ':':18s}{text}")
    print(f"{'status:':18s}{summary['status']}")
    print(f"{'detail:':18s}{summary['detail']}", flush=True)


if __name__ == "__main__":
    main()
