"""`rfs rehearse HOSTS.toml`: the cluster path rehearsed in minutes before a long run.

The real controller (rfs.loop.driver, in a child process: rfs/rehearsal/controller.py) runs on the
given hosts (their server GPUs, slots, SLURM partition) with stand-ins for what costs hours: a
tiny model (rfs/rehearsal/tiny_model.py) served by a stand-in `vllm` that speaks vLLM's command
line and records the GPUs and port it was given (rfs/rehearsal/vllm_standin.py), and stand-in jobs
that sleep and print a harness summary (rfs/rehearsal/jobs.py). The LoRA fits are real.

  (a) gold A-S beside CTRL for 2 rounds; with SLURM slots, the slot pool's allocation is
      scancelled mid-wave (a preemption);
  (b) the controller is killed with -9 after A-S's round-1 fit, and the run rebuilt from its
      object-storage mirror (a local file:// one in the rehearsal's directory) into a fresh
      directory and resumed there (`resume --from`);
  (c) B-F for 2 rounds.
Then every rule is checked from the run directories and printed, one line each (`ok` / `FAIL`).
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from rfs import ROOT, atomic, config, hosts
from rfs.config import ConfigError
from rfs.events import read_events
from rfs.hosts import HostsFile
from rfs.placement import LOCAL, V0
from rfs.rundir import RunDir

ROUNDS = 2
SLEEP_S = 1.0  # each stand-in job's "training"
PHASE_TIMEOUT_S = 600.0
REHEARSAL = ROOT / "tests" / "test_rehearsal.py"  # the local SLURM and sshd of `rfs rehearse` without a hosts file


@dataclass(frozen=True)
class Rule:
    ok: bool
    name: str
    detail: str = ""

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}" + (f": {self.detail}" if self.detail else "")


def rehearsal_config(model: Path, vllm: Path, arcs: tuple[str, ...], arms: tuple[str, ...],
                     baselines: tuple[str, ...], mirror: str) -> config.Config:
    """The cluster preset's shape with tiny budgets: 4 rollouts a round, a LoRA fit in seconds."""
    return config.load(None, {
        "mirror": {"url": mirror},
        "experiment": {"preset": "cluster", "name": "rehearsal", "arcs": list(arcs), "arms": list(arms),
                       "baselines": list(baselines), "max_rounds": ROUNDS, "controls": []},
        "env": {"name": "builtin", "budget_s": 0.05, "timeout_s": 60.0, "calibration_k": 2},
        "researcher": {"backend": "vllm", "model": str(model), "action_space": "code", "max_turns": 4,
                       "turn_timeout_s": 30.0, "vllm": {"executable": str(vllm)}},
        "collect": {"rollouts": 4},
        "consolidate": {"lora_r": 4, "lora_alpha": 4, "epochs": 1.0, "max_seq_len": 512, "batch_tokens": 1024,
                        "kl_prompts": 2, "reason": "rehearsal: a tiny model fits in seconds"},
        "loop": {"max_concurrent": 2, "eval_every": 0},
    })


def standin_vllm(where: Path, experiment: Path) -> Path:
    """The stand-in `vllm` executable serving `experiment`'s scripted replies, run by this interpreter."""
    where.mkdir(parents=True, exist_ok=True)
    exe = where / "vllm"
    exe.write_text(f'#!/bin/sh\nPYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}} exec {sys.executable} '
                   f'-m rfs.rehearsal.plans {experiment} {ROUNDS} "$@"\n')
    exe.chmod(0o755)
    return exe


# ---------------------------------------------------------------- the rules, checked from a run directory


def _events(run: RunDir) -> list[dict]:
    return read_events(run.events)[0] if run.events.exists() else []


def _since_last_start(events: list[dict]) -> list[dict]:
    """The events of the run's last controller (a resumed run's directory holds its predecessor's too)."""
    starts = [i for i, e in enumerate(events) if e["kind"] == "experiment_started"]
    return events[starts[-1]:] if starts else events


def _rows(run: RunDir) -> list[dict]:
    return [r for p in run.trace_files() for r in pq.read_table(p).to_pylist()]


