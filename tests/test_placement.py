"""Placement: each server, the LoRA fit and each slot on its own GPUs, one plan, recorded; servers
on their own GPUs and ports, stopped when no loop needs them; a restart waits for free GPU memory."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

from rfs import config
from rfs.collect.slots import SlotPool
from rfs.config import ConfigError
from rfs.events import EventLog, iter_events
from rfs.hosts import HostCfg, HostsFile, ServerCfg, SlotCfg, TrainCfg, slots
from rfs.loop.experiment import Experiment
from rfs.loop.fit_process import FitFailed
from rfs.loop.plan import LoopSpec
from rfs.loop.round import _consolidate
from rfs.loop.serving import V0, Servers
from rfs.loop.state import ExperimentState, Noise
from rfs.placement import announce_placement, place
from rfs.rundir import RunDir
from rfs.serve.vllm import gpus_free

STANDIN = Path(__file__).resolve().parent / "vllm_standin.py"


def cfg(arms=("S", "F"), tp=1, executable="vllm") -> config.Config:
    return config.load(None, {
        "experiment": {"preset": "cluster", "arcs": ["A"], "arms": list(arms), "baselines": ["CTRL"], "controls": []},
        "researcher": {"backend": "vllm", "vllm": {"tensor_parallel": tp, "executable": executable}},
    })


def cluster_hosts(server=(0, 1, 2), train=(3,), local=(4, 5), port=0) -> HostsFile:
    return HostsFile(
        server=ServerCfg(gpus=server, port=port), train=TrainCfg(gpus=train),
        hosts={"n1": HostCfg(address="10.0.0.2")},
        slot=tuple(SlotCfg(name=f"l{g}", gpu=g) for g in local)
        + (SlotCfg(name="n1-0", launcher="ssh", host="n1", gpu=0), SlotCfg(name="sl-0", launcher="slurm", gpu=0)),
    )


def test_each_server_the_fit_and_each_slot_get_their_own_gpus() -> None:
    p = place(cfg(), cluster_hosts())
    assert [(s.key, s.gpus) for s in p.servers] == [(V0, (0,)), ("A-S", (1,)), ("A-F", (2,))]
    assert len({s.port for s in p.servers}) == 3
    assert p.fit_gpus == (3,) and p.fit_device == "cuda:3"
    # GPU 0 on another host (n1) and a GPU SLURM picks are not the controller's GPU 0
    assert [(s.name, s.host, s.gpu) for s in p.slots][-2:] == [("n1-0", "n1", 0), ("sl-0", "slurm", 0)]
    assert "server A-F    localhost gpus 2" in "\n".join(p.lines())


def test_tensor_parallel_servers_take_consecutive_groups_and_ports_follow_the_first() -> None:
    p = place(cfg(arms=("S",), tp=2), cluster_hosts(server=(0, 1, 2, 3), train=(6,), port=8100))
    assert [(s.gpus, s.port) for s in p.servers] == [((0, 1), 8100), ((2, 3), 8101)]


@pytest.mark.parametrize("hosts, clash", [
    (cluster_hosts(train=(1,)), "GPU 1 on localhost is given to both the A-S server and the LoRA fit"),
    (cluster_hosts(local=(4, 0)), "GPU 0 on localhost is given to both the v0 server and slot l0"),
    (cluster_hosts(local=(4, 4)), "GPU 4 on localhost is given to both slot l4 and slot l4"),
])
def test_a_gpu_given_twice_is_a_config_error_naming_both(hosts: HostsFile, clash: str) -> None:
    with pytest.raises(ConfigError, match=clash):
        place(cfg(), hosts)


def test_too_few_server_gpus_and_fit_gpus_unlike_its_devices_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="cannot hold 3 servers"):
        place(cfg(), cluster_hosts(server=(0, 1)))
    with pytest.raises(ConfigError, match="one GPU per device"):
        place(cfg(), cluster_hosts(train=(3, 6)))  # consolidate.devices = 1
    c = cfg()
    spread = replace(c, consolidate=replace(c.consolidate, devices=2))  # the 32B fit over two GPUs
    p = place(spread, cluster_hosts(train=(3, 6), local=(4, 5)))
    assert (p.fit_gpus, p.fit_device) == ((3, 6), "cuda:3")
    with pytest.raises(ConfigError, match="GPU 6 on localhost"):
        place(spread, cluster_hosts(train=(3, 6), local=(4, 6)))


def test_the_plan_is_printed_and_recorded_in_the_run_directory(tmp_path: Path, capsys) -> None:
    run = RunDir(tmp_path)
    p = place(cfg(), cluster_hosts())
    announce_placement(run, p, EventLog(run.events))
    recorded = json.loads(run.placement.read_text())
    assert [s["gpus"] for s in recorded["servers"]] == [[0], [1], [2]] and recorded["fit_device"] == "cuda:3"
    assert "server v0     localhost gpus 0" in capsys.readouterr().out
    assert [e["kind"] for e in iter_events(run.events)] == ["placement"]


def test_servers_start_on_their_gpus_and_ports_and_a_finished_loops_server_stops(tmp_path: Path, monkeypatch) -> None:
    """The stand-in `vllm` records the CUDA_VISIBLE_DEVICES and flags each server was started with."""
    monkeypatch.setenv("RFS_VLLM_STANDIN_DIR", str(tmp_path / "standin"))
    c = cfg(executable=str(STANDIN))
    run = RunDir(tmp_path / "run")
    events = EventLog(run.events)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"stand-in weights")  # hashed, never loaded

    async def main() -> tuple[bool, bool]:
        async with Servers(c, cluster_hosts(), run, events, model) as servers:
            v0 = await servers.serve(V0, 0)
            a_s = await servers.serve("A-S", 0)
            await servers.release("A-S")
            return await v0.server.health(), await a_s.server.health()

    v0_up, a_s_up = anyio.run(main)
    assert v0_up and not a_s_up
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "standin").glob("*.json"), key=os.path.getmtime)]
    assert [r["cuda_visible_devices"] for r in records] == ["0", "1"]
    assert len({r["flags"]["--port"] for r in records}) == 2
    assert all(r["flags"]["--generation-config"] == "vllm" for r in records)
    for r in records:  # each stand-in is gone: released, or stopped on exit
        with pytest.raises(ProcessLookupError):
            os.kill(r["pid"], 0)


def fake_nvidia_smi(tmp_path: Path, busy_calls: int) -> Path:
    """STAND-IN for nvidia-smi: GPU 1 is 90% full for the first `busy_calls` queries, then free."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(f"""#!{sys.executable}
