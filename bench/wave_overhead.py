"""Controller overhead of one wave: N rollouts on N slots, each job a real process that sleeps D.

Prints JSON: per run and, per N, min and median over --repeats runs of the wave's wall time over
D (the baseline: a controller with no overhead at all would take D, a ratio of 1.0), controller
CPU seconds (all threads, and the event loop's thread alone: on a machine with many cores, the loop
is the part that cannot spread), the whole machine's busy CPU seconds during the wave (on a machine
with few cores, what wall - D follows), where the time goes, the controller's peak RSS, and bare_starts_s:
what starting the same N confined jobs costs a bare loop on this machine, a floor under wall - D
taken in the same run; plus the machine's load and the speed of its cores (a fixed loop's seconds)
before and after. The scripted researcher (a test double) runs in its own process so its CPU and
memory are not counted as the controller's (researcher_cpu_s reports them). Each run is a fresh
controller process, so peak RSS is that N's own.

    python bench/wave_overhead.py                                  # quick: D=2 s, N=48 and 512
    python bench/wave_overhead.py --duration 30 --n 48 --repeats 3 # the target: wall <= 1.01 x D
    python bench/wave_overhead.py --n 48 128 512 --repeats 3       # memory and CPU growth with N
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SERVER = """
import sys
from tests.scripted_researcher import ScriptedResearcher
from tests.wave_child import plans
with ScriptedResearcher(plans(int(sys.argv[1]))) as sr:
    print(sr.base_url, flush=True)
    sys.stdin.read()  # serve until the bench closes our stdin
"""


def one(n: int, duration: float) -> dict:
    """One wave in this process (the controller being measured)."""
    import anyio

    server = subprocess.Popen([sys.executable, "-c", SERVER, str(n)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        base_url = server.stdout.readline().strip()
        with tempfile.TemporaryDirectory() as tmp:
            result = anyio.run(_waves, Path(tmp), base_url, n, duration, server.pid)
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"n": n, "duration_s": duration, **result, "peak_rss_mb": round(rss_mb, 1)}


async def _waves(tmp: Path, base_url: str, n: int, duration: float, server_pid: int) -> dict:
    """A warm-up wave, then the measured one, in one event loop as the controller runs a whole
    experiment: the first wave also pays one-time costs (imports, the loop's worker threads),
    reported apart as warmup_wave_s. Config is loaded before, as a controller does once per run."""
    from tests.wave_child import SleepEnv, wave, wave_config

    cfg = wave_config(budget_s=duration)
    t0 = time.perf_counter()
    await wave(tmp / "warmup", base_url, SleepEnv(tmp / "warmup-launches", 0.01), 2, 2, cfg=cfg)
    warmup = time.perf_counter() - t0
    env = SleepEnv(tmp / "launches", duration)
    researcher_cpu0, box_cpu0 = _cpu_seconds(server_pid), _box_cpu_seconds()
    cpu0, loop_cpu0, t0, epoch = time.process_time(), time.thread_time(), time.perf_counter(), time.time()
    await wave(tmp / "run", base_url, env, n, n, cfg=cfg)
    wall, cpu, loop_cpu = time.perf_counter() - t0, time.process_time() - cpu0, time.thread_time() - loop_cpu0
    return {"wall_s": round(wall, 3), "wall_over_d": round(wall / duration, 4), "controller_cpu_s": round(cpu, 3),
            "event_loop_cpu_s": round(loop_cpu, 3), "researcher_cpu_s": round(_cpu_seconds(server_pid) - researcher_cpu0, 3),
            "machine_cpu_s": round(_box_cpu_seconds() - box_cpu0, 2),
            **_phases(tmp / "run" / "events.jsonl", epoch), "warmup_wave_s": round(warmup, 3),
            "bare_starts_s": _bare_starts(tmp / "bare", n)}


def _bare_starts(tmp: Path, n: int) -> float:
    """Seconds for a bare loop to start n copies of a wave's job, confined as the local launcher
    confines it but sleeping 0 s, and see them all exit: what n sandboxed job starts cost this
    machine with no controller around them, the floor under the wave's wall - D."""
    from rfs.launch.local import _confined, popen_confined
    from rfs.launch.netns import isolation
    from tests.wave_child import SleepEnv, local_slots

    tmp.mkdir()
    (tmp / "train.py").write_text("x = 0\n")
    slot = local_slots(1)[0]
    job = SleepEnv(tmp / "launches", 0).job("x = 0\n", slot, "bare")
    iso = isolation()
    argv = _confined(slot, job.timeout_s, iso.prefix, list(job.argv))
    t0 = time.perf_counter()
    procs = [popen_confined(iso, argv, cwd=tmp, stdout=subprocess.DEVNULL, start_new_session=True) for _ in range(n)]
    if any(p.wait() != 0 for p in procs):
        raise RuntimeError(f"a bare job start failed: {argv}")
    return round(time.perf_counter() - t0, 3)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc (the scripted researcher's share of the box)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _box_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far, from /proc/stat (10 ms ticks): the controller,
    the scripted researcher, the jobs and the kernel together. Where they share few cores, the
    wave's wall - D follows this, not the controller's CPU alone."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


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
    p.add_argument("--repeats", type=int, default=1, help="fresh controller processes per N (the summary gives min and median)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one N in this process
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.duration)))
        return
    machine = {"cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in os.getloadavg()], "cpu_probe_s_before": _cpu_probe()}
    runs = []
    for _ in range(a.repeats):  # interleaved, so a burst of outside load does not land on one N only
        for n in a.n:
            out = subprocess.run([sys.executable, __file__, "--one", str(n), "--duration", str(a.duration)],
                                 cwd=ROOT, capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    machine |= {"loadavg_after": [round(x, 2) for x in os.getloadavg()], "cpu_probe_s_after": _cpu_probe()}
    summary = [_summary([r for r in runs if r["n"] == n]) for n in a.n]
    print(json.dumps({"machine": machine, "summary": summary, "runs": runs}, indent=2))


def _cpu_probe() -> float:
    """Seconds for a fixed pure-Python loop (best of 5): on a shared host, how fast this machine's
    cores run right now, so figures taken at different times can be told apart."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i
        best = min(best, time.perf_counter() - t0)
    return round(best, 4)


def _summary(runs: list[dict]) -> dict:
    def stats(key: str) -> dict:
        xs = [r[key] for r in runs]
        return {"min": min(xs), "median": statistics.median(xs)}

    keys = ("wall_over_d", "controller_cpu_s", "event_loop_cpu_s", "machine_cpu_s", "first_run_start_s", "last_run_start_s",
            "last_run_end_to_wave_end_s", "bare_starts_s", "peak_rss_mb")
    return {"n": runs[0]["n"], "duration_s": runs[0]["duration_s"], "repeats": len(runs), **{k: stats(k) for k in keys}}


if __name__ == "__main__":
    main()
