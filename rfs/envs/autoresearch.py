"""The autoresearch environment: Karpathy's autoresearch at a pinned commit, on a GPU host.

Upstream's evaluation lives in the prepare.py that train.py imports and its numbers are what
train.py prints; rfs believes neither. The host runner (`python -m rfs.envs.autoresearch run …`,
started by the job) copies the pinned prepare.py into the working directory and runs the edited
train.py through env/autoresearch/handover.py, confined by env/builtin/sandbox.py (the validation
file hidden, everything but the working directory read-only, no capabilities). Its clock runs from
the first training batch to the model handed over at evaluate_bpb; a separate process
(env/autoresearch/score.py) scores the exported graph with the pristine evaluate_bpb after a
causality check. train.py's lines come back with a "| " prefix; a val_bpb it printed is recorded
as printed_val_bpb and compared. What upstream's design leaves open: its loss is the model's own
(model(x, y, reduction='none')), so score.py checks that loss is a normalised causal prediction;
and the training shards stay readable before the first batch, so start-up is bounded by its own
allowance. vendor.sh provisions each host (never on CI).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
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

    def __init__(self, cfg: EnvCfg, checkout: str = "", pins: Path | None = None):
        self.cfg = cfg
        # Where vendor.sh put the pinned clone on every GPU host (same path on each).
        self.checkout = checkout or os.environ.get("RFS_AUTORESEARCH", "env/autoresearch/checkout")
        self.pins = pins  # None: each host's own env/autoresearch/UPSTREAM (tests pin their stand-in)
        self.timing: dict[str, dict] = {}  # slot host -> its kind's measured seconds (use_calibration)

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
        up = upstream(self.pins or ENV_DIR / "UPSTREAM")
        return {
            "autoresearch/program.md": manifest()["autoresearch/program.md"],
            "autoresearch/prepare.py": up["prepare_sha256"],
            "autoresearch/train.py": up["train_sha256"],
        }

    def tolerance_s(self) -> float:
        """How far past the budget the runner's clock lets training go (the export, the exit), and the
        slack on each measured phase once a calibration exists."""
        return max(5.0, 0.1 * self.cfg.budget_s)

    def use_calibration(self, cal: dict) -> str:
        """Derive later runs' limits from the calibration's measured start-up and evaluation seconds
        per host kind (rfs.envs.calibrate); return the one line that says what they are."""
        self.timing = {host: cal["timing"][kind] for host, kind in cal.get("host_kinds", {}).items()
                       if kind in cal.get("timing", {})}
        if not self.timing:
            return f"kill limit: {self.cfg.timeout_s:g}s (no measured start-up or evaluation in the calibration)"
        return "kill limit: " + "; ".join(
            f"{host}: {self.limits(host)[2]:g}s = budget {self.cfg.budget_s:g} + start-up {t['startup_seconds']['max']:g} "
            f"+ evaluation {t['eval_seconds']['max']:g} + 4 x {self.tolerance_s():g} tolerance, capped at {self.cfg.timeout_s:g}"
            for host, t in sorted(self.timing.items()))

    def limits(self, host: str) -> tuple[float, float, float]:
        """(start-up allowance, evaluation allowance, kill limit) for a run on `host`.

        Upstream's time rules: its clock leaves out start-up (imports, kernel fetch, compile) and the
        final evaluation, and its program.md kills a run only at 10 minutes (env.timeout_s). Measured
        on this host's kind (the calibration's slowest run, plus the tolerance on each phase and once
        for the runner itself); never measured there: the job's limit beyond budget and tolerance,
        split evenly between start-up and evaluation."""
        tol, t = self.tolerance_s(), self.timing.get(host)
        if t is None:
            half = max(5.0, (self.cfg.timeout_s - self.cfg.budget_s - tol) / 2)
            return half, half, self.cfg.timeout_s
        startup, evaluation = t["startup_seconds"]["max"] + tol, t["eval_seconds"]["max"] + tol
        return startup, evaluation, min(self.cfg.timeout_s, self.cfg.budget_s + tol + startup + evaluation + tol)

    def job(self, train_py: str, slot: Slot, rollout_id: str) -> Job:
        checkout = str(Path(slot.root) / self.checkout)
        startup, evaluation, limit = self.limits(slot.host)
        argv = (slot.python, "-m", "rfs.envs.autoresearch", "run", "--workdir", WORKDIR, "--checkout", checkout,
                "--budget", f"{self.cfg.budget_s:g}", "--startup", f"{startup:g}",
                "--tolerance", f"{self.tolerance_s():g}", "--eval-timeout", f"{evaluation:g}",
                *(("--upstream", str(self.pins)) if self.pins else ()))
        env = {"PYTHONPATH": slot.root, "CUDA_VISIBLE_DEVICES": str(max(slot.gpu, 0))}
        return Job(rollout_id, argv, {"train.py": train_py.encode()}, limit, env)

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

SANDBOX = ROOT / "env" / "builtin" / "sandbox.py"
HANDOVER, SCORE = ENV_DIR / "handover.py", ENV_DIR / "score.py"
RUNNER_FILES = ("builtin/sandbox.py", "autoresearch/handover.py", "autoresearch/score.py")
NS_ROOT = ("unshare", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private", "--kill-child")
NS_USER = ("unshare", "--user", "--map-root-user", *NS_ROOT[1:])
ECHO_HEAD, ECHO_TAIL, LINE_MAX = 200, 200, 4096  # train.py's lines passed on, as in env/builtin/harness.py
WATCH_S = 0.1
# A printed val_bpb further than this from the harness's own is recorded as a mismatch.
PRINTED_TOLERANCE = 1e-3


def _sandbox(python: Path, workdir: Path, val: Path) -> tuple[list[str], str]:
    """The argv prefix that runs train.py with the validation file hidden, and its name."""
    for unshare, name in ((NS_ROOT, "mount+pid namespaces"), (NS_USER, "user+mount+pid namespaces")):
        prefix = [*unshare, sys.executable, str(SANDBOX), "--workdir", str(workdir), "--hide-file", str(val), "--"]
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0:
                return prefix, name
        except (OSError, subprocess.TimeoutExpired):
            pass
    return [], "none: this host allows no mount namespace, the validation file stays readable (handover only)"


class _Clock:
    """The runner's training clock, driven by handover.py over a pipe: "1" when the first training
    batch is drawn, "2" when the model is handed over (the run is then killed at once and the model
    moved out of its reach)."""

    def __init__(self, fd: int, pgid: int, workdir: Path, taken: Path):
        self.start: float | None = None
        self.end: float | None = None
        self._args = (fd, pgid, workdir, taken)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        fd, pgid, workdir, taken = self._args
        try:
            while byte := os.read(fd, 1):
                if byte == b"1" and self.start is None:
                    self.start = time.monotonic()
                elif byte == b"2":
                    self.end = time.monotonic()
                    _kill(pgid)
                    for name in ("model.pt2", "model.json"):
                        if (workdir / name).is_file():
                            shutil.move(workdir / name, taken / name)
                    return
        finally:
            os.close(fd)


def _kill(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def provisioned_env(checkout: Path) -> dict[str, str]:
    """The variables vendor.sh wrote for every run on this host (the local hub cache, offline)."""
    path = checkout / ".rfs-env"
    if not path.exists():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _train(python: Path, prefix: list[str], workdir: Path, taken: Path, args, lines: list[str]) -> tuple[int | None, str, _Clock]:
    """Run train.py confined, through handover.py; return (exit code, why it was stopped or "", clock)."""
    read, write = os.pipe()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RFS_")}
    env.update(provisioned_env(Path(args.checkout)), RFS_HANDOVER_FD=str(write), PYTHONUNBUFFERED="1")
    spawned = time.monotonic()
    proc = subprocess.Popen([*prefix, str(python), str(HANDOVER), "train.py"], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(write,), process_group=0)
    os.close(write)
    clock = _Clock(read, proc.pid, workdir, taken)
    held: collections.deque[str] = collections.deque(maxlen=ECHO_TAIL)
    dropped = [0]

    def pump() -> None:
        for raw in iter(lambda: proc.stdout.readline(LINE_MAX), b""):
            line = raw.decode(errors="replace").rstrip("\n")
            if len(lines) < ECHO_HEAD:
                lines.append(line)
                print("| " + line.replace("\r", "\n| "), flush=True)
            else:
                dropped[0] += len(held) == held.maxlen
                held.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    stopped = ""
    try:
        while proc.poll() is None and clock.end is None and not stopped:
            now = time.monotonic()
            if clock.start is None and now > spawned + args.startup:
                stopped = f"start-up ran past its allowance of {args.startup:g}s before the first training batch"
            elif clock.start is not None and now > clock.start + args.budget + args.tolerance:
                stopped = f"training ran past the budget of {args.budget:g}s + {args.tolerance:g}s tolerance (harness clock)"
            time.sleep(WATCH_S)
    finally:
        _kill(proc.pid)
        proc.wait()
        clock.thread.join(timeout=10)
        reader.join(timeout=5)
    if dropped[0]:
        print(f"| [runner: {dropped[0]} lines of train.py's output not shown]")
    for line in held:
        lines.append(line)
        print("| " + line.replace("\r", "\n| "))
    return (0 if clock.end is not None and not stopped else proc.returncode), stopped, clock


def _probe_val(python: Path, pristine: Path) -> Path:
    """Where the pristine prepare.py keeps the validation split (asked of prepare.py itself)."""
    code = "import os, prepare; print(os.path.join(prepare.DATA_DIR, prepare.VAL_FILENAME))"
    proc = subprocess.run([str(python), "-c", code], cwd=pristine, capture_output=True, text=True, timeout=120)
    return Path(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 and proc.stdout.strip() else Path()


def _score(python: Path, pristine: Path, taken: Path, timeout: float) -> dict:
    env = {**os.environ, **provisioned_env(pristine.parent)}
    proc = subprocess.run([str(python), str(SCORE), str(pristine), str(taken)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"infra": f"the scorer exited {proc.returncode}: {proc.stderr.strip()[-200:]}"}
    return json.loads(lines[-1])


def host_kind() -> str:
    """What this run's timings depend on: the GPU's name (CUDA_VISIBLE_DEVICES' first), else the CPU's."""
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0]
    if gpu and shutil.which("nvidia-smi"):
        try:
            proc = subprocess.run(["nvidia-smi", "-i", gpu, "--query-gpu=name", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=30)
            if proc.returncode == 0 and proc.stdout.strip():
                return proc.stdout.strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.machine()
    return f"cpu: {cpu}"


def _run(args) -> dict[str, str]:
    checkout, workdir = Path(args.checkout), Path(args.workdir)
    pinned = upstream(Path(args.upstream))
    pristine = checkout / ".rfs-pristine" / "prepare.py"
    python = checkout / ".venv" / "bin" / "python"
    if not pristine.exists() or not python.exists():
        return {"status": "infra_error", "detail": f"no vendored autoresearch at {checkout} (run vendor.sh)"}
    pins = manifest()
    for name in RUNNER_FILES:
        if _sha(ROOT / "env" / name) != pins.get(name):
            return {"status": "infra_error", "detail": f"runner file {name} on this host differs from env/MANIFEST.sha256"}
    before = _sha(pristine)
    if before != pinned["prepare_sha256"]:
        return {"status": "infra_error", "detail": f"{pristine} is not the pinned prepare.py", "prepare_sha256_before": before}
    val = _probe_val(python, pristine.parent)
    if not val.is_file():
        return {"status": "infra_error", "detail": f"the validation split is not on this host ({val}): run vendor.sh"}
    shutil.copyfile(pristine, workdir / "prepare.py")
    out = {"prepare_sha256_before": before, "train_py_sha256": _sha(workdir / "train.py"), "host_kind": host_kind()}
    try:
        compile((workdir / "train.py").read_bytes(), "train.py", "exec")
    except SyntaxError as exc:
        return {**out, "status": "syntax_error", "detail": f"train.py line {exc.lineno}: {exc.msg}"}
    prefix, out["isolation"] = _sandbox(python, workdir, val)
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="rfs-model-") as taken:  # outside the sandbox's view
        spawned = time.monotonic()
        code, stopped, clock = _train(python, prefix, workdir, Path(taken), args, lines)
        start = clock.start if clock.start is not None else spawned
        end = clock.end if clock.end is not None else time.monotonic()
        out.update(startup_seconds=f"{start - spawned:.1f}", training_seconds=f"{end - start if clock.start else 0.0:.1f}")
        after = _sha(workdir / "prepare.py") if (workdir / "prepare.py").exists() else "missing"
        out["prepare_sha256_after"] = after
        printed = parse_autoresearch("\n".join(lines))  # train.py's own figures: compared, never believed
        if "val_bpb" in printed:
            out["printed_val_bpb"] = printed["val_bpb"]
        if after != before:
            return {**out, "status": "harness_violation", "detail": "prepare.py was modified during the run"}
        if stopped:
            return {**out, "status": "timeout", "detail": stopped}
        if clock.end is None:
            last = next((ln for ln in reversed(lines) if ln.strip()), "no output")
            why = f"train.py exited {code}: {last.strip()[:200]}" if code else "train.py ended without handing a model to evaluate_bpb"
            return {**out, "status": "crash", "detail": why}
        try:  # train.py's own counts, recorded at the hand-over: for the record, never the clock or the score
            own = json.loads((Path(taken) / "model.json").read_text())
            out.update(num_steps=str(int(own.get("num_steps", 0))), peak_vram_mb=f"{float(own.get('peak_vram_mb', 0.0)):.1f}")
        except (OSError, ValueError, TypeError):
            pass
        scored = time.monotonic()
        try:
            verdict = _score(python, pristine.parent, Path(taken), args.eval_timeout)
        except subprocess.TimeoutExpired:
            return {**out, "status": "timeout", "detail": f"evaluation ran past {args.eval_timeout:g}s on this model"}
        out["eval_seconds"] = f"{time.monotonic() - scored:.1f}"
    if "infra" in verdict:
        return {**out, "status": "infra_error", "detail": verdict["infra"]}
    if "violation" in verdict:
        return {**out, "status": "harness_violation", "detail": verdict["violation"]}
    if "error" in verdict:
        return {**out, "status": "crash", "detail": verdict["error"]}
    bpb = float(verdict["val_bpb"])
    out["val_bpb"] = f"{bpb:.6f}"
    if "printed_val_bpb" in out and not abs(number(out, "printed_val_bpb") - bpb) <= PRINTED_TOLERANCE:
        out["printed_bpb_mismatch"] = "1"  # train.py printed a number before handing over: a forgery attempt
    return {**out, "status": "success", "detail": "scored by the harness's evaluate_bpb in its own process"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m rfs.envs.autoresearch")
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run one edited train.py in a launcher working directory (on the GPU host)")
    run.add_argument("--workdir", required=True)
    run.add_argument("--checkout", required=True)
    run.add_argument("--budget", type=float, required=True, help="training seconds (upstream's TIME_BUDGET)")
    run.add_argument("--startup", type=float, required=True, help="seconds from start to the first training batch")
    run.add_argument("--tolerance", type=float, required=True, help="seconds past the budget before a kill")
    run.add_argument("--eval-timeout", type=float, required=True, help="seconds the separate evaluation may take")
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