from pathlib import Path
n = Path({str(tmp_path / 'calls')!r})
calls = int(n.read_text()) if n.exists() else 0
n.write_text(str(calls + 1))
print("0, 80000, 81559")
print("1, " + ("8000" if calls < {busy_calls} else "80000") + ", 81559")
""")
    script.chmod(0o755)
    return bin_dir


def test_a_server_start_waits_until_its_gpus_memory_is_free(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path, busy_calls=3)}:{os.environ['PATH']}")
    assert anyio.run(lambda: gpus_free((0, 1), 0.85, poll_s=0.01)) == ""
    assert int((tmp_path / "calls").read_text()) == 4  # three busy answers, then the free one


def test_the_gpu_wait_says_why_it_is_skipped(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi here
    assert "nvidia-smi" in anyio.run(lambda: gpus_free((0,), 0.85))
    assert "no GPUs" in anyio.run(lambda: gpus_free((), 0.85))


def test_a_count_table_stands_for_its_slots_each_on_its_own_gpu_and_cores(tmp_path):
    from rfs.hosts import load, slots

    toml = tmp_path / "hosts.toml"
    toml.write_text("""
[hosts.n1]
address = "10.0.0.2"

[[slot]]
name = "n1"
launcher = "ssh"
host = "n1"
gpu = 0
cpus = [0, 1]
count = 3

[[slot]]
launcher = "slurm"
gpu = 0
count = 2
""")
    got = [(s.name, s.host, s.gpu, s.cpus) for s in slots(load(toml))]
    assert got[:3] == [("n1-0", "n1", 0, (0, 1)), ("n1-1", "n1", 1, (2, 3)), ("n1-2", "n1", 2, (4, 5))]
    assert [(s.launcher, s.gpu) for s in slots(load(toml))][3:] == [("slurm", 0), ("slurm", 0)]
    toml.write_text(toml.read_text().replace("count = 2", "count = 0"))
    with pytest.raises(ConfigError, match="count"):
        load(toml)


def test_the_placed_fit_device_reaches_the_fits_child(tmp_path: Path) -> None:
    """train.gpus = (3,) → the loop's fit job → the spawned child gets "cuda:3": it records the device
    it was given, and (on a host without a 4th GPU, like CI's) fails naming it before loading anything."""
    import torch


    c = config.load(None)  # the embedded default: its servers are on the CPU, only the fit is placed
    hosts = HostsFile(train=TrainCfg(gpus=(3,), device="cuda"), slot=(SlotCfg(name="s0"),))
    run = RunDir(tmp_path / "run")
    events = EventLog(run.events)
    placement = place(c, hosts)
    v0 = tmp_path / "v0"
    ex = Experiment(c, run, hosts, events, env=None, pool=SlotPool(slots(hosts), c.collect, events),
                    servers=Servers(c, hosts, run, events, v0, placement), noise=Noise(1.0, 0.01, 2), v0=v0,
                    state=ExperimentState(c.experiment.name))

    with pytest.raises((FitFailed, RuntimeError)) as failed:  # nothing to fit here: the child stops either way
        anyio.run(_consolidate, ex, LoopSpec("A-S", "gold", "A", "S"), 1)
    [started] = [e for e in iter_events(run.events) if e["kind"] == "fit_started"]
    assert (started["device"], started["loop"], started["round"]) == ("cuda:3", "A-S", 1)
    assert started["cuda_visible_devices"] == "3"  # the child sees the placed GPU alone, as its cuda:0
    assert started["pid"] != os.getpid()  # said by the child, not the controller
    if torch.cuda.device_count() <= 3:
        assert failed.type is FitFailed and "placed on cuda:3" in str(failed.value), failed.value
