"""Controller overhead of one wave: N rollouts on N slots, each job a real process that sleeps D.

Prints JSON, one object per N: wall time of the wave over D (1.0 would be no overhead at all),
controller CPU seconds, and the controller's peak RSS. The scripted researcher (a test double)
runs in its own process so its CPU and memory are not counted as the controller's. Each N runs
in a fresh controller process so peak RSS is that N's own.

    python bench/wave_overhead.py                      # quick: D=2 s, N=48 and 512
    python bench/wave_overhead.py --duration 30        # the target: wall <= 1.01 x D at N=48
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SERVER = """
import sys, time
from tests.scripted_researcher import ScriptedResearcher
from tests.wave_child import plans
with ScriptedResearcher(plans(int(sys.argv[1]))) as sr:
    print(sr.base_url, flush=True)
    sys.stdin.read()  # serve until the bench closes our stdin
"""


def one(n: int, duration: float) -> dict:
    """One wave in this process (the controller being measured)."""
    import anyio

    from tests.wave_child import SleepEnv, wave

    server = subprocess.Popen([sys.executable, "-c", SERVER, str(n)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        base_url = server.stdout.readline().strip()
        with tempfile.TemporaryDirectory() as tmp:
            # A controller's first wave also pays its one-time imports (pyarrow pulls in pandas on
            # first use): a 2-rollout warm-up wave pays them, and is reported apart.
            t0 = time.perf_counter()
            anyio.run(wave, Path(tmp) / "warmup", base_url, SleepEnv(Path(tmp) / "warmup-launches", 0.01), 2, 2)
            warmup = time.perf_counter() - t0
            env = SleepEnv(Path(tmp) / "launches", duration)
            researcher_cpu0 = _cpu_seconds(server.pid)
            cpu0, t0, epoch = time.process_time(), time.perf_counter(), time.time()
            anyio.run(wave, Path(tmp) / "run", base_url, env, n, n)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            researcher_cpu = _cpu_seconds(server.pid) - researcher_cpu0
            phases = _phases(Path(tmp) / "run" / "events.jsonl", epoch)
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"n": n, "duration_s": duration, "wall_s": round(wall, 3), "wall_over_d": round(wall / duration, 4),
            "controller_cpu_s": round(cpu, 3), "researcher_cpu_s": round(researcher_cpu, 3), "peak_rss_mb": round(rss_mb, 1), **phases, "warmup_wave_s": round(warmup, 3)}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc (the scripted researcher's share of the box)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _phases(events: Path, epoch: float) -> dict:
    """Where the overhead goes: seconds from the wave's start to the first and last job start, and
    from the last job's end to the wave's end (the researcher's closing turn, the row, compaction)."""
    from rfs.events import iter_events

    t = {k: [e["t"] - epoch for e in iter_events(events) if e["kind"] == k] for k in ("run_started", "run_finished", "wave_finished")}
    return {"first_run_start_s": round(min(t["run_started"]), 3), "last_run_start_s": round(max(t["run_started"]), 3),
            "last_run_end_to_wave_end_s": round(max(t["wave_finished"]) - max(t["run_finished"]), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=2.0, help="seconds each simulated training job sleeps")
    p.add_argument("--n", type=int, nargs="+", default=[48, 512], help="rollouts (= slots) per wave")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one N in this process
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.duration)))
        return
    results = []
    for n in a.n:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--duration", str(a.duration)],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
