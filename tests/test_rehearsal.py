"""`rfs rehearse`: the first test runs rfs.rehearse.rehearse on a real local SLURM (2 nodes, fake
GPUs) and real sshd on two loopback addresses (two ssh "nodes"), as `python rfs.py rehearse`
without a hosts file does; about a minute, in the default run, so CI rehearses every change;
the fast tests break each rule in a small fabricated run directory and see its check fail."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rfs import trace
from rfs.events import EventLog
from rfs.rehearsal.rules import (check_finished, check_one_allocation, check_placement, check_preemption,
                                 check_released, check_rows, check_servers_started, check_slurm_gpus, checked)
from rfs.rehearse import rehearse
from rfs.rundir import RunDir
from tests.infra import slurm, sshd  # noqa: F401  (fixtures)
from tests.tiny_model import trace_row


def _toml_value(v) -> str:
    return json.dumps(list(v) if isinstance(v, tuple) else v)  # JSON strings, numbers and lists are TOML


def _table(name: str, obj) -> str:
    return f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in dataclasses.asdict(obj).items())


def local_hosts(slurm, sshd, where: Path) -> Path:
    """The rehearsal's hosts.toml on this machine: 2 servers' GPUs, 2 SLURM slots, 2 ssh "nodes"."""
    path = where / "hosts.toml"
    path.write_text(
        "[server]\ngpus = [0, 1]\n[train]\ndevice = \"cpu\"\n"
        + _table("slurm", dataclasses.replace(slurm.cfg, root=str(where / "cluster")))
        + _table("hosts.node1", sshd.host) + _table("hosts.node2", dataclasses.replace(sshd.host, address="127.0.0.2"))
        # SLURM's slots: one GPU each, as many as the local cluster's nodes have (SLURM picks node and device)
        + f'[[slot]]\nname = "slurm"\nlauncher = "slurm"\ncpus = [0]\ngpu = 0\ncount = {len(slurm.nodes) * slurm.gpus}\n'
        + '[[slot]]\nname = "n1"\nlauncher = "ssh"\nhost = "node1"\n'
        + '[[slot]]\nname = "n2"\nlauncher = "ssh"\nhost = "node2"\n')
    return path


def test_rehearsal_on_local_slurm_and_ssh_passes_every_rule(slurm, sshd, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    keep = Path(os.environ.get("RFS_REHEARSE_KEEP") or tmp_path / "rehearsal")
    code = rehearse(local_hosts(slurm, sshd, tmp_path), keep)
    out = capsys.readouterr().out
    with capsys.disabled():
        print(out)
    lines = [line for line in out.splitlines() if line.startswith(("ok ", "FAIL"))]
    assert code == 0 and lines and all(line.startswith("ok ") for line in lines), out
    for rule in ("kill -9", "resume --from", "placement", "SLURM: one pool allocation", "SLURM: a preempted", "ssh:",
                 "SLURM: each step on the node and GPU"):
        assert any(rule in line for line in lines), (rule, out)
    gpus = next(line for line in lines if "SLURM: each step on the node and GPU" in line)
    assert gpus.endswith(", ".join(sorted(slurm.nodes))), gpus  # the pool's steps ran on both nodes
    assert "rehearsal wall time" in out


# ---------------------------------------------------------------- each rule's check, broken on purpose


def _placement(run: RunDir, a_s_gpus: list[int]) -> None:
    run.root.mkdir(parents=True, exist_ok=True)
    run.placement.write_text(json.dumps({
        "servers": [{"key": "v0", "gpus": [0], "port": 8001}, {"key": "A-S", "gpus": a_s_gpus, "port": 8002}],
        "fit_gpus": [2], "fit_device": "cuda", "slots": [{"name": "s0", "host": "localhost", "gpu": 3}]}))


def test_placement_check_fails_when_two_servers_share_a_gpu(tmp_path):
    run = RunDir(tmp_path / "run")
    _placement(run, [1])
    assert check_placement(run).ok
    _placement(run, [0])
    assert not check_placement(run).ok and "server v0" in check_placement(run).detail
    _placement(run, [2])  # the fit's GPU
    assert not check_placement(run).ok


def _started(standin: Path, pid: int, name: str, gpus: str, port: int) -> None:
    standin.mkdir(parents=True, exist_ok=True)
    (standin / f"{pid}.json").write_text(json.dumps({"flags": {"--served-model-name": f"{name}/x", "--port": str(port)},
                                                      "cuda_visible_devices": gpus, "pid": pid}))


def test_server_start_check_fails_when_a_server_gets_another_servers_gpu(tmp_path):
    run = RunDir(tmp_path / "run")
    _placement(run, [1])
    _started(tmp_path / "s", 1, "v0", "0", 8001)
    _started(tmp_path / "s", 2, "A-S", "1", 8002)
    assert check_servers_started(run, tmp_path / "s").ok
    _started(tmp_path / "s", 3, "A-S", "0", 8002)  # a restart onto V0's GPU
    assert not check_servers_started(run, tmp_path / "s").ok
    assert not check_servers_started(run, tmp_path / "none").ok  # no server started at all


def test_allocation_check_fails_with_two_pool_allocations_at_once():
    assert check_one_allocation(1).ok
    assert not check_one_allocation(2).ok
    assert not check_one_allocation(0).ok  # no allocation seen: the SLURM slots never ran


def _events(run: RunDir, *events: tuple[str, dict]) -> None:
    run.root.mkdir(parents=True, exist_ok=True)
    run.events.unlink(missing_ok=True)
    log = EventLog(run.events)
    for kind, fields in events:
        log.emit(kind, **fields)
    log.close()


def test_release_check_fails_unless_each_server_stops_once_nothing_needs_it(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir(parents=True)
    run.write_state({"loops": {"A-S": {"kind": "gold"}, "CTRL": {"kind": "ctrl"}}})
    start = [("experiment_started", {}), ("server_started", {"version": "v0/0"}), ("server_started", {"version": "A-S/1"}),
             ("consolidated", {"loop": "A-S", "round": 1}), ("phase", {"loop": "A-S", "phase": "done"})]
    a_s, v0, ctrl = (("server_stopped", {"version": "A-S/1"}), ("server_stopped", {"version": "v0/0"}),
                     ("phase", {"loop": "CTRL", "phase": "done"}))
    _events(run, *start, a_s, ctrl, v0)
    assert check_released(run).ok
    _events(run, *start, a_s, v0, ctrl)  # V0 stopped while CTRL still collected with it
    assert not check_released(run).ok
    _events(run, *start, ctrl, v0)  # A-S's server never stopped
    assert not check_released(run).ok
    _events(run, *start, a_s, ctrl)  # V0's never stopped
    assert not check_released(run).ok

    # B-F alone: V0 serves its round 1 only, and stops before B-F's later rounds end
    run.write_state({"loops": {"B-F": {"kind": "gold"}}})
    start = [("experiment_started", {}), ("server_started", {"version": "v0/0"}), ("consolidated", {"loop": "B-F", "round": 1}),
             ("server_started", {"version": "B-F/1"})]
    end = [("phase", {"loop": "B-F", "phase": "done"}), ("server_stopped", {"version": "B-F/2"})]
    _events(run, *start, ("server_stopped", {"version": "v0/0"}), *end)
    assert check_released(run).ok
    _events(run, *start, *end, ("server_stopped", {"version": "v0/0"}))  # kept up to the end for nobody
    assert not check_released(run).ok


def _round(run: RunDir, loop: str, r: int, rows: list[dict]) -> None:
    run.traces(loop, r).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=trace.SCHEMA), run.traces(loop, r))


def _finished_run(root: Path, rounds: int = 2) -> RunDir:
    run = RunDir(root)
    run.root.mkdir(parents=True)
    run.write_state({"loops": {"A-S": {"round": rounds, "status": "done"}}})
    for r in (1, 2):
        _round(run, "A-S", r, [trace_row(f"A-S-r{r}-t{t:03d}", round_=r) for t in range(2)])
    return run


def test_rows_check_fails_on_a_lost_a_duplicated_or_a_failed_row_and_a_lost_round(tmp_path):
    run = _finished_run(tmp_path / "run")
    assert check_rows(run, 2).ok and check_finished(run, 2).ok
    _round(run, "A-S", 2, [trace_row("A-S-r2-t000", round_=2)])  # a row lost after the resume
    assert not check_rows(run, 2).ok
    _round(run, "A-S", 2, [trace_row("A-S-r2-t000", round_=2)] * 2)  # the same rollout twice
    assert "duplicated" in check_rows(run, 2).detail
    _round(run, "A-S", 2, [trace_row("A-S-r2-t000", round_=2), trace_row("A-S-r2-t001", status="crash", round_=2)])
    assert not check_rows(run, 2).ok
    run.traces("A-S", 2).unlink()  # a whole round lost
    assert "no file" in check_rows(run, 2).detail


def test_finished_check_fails_when_a_loop_stopped_short(tmp_path):
    run = _finished_run(tmp_path / "run", rounds=1)
    assert not check_finished(run, 2).ok


def test_preemption_check_fails_unless_the_lost_runs_were_slurm_infra_errors_re_run_in_a_new_allocation(tmp_path):
    run = _finished_run(tmp_path / "run")
    rows = [{**trace_row("A-S-r2-t000", round_=2), "slot": "slurm-0", "job_id": "12.3", "infra_attempts": 1},
            {**trace_row("A-S-r2-t001", round_=2), "slot": "slurm-1", "job_id": "12.4"}]
    _round(run, "A-S", 2, rows)
    lost = ("run_finished", {"status": "infra_error", "slot": "slurm-0"})
    _events(run, ("experiment_started", {}), lost)
    assert check_preemption(run, ["11"], []).ok
    assert not check_preemption(run, [], []).ok  # never preempted
    assert not check_preemption(run, ["12"], []).ok  # no new allocation after it
    assert not check_preemption(run, ["11"], ["12"]).ok  # an allocation left behind
    _events(run, ("experiment_started", {}), lost, ("run_finished", {"status": "infra_error", "slot": "n1"}))
    assert not check_preemption(run, ["11"], []).ok  # an ssh run blamed on the allocation
    _round(run, "A-S", 2, [{**r, "infra_attempts": 0} for r in rows])
    _events(run, ("experiment_started", {}), lost)
    assert not check_preemption(run, ["11"], []).ok  # the lost run never went again


def test_slurm_gpu_check_fails_unless_each_step_ran_with_the_gpu_slurm_gave_it(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir(parents=True)

    def step(t: int, host: str, said: str) -> dict:
        return {**trace_row(f"A-S-r2-t{t:03d}", round_=2), "slot": f"slurm-{t}", "host": host,
                "stdout_tail": f"| training done\n| gpus: {said}\nval_bpb: 1.0\n"}

    _round(run, "A-S", 2, [step(0, "rfs-n0", "0 0"), step(1, "rfs-n1", "1 1")])
    assert check_slurm_gpus(run).ok and check_slurm_gpus(run).detail == "2 steps on rfs-n0, rfs-n1"
    for broken in (step(1, "rfs-n1", "7 1"),       # the job's own CUDA_VISIBLE_DEVICES, not SLURM's
                   step(1, "rfs-n1", "unset unset"),  # no GPU given at all
                   step(1, "", "1 1")):             # no node recorded
        _round(run, "A-S", 2, [step(0, "rfs-n0", "0 0"), broken])
        assert not check_slurm_gpus(run).ok, broken


def test_a_run_that_left_no_files_fails_its_rules_without_ending_the_rehearsal(tmp_path):
    run = RunDir(tmp_path / "run")  # a controller that died before writing anything
    rules = checked((check_placement, run), (check_finished, run, 2), (check_one_allocation, 1))
    assert [r.ok for r in rules] == [False, False, True]
    assert rules[0].name == "placement" and "could not check: FileNotFoundError" in rules[0].detail
