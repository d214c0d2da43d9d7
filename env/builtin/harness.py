"""The trusted runner of the built-in environment, one training run per call:

    python env/builtin/harness.py --workdir W --budget S --device cpu --threads T

Checks its own files against env/MANIFEST.sha256, restores pristine prepare.py and program.md into
W, and trains W/train.py confined by the OS (sandbox.py: the data cache hidden, everything but W
read-only, no capabilities) and under guard.py's audit hook as a second line. The training clock
is the harness's: it starts when train.py draws its data (prepare.train_bytes, through a pipe: the
cache is not visible) and runs to the process's end; start-up past --grace or training past
--budget + --tolerance is killed and is a timeout, whatever train.py believes its budget is.
Resident memory over --memory-mb or more processes than --max-procs is killed and is a crash. Then prepare.py and the harness files
are checked, the saved model is evaluated in a separate process, and an autoresearch-style summary
is printed. train.py's lines are re-emitted with a "| " prefix (the first and last 200; the rest
counted), so the unprefixed summary can only come from here.
"""

from __future__ import annotations

import argparse
import atexit
import collections
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
import tempfile
import threading
import time
from pathlib import Path

ENV_DIR = Path(__file__).resolve().parent
MANIFEST = ENV_DIR.parent / "MANIFEST.sha256"
PRISTINE = ("prepare.py", "program.md")
PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG = 36, 1
GUARD_CHANNEL_CLOSED = 97  # guard.py's exit code when its violation pipe was tampered with
NS_ROOT = ("unshare", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private", "--kill-child")
NS_USER = ("unshare", "--user", "--map-root-user", *NS_ROOT[1:])
LINE_MAX = 4096  # bytes of one output line read at a time
ECHO_HEAD, ECHO_TAIL = 200, 200  # train.py's lines passed on: the first and the last, the rest counted
MODEL_FILES = ("model.pt2", "model.json")  # what prepare.save_model hands over
WATCH_S = 0.1  # how often the harness checks its clock and the run's memory


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
        # Bounded reads: a line without an end cannot grow the harness's memory.
        for raw in iter(lambda: stream.readline(LINE_MAX), b""):
            sink(raw.decode(errors="replace").rstrip("\n"))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def sandbox(workdir: Path, hidden: Path) -> tuple[list[str], str]:
    """The argv prefix that confines training (sandbox.py), and its name; tried once per run on this host."""
    for unshare, name in ((NS_ROOT, "mount+pid namespaces"), (NS_USER, "user+mount+pid namespaces")):
        prefix = [*unshare, sys.executable, str(ENV_DIR / "sandbox.py"), "--workdir", str(workdir), "--hide", str(hidden), "--"]
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0:
                return prefix, name
        except (OSError, subprocess.TimeoutExpired):
            pass
    return [], "audit hook only: this host allows no mount namespace, the data cache stays visible"


def _serve_data(requests: int, data: int, path: Path, clock: dict, pgid: int, workdir: Path, taken: Path) -> None:
    """The harness's training clock. It starts when train.py draws its data (prepare.train_bytes
    asks over a pipe and gets the training split back through another: the cache is not visible)
    and stops when the model is handed over (prepare.save_model): the run is killed at that moment
    and the model moved out of its reach, so nothing before the draw or after the hand-over can be
    spent on training, and no later write can change what is scored."""
    try:
        while byte := os.read(requests, 1):
            if byte == b"1" and "start" not in clock:
                clock["start"] = time.monotonic()
                with open(path, "rb") as f:
                    while block := f.read(1 << 20):
                        os.write(data, block)
                os.close(data)
                data = -1
            elif byte == b"2":
                clock["end"] = time.monotonic()
                _kill_group(pgid)
                for name in MODEL_FILES:
                    if (workdir / name).is_file():
                        shutil.move(workdir / name, taken / name)
                return
    except OSError:
        pass  # train.py closed its end: it gets no data
    finally:
        os.close(requests)
        if data >= 0:
            os.close(data)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                with open(f"/proc/{stat}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(stat))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            pass
    return total * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def train(workdir: Path, data: Path, taken: Path, args, stats: dict, echo) -> tuple[int | None, str, list[str]]:
    """Run train.py confined and under the guard; return (exit code, why it was stopped or "", guard violations)."""
    guard_r, guard_w = os.pipe()
    req_r, req_w = os.pipe()
    data_r, data_w = os.pipe()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RFS_")}
    env.update(
        RFS_TRAIN_FDS=f"{req_w},{data_r}",
        RFS_TIME_BUDGET=str(args.budget),
        RFS_DEVICE=args.device,
        RFS_THREADS=str(args.threads),
        RFS_GUARD_FD=str(guard_w),
        RFS_GUARD_CACHE=str(data.parent.parent),  # the whole cache, not just this env's data
        OMP_NUM_THREADS=str(args.threads),
        PYTHONUNBUFFERED="1",
    )
    prefix, stats["isolation"] = sandbox(workdir, data.parent)
    spawned = time.monotonic()
    proc = subprocess.Popen(
        [*prefix, sys.executable, str(ENV_DIR / "guard.py"), "train.py"],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        pass_fds=(guard_w, req_w, data_r), process_group=0, preexec_fn=_die_with_parent,
    )
    for fd in (guard_w, req_w, data_r):
        os.close(fd)
    clock: dict = {}
    server = threading.Thread(target=_serve_data, args=(req_r, data_w, data / "train.bin", clock, proc.pid, workdir, taken))
    server.start()
    violations: list[str] = []
    pumps = [_pump(proc.stdout, echo), _pump(os.fdopen(guard_r, "rb"), violations.append)]
    stopped, peak = "", 0.0
    try:
        while proc.poll() is None and not stopped and "end" not in clock:
            now = time.monotonic()
            if "start" not in clock and now > spawned + args.grace:
                stopped = f"the start-up allowance of {args.grace:g}s ran out before train.py drew its data"
            elif "start" in clock and now > clock["start"] + args.budget + args.tolerance:
                stopped = f"training ran past the budget of {args.budget:g}s + {args.tolerance:g}s tolerance (harness clock)"
            else:
                pids = _descendants(proc.pid)
                if len(pids) > args.max_procs:
                    stopped = f"too many processes: {len(pids)}, over the limit of {args.max_procs}"
                elif args.memory_mb > 0:
                    peak = max(peak, _rss_mb(pids))
                    if peak > args.memory_mb:
                        stopped = f"out of memory: {peak:.0f} MB resident, over the slot's {args.memory_mb:g} MB"
            time.sleep(WATCH_S)
    finally:
        _kill_group(proc.pid)
        proc.wait()
        _reap_orphans()
    server.join()
    end = clock.get("end", time.monotonic())
    for p in pumps:
        p.join(timeout=5)
    stats["training_seconds"] = end - clock.get("start", end)
    stats["peak_memory_mb"] = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    if "end" in clock and not stopped:
        return 0, "", violations  # killed at the hand-over, not by a failure
    return proc.returncode, stopped, violations


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
    shown = {"lines": 0, "dropped": 0, "bytes": 0}
    held: collections.deque[str] = collections.deque(maxlen=ECHO_TAIL)

    def echo(line: str) -> None:
        tail.append(line)
        del tail[:-20]
        if shown["lines"] < ECHO_HEAD:
            shown["lines"] += 1
            print("| " + line[:LINE_MAX], flush=True)
            return
        if len(held) == held.maxlen:
            shown["dropped"] += 1
            shown["bytes"] += len(held[0])
        held.append(line[:LINE_MAX])

    stats: dict = {}
    taken = Path(tempfile.mkdtemp(prefix="rfs-model-"))  # outside the sandbox's view (its /tmp is private)
    atexit.register(shutil.rmtree, taken, ignore_errors=True)
    try:
        code, stopped, violations = train(workdir, data, taken, args, stats, echo)
    finally:
        if shown["dropped"]:
            print(f"| [harness: {shown['dropped']} lines ({shown['bytes']} bytes) of train.py's output not shown]")
        for line in held:
            print("| " + line)
    summary.update(training_seconds=stats["training_seconds"], peak_memory_mb=stats["peak_memory_mb"],
                   isolation=stats["isolation"])
    info = _read_info(taken)  # counts only: train.py's own figures are never the harness's clock
    summary.update(num_steps=info.get("steps", 0), num_tokens=info.get("tokens", 0))
    if violations:
        raise Outcome("harness_violation", f"guard denied {violations[0]}")
    if not (workdir / "prepare.py").exists() or _sha(workdir / "prepare.py") != pristine:
        raise Outcome("harness_violation", "prepare.py was modified during the run")
    if code == GUARD_CHANNEL_CLOSED:
        raise Outcome("harness_violation", "train.py closed the harness guard's channel")
    if stopped.startswith(("out of memory", "too many processes")):
        raise Outcome("crash", stopped)
    if stopped:
        raise Outcome("timeout", stopped)
    if code != 0:
        raise Outcome("crash", f"train.py exited {code}: {_last_error(tail)}")
    if not (taken / "model.pt2").exists():
        raise Outcome("crash", "train.py finished without handing a model over (prepare.save_model)")
    check_manifest()  # where no namespace made them read-only, the run could have edited them
    verdict = evaluate(taken, args)
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
    p.add_argument("--tolerance", type=float, default=5.0,
                   help="seconds past the budget allowed for the export and exit; a run still going is killed")
    p.add_argument("--memory-mb", type=float, default=float(os.environ.get("RFS_JOB_MEMORY_MB", "0")),
                   help="resident memory of the whole run; over it, killed and recorded as crash (0: no watch)")
    p.add_argument("--max-procs", type=int, default=int(os.environ.get("RFS_JOB_PIDS_MAX", "256")),
                   help="processes the run may have at once; more (a fork bomb) is killed and recorded as crash")
    p.add_argument("--eval-timeout", type=float, default=120.0)
    args = p.parse_args()
    _libc_prctl(PR_SET_CHILD_SUBREAPER, 1)
    # The launcher stops us with SIGTERM; unwinding through train()'s finally kills the training run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    summary = {"val_bpb": math.nan, "training_seconds": 0.0, "peak_memory_mb": 0.0, "num_steps": 0, "num_tokens": 0,
               "isolation": "not started"}
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
    print(f"{'isolation:':18s}{summary['isolation']}")
    print(f"{'status:':18s}{summary['status']}")
    print(f"{'detail:':18s}{summary['detail']}", flush=True)


if __name__ == "__main__":
    main()
