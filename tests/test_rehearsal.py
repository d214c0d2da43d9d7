"""A rehearsal of the cluster layout on one machine: the real controller (driver) over real SLURM
and real sshd (one, listening on 127.0.0.1 and 127.0.0.2: two ssh "nodes"), vLLM replaced by tests/vllm_standin.py (a stand-in speaking vLLM's command line and
serving the scripted researcher), stand-in jobs (SleepEnv). Gold A-S beside CTRL for 2 rounds; the
slot pool's allocation is scancelled mid-wave (preemption).

Asserts: the placement plan (recorded, and each server started on its own GPUs and port); every
SLURM step of both loops' waves in the pool's allocation, re-acquired after the preemption, whose
steps are infra_error and re-run; A-S's server stopped when A-S finished.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rfs import config
from rfs.events import read_events
from rfs.hosts import HostsFile, ServerCfg, SlotCfg, TrainCfg
from rfs.loop.driver import drive
from rfs.rundir import RunDir
from tests.infra import slurm, sshd  # noqa: F401  (fixtures)
from tests.test_collect_slurm_wave import GpuSleepEnv
from tests.test_loop import own_cache, tiny  # noqa: F401  (fixtures)

STANDIN = Path(__file__).resolve().parent / "vllm_standin.py"
ROUNDS = 2


def standin_vllm(where: Path) -> Path:
    """The stand-in as an executable run by this interpreter (vLLM's own lives in its own environment)."""
    exe = where / "vllm"
    exe.write_text(f'#!/bin/sh\nexec {sys.executable} {STANDIN} "$@"\n')
    exe.chmod(0o755)
    return exe


def rehearsal_config(tiny: Path, vllm: Path) -> config.Config:
    return config.load(None, {
        "experiment": {"preset": "cluster", "name": "rehearsal", "arcs": ["A"], "arms": ["S"], "baselines": ["CTRL"], "controls": [],
                       "max_rounds": ROUNDS},
        "env": {"name": "builtin", "budget_s": 0.05, "timeout_s": 60.0, "calibration_k": 2},
        "researcher": {"backend": "vllm", "model": str(tiny), "action_space": "code", "max_turns": 4,
                       "turn_timeout_s": 30.0, "vllm": {"executable": str(vllm)}},
        "collect": {"rollouts": 4},
        "consolidate": {"lora_r": 4, "lora_alpha": 4, "epochs": 1.0, "max_seq_len": 512, "batch_tokens": 1024,
                        "kl_prompts": 2, "reason": "rehearsal: a tiny model fits in seconds"},
        "loop": {"max_concurrent": 2, "eval_every": 0},
    })


def _pool_jobs(slurm_env: dict) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i %j"], env={**os.environ, **slurm_env},
                         capture_output=True, text=True, timeout=10).stdout
    return [line.split()[0] for line in out.splitlines() if "rfs-pool" in line]


def _watch(run: RunDir, slurm_env: dict, seen: dict, stop: threading.Event) -> None:
    """Polls SLURM for the most pool allocations running at once, and scancels the pool's allocation
    (a preemption) as soon as a round-2 run is under way on a SLURM slot."""
    offset = 0
    while not stop.is_set():
        jobs = _pool_jobs(slurm_env)
        seen["most"] = max(seen["most"], len(jobs))
        if not seen["preempted"] and run.events.exists():
            new, offset = read_events(run.events, offset)
            if jobs and any(e["kind"] == "run_started" and e.get("round") == 2 and e["slot"].startswith("slurm")
                            for e in new):
                subprocess.run(["scancel", *jobs], env={**os.environ, **slurm_env}, timeout=10)
                seen["preempted"] = jobs
        time.sleep(0.1)


