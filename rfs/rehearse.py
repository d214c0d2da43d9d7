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

from rfs import ROOT, atomic, config, hosts
from rfs.config import ConfigError
from rfs.events import read_events
from rfs.hosts import HostsFile
from rfs.rehearsal.rules import (Rule, check_finished, check_one_allocation, check_placement, check_preemption,
                                 check_released, check_rows, check_servers_started, check_slurm_gpus, check_ssh_hosts,
                                 checked)
from rfs.rundir import RunDir

ROUNDS = 2
SLEEP_S = 1.0  # each stand-in job's "training"
PHASE_TIMEOUT_S = 600.0
REHEARSAL = ROOT / "tests" / "test_rehearsal.py"  # the local SLURM and sshd of `rfs rehearse` without a hosts file


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