def check_placement(run: RunDir) -> Rule:
    """No GPU of this host given to two users (servers, the LoRA fit, local slots)."""
    plan = json.loads(run.placement.read_text())
    users: dict[int, list[str]] = {}
    for s in plan["servers"]:
        for g in s["gpus"]:
            users.setdefault(g, []).append(f"server {s['key']}")
    for g in plan["fit_gpus"]:
        users.setdefault(g, []).append("fit")
    for s in plan["slots"]:
        if s["host"] == LOCAL and s["gpu"] >= 0:
            users.setdefault(s["gpu"], []).append(f"slot {s['name']}")
    shared = {g: who for g, who in users.items() if len(who) > 1}
    servers = ", ".join(f"{s['key']} gpus {s['gpus'] or 'cpu'} port {s['port']}" for s in plan["servers"])
    return Rule(not shared, "placement: every GPU has one user",
                f"GPU shared: {shared}" if shared else f"{servers}; fit gpus {plan['fit_gpus'] or 'cpu'}")


def check_servers_started(run: RunDir, standin: Path) -> Rule:
    """Each stand-in vLLM start got its planned server's GPUs (CUDA_VISIBLE_DEVICES) and port."""
    plan = {s["key"]: s for s in json.loads(run.placement.read_text())["servers"]}
    starts = [json.loads(p.read_text()) for p in sorted(standin.glob("*.json"))]
    wrong = []
    for s in starts:
        key = s["flags"]["--served-model-name"].split("/")[0]
        want = plan.get(key)
        gpus = ",".join(map(str, want["gpus"])) if want else None
        if not want or (s["cuda_visible_devices"] or "") != gpus or s["flags"]["--port"] != str(want["port"]):
            wrong.append(f"{key} on gpus {s['cuda_visible_devices']!r} port {s['flags']['--port']}")
    ok = bool(starts) and not wrong
    return Rule(ok, "servers: each vLLM started on its planned GPUs and port",
                "; ".join(wrong) if wrong else f"{len(starts)} starts" if starts else "no server started")


def check_released(run: RunDir) -> Rule:
    """Each gold loop's own server stopped when that loop finished; V0's once no loop needed it any
    more: after the baselines finished and each gold loop's round 1, and before the last gold loop
    finished when that one outlived those needs (rfs.loop.serving.v0_needed)."""
    events = _since_last_start(_events(run))
    kinds = [(e["kind"], str(e.get("version", ""))) for e in events]
    states = run.read_state().get("loops", {})

    def first(pred) -> int | None:
        return next((i for i, e in enumerate(events) if pred(e, kinds[i])), None)

    def done(loop: str) -> int | None:
        return first(lambda e, k: e["kind"] == "phase" and e.get("phase") == "done" and e.get("loop") == loop)

    v0 = first(lambda e, k: k[0] == "server_stopped" and k[1].startswith(f"{V0}/"))
    gold = sorted({k[1].split("/")[0] for k in kinds if k[0] == "server_started" and not k[1].startswith(f"{V0}/")})
    bad = []
    for loop in gold:
        end, stop = done(loop), first(lambda e, k: k[0] == "server_stopped" and k[1].startswith(f"{loop}/"))
        if None in (end, stop) or not end < stop:
            bad.append(f"{loop}: done #{end}, its server stopped #{stop}")
    needs = [done(name) for name, st in states.items() if st.get("kind") != "gold"]
    needs += [first(lambda e, k, n=name: e["kind"] == "consolidated" and e.get("loop") == n and e.get("round") == 1)
              for name, st in states.items() if st.get("kind") == "gold"]
    last_gold = max((done(loop) or 0 for loop in gold), default=0)
    if v0 is None or None in needs or v0 < max(needs, default=0):
        bad.append(f"V0's server stopped #{v0}, while a loop still needed it (#{needs})")
    elif max(needs, default=0) < last_gold < v0:
        bad.append(f"V0's server stopped #{v0}, after the last gold loop finished (#{last_gold}): "
                   f"kept up though nothing needed it after #{max(needs, default=0)}")
    return Rule(bool(gold) and not bad, "servers: a gold loop's server stopped with its loop, V0's once nothing needed it",
                "; ".join(bad) if bad else ", ".join(gold) if gold else "no gold loop server started")


def check_finished(run: RunDir, rounds: int) -> Rule:
    loops = run.read_state().get("loops", {})
    short = {k: (v.get("round"), v.get("status")) for k, v in loops.items() if v.get("round") != rounds or v.get("status") != "done"}
    return Rule(bool(loops) and not short, f"every loop finished its {rounds} rounds",
                f"not finished: {short}" if short else ", ".join(loops) or "no loop in state.json")