@pytest.mark.slow
def test_rehearsal_gold_beside_ctrl_over_slurm_and_ssh_with_a_preemption(slurm, sshd, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    monkeypatch.setenv("RFS_VLLM_STANDIN_DIR", str(tmp_path / "standin"))
    run = RunDir(tmp_path / "run")
    cfg = rehearsal_config(tiny, standin_vllm(tmp_path))
    run.root.mkdir(parents=True)
    (tmp_path / "exp.toml").write_text(config.to_toml(cfg))
    monkeypatch.setenv("RFS_VLLM_STANDIN_PLANS", f"{tmp_path / 'exp.toml'}:{ROUNDS}")
    hosts = HostsFile(
        server=ServerCfg(gpus=(0, 1)), train=TrainCfg(device="cpu"),
        slurm=replace(slurm.cfg, root=str(tmp_path / "cluster")),
        # one real sshd on two addresses: two "nodes" reached over ssh
        hosts={"node1": sshd.host, "node2": replace(sshd.host, address="127.0.0.2")},
        # the SLURM pool: one (fake) GPU per slot, as many slots as the two nodes have GPUs
        slot=(SlotCfg(name="slurm", launcher="slurm", cpus=(0,), gpu=0, count=len(slurm.nodes) * slurm.gpus),
              SlotCfg(name="n1", launcher="ssh", host="node1"), SlotCfg(name="n2", launcher="ssh", host="node2")),
    )
    seen, stop = {"most": 0, "preempted": []}, threading.Event()
    watcher = threading.Thread(target=_watch, args=(run, slurm.env, seen, stop), daemon=True)
    watcher.start()
    started = time.monotonic()
    assert drive(cfg, run, hosts, plain=True, env=GpuSleepEnv(tmp_path / "launches", 1.0, tmp_path / "gpus")) == 0
    wall = time.monotonic() - started
    stop.set()
    watcher.join(timeout=10)
    print(f"rehearsal wall time {wall:.1f} s")
    print("placement:", *json.loads(run.placement.read_text())["servers"], sep="\n  ")

    # Placement: recorded, and each server started on its own GPU and port.
    plan = json.loads(run.placement.read_text())
    assert [(s["key"], s["gpus"]) for s in plan["servers"]] == [("v0", [0]), ("A-S", [1])]
    starts = [json.loads(p.read_text()) for p in (tmp_path / "standin").glob("*.json")]
    by_name = {}
    for s in starts:
        by_name.setdefault(s["flags"]["--served-model-name"].split("/")[0], set()).add(
            (s["cuda_visible_devices"], s["flags"]["--port"]))
    assert by_name["v0"] == {("0", str(plan["servers"][0]["port"]))}
    assert by_name["A-S"] == {("1", str(plan["servers"][1]["port"]))}

    # Every trace row is a success: the preempted steps were infra errors, run again.
    rows = [r for p in run.trace_files() for r in pq.read_table(p).to_pylist()]
    assert rows and all(r["status"] == "success" for r in rows), [(r["rollout_id"], r["detail"]) for r in rows]
    events = read_events(run.events)[0]
    lost = [e for e in events if e["kind"] == "run_finished" and e["status"] == "infra_error"]
    assert seen["preempted"] and lost, "the allocation was never preempted mid-wave"
    assert all(e["slot"].startswith("slurm") for e in lost), lost
    # One pool allocation at a time for every loop's waves; after the preemption, the re-runs went to
    # a new one, and none is left when the run ends.
    assert seen["most"] == 1
    assert any(r["infra_attempts"] for r in rows)  # the lost runs went again (on any slot)
    allocations = {int(r["job_id"].split(".")[0]) for r in rows if r["slot"].startswith("slurm")}
    assert max(allocations) > max(map(int, seen["preempted"])), (allocations, seen)  # a new one, re-acquired
    assert _pool_jobs(slurm.env) == []
    ran_on = {e["host"] for e in events if e["kind"] == "run_started"}
    assert {"node1", "node2"} <= ran_on, ran_on  # both ssh "nodes" ran jobs
    # Both SLURM nodes ran jobs, each SLURM step on the GPU SLURM gave it (not the job's own "7").
    slurm_rows = [r for r in rows if r["slot"].startswith("slurm")]
    assert {r["host"] for r in slurm_rows} == set(slurm.nodes), [r["host"] for r in slurm_rows]
    gave = {f[0]: f[1:4] for f in map(str.split, (tmp_path / "gpus").read_text().splitlines()) if f[1] != "none"}
    assert all(gave[r["job_id"]][0] == r["host"] and gave[r["job_id"]][1] == gave[r["job_id"]][2] in {str(g) for g in range(slurm.gpus)}
               for r in slurm_rows), (gave, [(r["job_id"], r["host"]) for r in slurm_rows])
    # A-S's own server was stopped when A-S finished, before the experiment ended.
    kinds = [(e["kind"], e.get("version", "")) for e in events]
    stop = next(i for i, (k, v) in enumerate(kinds) if k == "server_stopped" and str(v).startswith("A-S/"))
    finish = next(i for i, e in enumerate(events) if e["kind"] == "phase" and e.get("phase") == "done"
                  and e.get("loop") == "A-S")  # run_loop's last word on A-S
    v0_stop = next(i for i, (k, v) in enumerate(kinds) if k == "server_stopped" and str(v).startswith("v0/"))
    assert finish < stop < v0_stop  # released with its loop, not with everything at the end