def check_rows(run: RunDir, rollouts: int) -> Rule:
    """Every round of every loop has its file, with `rollouts` researcher rows, none twice, all successes
    (the shared round 1 is in each of its lines' files: a rollout twice within one file is the fault)."""
    bad, n = [], 0
    for loop, st in run.read_state().get("loops", {}).items():
        bad += [f"{loop}/round-{r}: no file" for r in range(1, st.get("round", 0) + 1) if not run.traces(loop, r).exists()]
    for path in run.trace_files():
        rows = pq.read_table(path).to_pylist()
        n += len(rows)
        ids = [r["rollout_id"] for r in rows]
        where = f"{path.parent.name}/{path.stem}"
        if (mine := sum(not r["seed_control"] for r in rows)) != rollouts:
            bad.append(f"{where}: {mine} researcher rows, not {rollouts}")
        if twice := sorted({i for i in ids if ids.count(i) > 1}):
            bad.append(f"{where}: duplicated {twice}")
        bad += [f"{r['rollout_id']}: {r['status']} ({r['detail']})" for r in rows if r["status"] != "success"]
    return Rule(n > 0 and not bad, "traces: no row lost or duplicated, every row a success",
                "; ".join(bad[:5]) if bad else f"{n} rows in {len(run.trace_files())} round files")


def check_ssh_hosts(run: RunDir, hf: HostsFile) -> Rule:
    want = {s.host for s in hosts.slots(hf) if s.launcher == "ssh"}
    ran = {e["host"] for e in _events(run) if e["kind"] == "run_started"}
    return Rule(want <= ran, "ssh: every ssh host ran jobs", f"never ran: {sorted(want - ran)}" if want - ran else ", ".join(sorted(want)))


def check_slurm_gpus(run: RunDir) -> Rule:
    """Every SLURM step ran on a node SLURM chose (the row's host) with the GPU SLURM gave it: its
    CUDA_VISIBLE_DEVICES is the step's own SLURM_STEP_GPUS (the stand-in job prints both)."""
    rows = [r for r in _rows(run) if r["slot"].startswith("slurm")]
    nodes = sorted({r["host"] for r in rows})
    bad = []
    for r in rows:
        said = [line.split(": ", 1)[1].split() for line in r["stdout_tail"].splitlines() if line.startswith("| gpus: ")]
        cvd, step = said[-1] if said else ("unset", "unset")
        if not r["host"] or cvd == "unset" or cvd != step:
            bad.append(f"{r['rollout_id']} on {r['host'] or '?'}: CUDA_VISIBLE_DEVICES {cvd}, SLURM's {step}")
    return Rule(bool(rows) and not bad, "SLURM: each step on the node and GPU SLURM gave it",
                "; ".join(bad[:3]) if bad else f"{len(rows)} steps on {', '.join(nodes)}")


def check_one_allocation(most: int) -> Rule:
    return Rule(most == 1, "SLURM: one pool allocation at a time for every loop's waves", f"at most {most} running at once")


def check_preemption(run: RunDir, preempted: list[str], left: list[str]) -> Rule:
    """The scancelled allocation's runs were infra_error on SLURM slots only, ran again in a new
    allocation, and no allocation is left when the run ends."""
    events = _since_last_start(_events(run))
    lost = [e for e in events if e["kind"] == "run_finished" and e["status"] == "infra_error"]
    rows = _rows(run)
    again = [r for r in rows if r["infra_attempts"]]
    allocations = {int(r["job_id"].split(".")[0]) for r in rows if r["slot"].startswith("slurm") and r["job_id"]}
    problems = [what for what, bad in (
        ("never preempted mid-wave", not preempted),
        ("no run was lost to it (infra_error)", not lost),
        ("an infra_error on a slot that is not SLURM's", any(not e["slot"].startswith("slurm") for e in lost)),
        ("the lost runs never ran again", not again),
        ("no new allocation after it", not allocations or not preempted or max(allocations) <= max(map(int, preempted))),
        (f"allocations left at the end: {left}", bool(left)),
    ) if bad]
    return Rule(not problems, "SLURM: a preempted allocation's runs were infra_error, re-ran in a new one",
                "; ".join(problems) if problems else f"scancelled {preempted}; {len(lost)} runs lost, re-run")


def checked(*calls: tuple) -> list[Rule]:
    """Each (check, *args) called; a check whose files are missing or unreadable (a controller that
    died early) is that rule's FAIL, not the end of the rehearsal."""
    rules = []
    for check, *args in calls:
        try:
            rules.append(check(*args))
        except (OSError, ValueError, KeyError) as exc:
            rules.append(Rule(False, check.__name__.removeprefix("check_"), f"could not check: {type(exc).__name__}: {exc}"))
    return rules


# ---------------------------------------------------------------- the rehearsal


def _squeue(name: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-t", "RUNNING", f"--name={name}", f"--user={getpass.getuser()}",
                          "-o", "%i"], capture_output=True, text=True, timeout=30).stdout
    return out.split()


@dataclass
class Watcher:
    """Polls SLURM for the most pool allocations running at once, and scancels the pool's allocation
    (a preemption) once a round-2 run is under way on a SLURM slot in `run`'s resumed controller."""

    pools: list[str]
    run: RunDir | None = None
    most: int = 0
    preempted: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def watch(self) -> None:
        offset, armed = 0, False
        while not self.stop.is_set():
            jobs = [j for name in self.pools for j in _squeue(name)]
            self.most = max(self.most, len(jobs))
            if self.run and not self.preempted and self.run.events.exists():
                new, offset = read_events(self.run.events, offset)
                armed = armed or any(e["kind"] == "experiment_started" and e.get("resumed") for e in new)
                if armed and jobs and any(e["kind"] == "run_started" and e.get("round") == 2
                                          and e["slot"].startswith("slurm") for e in new):
                    subprocess.run(["scancel", *jobs], timeout=30)
                    self.preempted = jobs
            time.sleep(0.2)


class Rehearsal:
    def __init__(self, work: Path, hosts_path: Path, hf: HostsFile, verbose: bool):
        self.work, self.hosts_path, self.hf, self.verbose = work, hosts_path, hf, verbose
        self.slurm = any(s.launcher == "slurm" for s in hf.slot)
        from rfs.rehearsal.tiny_model import build  # lazy: torch and transformers, which the fit needs anyway

        self.model = build(work / "v0")

    def _experiment(self, name: str, **shape) -> tuple[config.Config, RunDir]:
        run = RunDir(self.work / name)
        run.root.mkdir(parents=True)
        # the stand-in serves the scripted replies of this very experiment.toml
        cfg = rehearsal_config(self.model, standin_vllm(self.work / f"vllm-{name}", run.config), **shape)
        atomic.write_text(run.config, config.to_toml(cfg))
        return cfg, run

    def _controller(self, run: RunDir, standin: Path, from_url: str = "") -> subprocess.Popen:
        env = {**os.environ, "RFS_VLLM_STANDIN_DIR": str(standin), "RFS_CACHE": str(self.work / "cache"),
               "PYTHONPATH": str(ROOT) + (f":{os.environ['PYTHONPATH']}" if os.environ.get("PYTHONPATH") else "")}
        argv = [sys.executable, "-m", "rfs.rehearsal.controller", str(run.root), str(self.hosts_path), "--sleep", str(SLEEP_S)]
        log = (self.work / f"{run.root.name}.log").open("ab")
        return subprocess.Popen(argv + (["--from", from_url] if from_url else []), cwd=ROOT, env=env,
                                stdout=None if self.verbose else log, stderr=subprocess.STDOUT, start_new_session=True)

    def _wait(self, proc: subprocess.Popen, run: RunDir) -> Rule:
        try:
            code = proc.wait(timeout=PHASE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            code = proc.wait()
        return Rule(code == 0, f"controller of {run.root.name} exited 0", f"exit {code}; its log: {self.work / run.root.name}.log")

    def _gone(self, run: RunDir, standin: Path) -> None:
        """What a lost machine takes with it: the killed controller's stand-in servers and its pool allocation."""
        for rec in standin.glob("*.json"):
            try:
                os.kill(json.loads(rec.read_text())["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self.slurm:
            subprocess.run(["scancel", f"--name={self._pool(run)}"], timeout=30)

    def _pool(self, run: RunDir) -> str:
        return f"rfs-pool-{hosts.pooled(self.hf, run.root).slurm.pool}"

    def gold(self) -> list[Rule]:
        """(a) A-S beside CTRL, killed -9 after A-S's first fit; (b) resumed from the mirror elsewhere."""
        url = (self.work / "mirror" / "gold").as_uri()
        cfg, first = self._experiment("gold", arcs=("A",), arms=("S",), baselines=("CTRL",), mirror=url)
        second = RunDir(self.work / "gold-resumed")
        watcher = Watcher([self._pool(first), self._pool(second)], second)
        thread = threading.Thread(target=watcher.watch, daemon=True)
        if self.slurm:
            thread.start()
        proc = self._controller(first, self.work / "standin" / "gold")
        killed = _kill_after(proc, first.events, "consolidated")
        rules = [Rule(killed, "kill -9 of the controller mid-run (after A-S's round-1 fit)",
                      "" if killed else "the run ended before the kill")]
        self._gone(first, self.work / "standin" / "gold")
        proc = self._controller(second, self.work / "standin" / "gold-resumed", from_url=url)
        rules.append(self._wait(proc, second))
        watcher.stop.set()
        if self.slurm:
            thread.join(timeout=30)
        rules += [Rule(second.read_state().get("loops") is not None, "resume --from the mirror into a fresh directory",
                       f"{url} -> {second.root}"),
                  *checked((check_placement, second), (check_servers_started, second, self.work / "standin" / "gold-resumed"),
                           (check_finished, second, ROUNDS), (check_rows, second, cfg.collect.rollouts),
                           (check_released, second), (check_ssh_hosts, second, self.hf))]
        if self.slurm:
            rules += checked((check_slurm_gpus, second), (check_one_allocation, watcher.most),
                             (check_preemption, second, watcher.preempted, _squeue(self._pool(second))))
        return rules

    def bf(self) -> list[Rule]:
        """(c) B-F: arc B's shared round 1, then its filtered rounds on its own server."""
        cfg, run = self._experiment("b-f", arcs=("B",), arms=("F",), baselines=(), mirror="")
        proc = self._controller(run, self.work / "standin" / "b-f")
        return [self._wait(proc, run), *checked(
            (check_placement, run), (check_servers_started, run, self.work / "standin" / "b-f"), (check_finished, run, ROUNDS),
            (check_rows, run, cfg.collect.rollouts), (check_released, run))]


def _kill_after(proc: subprocess.Popen, events: Path, kind: str) -> bool:
    """kill -9 the controller right after its first `kind` event; False if it ended first."""
    deadline, offset = time.monotonic() + PHASE_TIMEOUT_S, 0
    while time.monotonic() < deadline and proc.poll() is None:
        if events.exists():
            new, offset = read_events(events, offset)
            if any(e["kind"] == kind for e in new):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    return False


def rehearse_here(keep: Path | None = None, verbose: bool = False) -> int:
    """No hosts file: tests/test_rehearsal.py's rehearsal test starts a local SLURM and sshd (tests/infra.py,
    pytest fixtures) and runs rehearse() on them; its exit code."""
    argv = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
            f"{REHEARSAL}::test_rehearsal_on_local_slurm_and_ssh_passes_every_rule"]
    print(f"no hosts file: rehearsing on a local SLURM and sshd ({' '.join(argv[2:])})", flush=True)
    env = {**os.environ, **({"RFS_REHEARSE_KEEP": str(keep)} if keep else {})}
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=not verbose, text=True)
    if not verbose:
        print("\n".join(line for line in out.stdout.splitlines()
                        if line.startswith(("ok ", "FAIL", "rehearsal", "rehearsing", "E ")) or " passed" in line or " failed" in line))
    return out.returncode


def rehearse(hosts_path: Path, keep: Path | None = None, verbose: bool = False) -> int:
    """Rehearse on the hosts of `hosts_path`; prints one line per rule and the wall time. 0 if all passed."""
    if not Path(hosts_path).is_file():
        raise ConfigError(f"{hosts_path}: no such hosts file; give the hosts.toml of the long run, or none for local infra")
    hf = hosts.load(hosts_path)
    if not hf.slot:
        raise ConfigError(f"{hosts_path}: no [[slot]] table; the rehearsal runs its stand-in jobs on the hosts file's slots")
    if keep and keep.exists() and any(keep.iterdir()):
        raise ConfigError(f"{keep}: not empty; --keep needs a new directory for the rehearsal's runs")
    work = keep or Path(tempfile.mkdtemp(prefix="rfs-rehearse-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"rehearsing on {hosts_path} in {work}: A-S beside CTRL (kill -9, resume --from the mirror), then B-F; "
          f"stand-in vllm and jobs, real LoRA fits …", flush=True)
    started = time.monotonic()
    rh = Rehearsal(work, Path(hosts_path).resolve(), hf, verbose)
    rules = rh.gold() + rh.bf()
    for r in rules:
        print(r.line(), flush=True)
    failed = sum(not r.ok for r in rules)
    if not failed and not keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"rehearsal wall time {time.monotonic() - started:.0f} s; "
          + (f"{failed} of {len(rules)} rules FAILED; runs and logs kept in {work}" if failed else f"all {len(rules)} rules passed"
             + (f"; runs in {work}" if keep else "")))
    return 1 if failed else 0
