"""The noise floor's calibration: k seed runs through the slot pool, each on its own slot's launcher."""

from __future__ import annotations

import json
from dataclasses import replace

import anyio

from rfs.collect.slots import SlotPool
from rfs.config import CollectCfg, EnvCfg
from rfs.envs.autoresearch import AutoresearchEnv
from rfs.envs.calibrate import calibrate, calibration_path, load_calibration, use_timing
from rfs.hosts import Slot
from rfs.launch.base import Job, JobOutcome
from tests.wave_child import SleepEnv


class HostLauncher:
    """Stands for an ssh launcher: it can reach its own host's slots only."""

    def __init__(self, host: str):
        self.host, self.ran = host, []

    async def run(self, slot: Slot, job: Job, on_line=None) -> JobOutcome:
        self.ran.append((slot.name, slot.host))
        await anyio.sleep(0.01)  # both slots are busy at once, so the runs spread over both
        return JobOutcome(0, b"val_bpb: 1.000000\nsteps: 10\n", False, 0.01)


def test_each_calibration_run_goes_through_its_own_slots_launcher(tmp_path, monkeypatch):
    monkeypatch.setenv("RFS_CACHE", str(tmp_path / "cache"))
    slots = [Slot("a", "ssh", "host-a", (), -1, "python", "."), Slot("b", "ssh", "host-b", (), -1, "python", ".")]
    launchers = {s.host: HostLauncher(s.host) for s in slots}
    pool, k, env_cfg = SlotPool(slots, CollectCfg()), 6, EnvCfg()

    out = anyio.run(lambda: calibrate(SleepEnv(tmp_path / "n", 0.0), pool, k, lambda s: launchers[s.host], env_cfg))

    for host, launcher in launchers.items():
        assert launcher.ran and {h for _, h in launcher.ran} == {host}, f"{host} ran {launcher.ran}"
    assert sum(len(l.ran) for l in launchers.values()) == k
    assert (out["k"], out["concurrency"], out["mean"], out["std"]) == (k, 2, 1.0, 0.0)
    assert json.loads(calibration_path(env_cfg, slots).read_text()) == out
    assert pool.free == 2  # every slot went back to the pool
    # the noise floor is these hosts': two other hosts at the same concurrency, or these with GPUs, calibrate anew
    elsewhere = [replace(s, host=s.host.replace("host", "node")) for s in slots]
    assert load_calibration(env_cfg, slots) == out
    assert load_calibration(env_cfg, elsewhere) is None
    assert load_calibration(env_cfg, [replace(s, gpu=0) for s in slots]) is None


class TimedLauncher:
    """Stands for a host's runner: reports its host kind and the start-up and evaluation seconds it measured."""

    seconds = {"host-a": iter([(3.0, 4.0), (5.0, 2.0), (4.0, 3.0)]), "host-b": iter([(9.0, 1.0), (9.0, 1.0), (9.0, 1.0)])}

    async def run(self, slot: Slot, job: Job, on_line=None) -> JobOutcome:
        startup, evaluation = next(self.seconds[slot.host])
        await anyio.sleep(0.01)
        out = (f"---\nstatus: success\nval_bpb: 1.0\nhost_kind: {'GPU-X' if slot.host == 'host-a' else 'GPU-Y'}\n"
               f"startup_seconds: {startup}\neval_seconds: {evaluation}\n")
        return JobOutcome(0, out.encode(), False, 1.0)


def test_start_up_and_evaluation_seconds_per_host_kind_set_the_kill_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("RFS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(AutoresearchEnv, "seed_train_py", lambda self: "print(1)\n")
    env_cfg = EnvCfg(name="autoresearch", budget_s=300.0, timeout_s=600.0, device="cuda")
    env = AutoresearchEnv(env_cfg)
    slots = [Slot(h, "ssh", h, (), 0, "python", "/srv/rfs") for h in ("host-a", "host-b", "host-c")]
    pool = SlotPool(slots[:2], CollectCfg())
    before = env.job("x\n", slots[0], "r")
    assert (before.timeout_s, before.argv[before.argv.index("--startup") + 1]) == (600.0, "135")  # fixed halves

    cal = anyio.run(lambda: calibrate(env, pool, 6, lambda s: TimedLauncher(), env_cfg))

    assert cal["host_kinds"] == {"host-a": "GPU-X", "host-b": "GPU-Y"}
    assert cal["timing"]["GPU-X"] == {"startup_seconds": {"median": 4.0, "max": 5.0},
                                      "eval_seconds": {"median": 3.0, "max": 4.0}, "runs": 3}
    assert cal["timing"]["GPU-Y"]["startup_seconds"] == {"median": 9.0, "max": 9.0}
    line = use_timing(env, load_calibration(env_cfg, slots[:2]))
    # budget 300 + start-up 5 + evaluation 4 + 4 x 30 tolerance on host-a's kind; 9 + 1 on host-b's
    assert "host-a: 429s" in line and "host-b: 430s" in line
    for slot, (startup, evaluation, limit) in zip(slots, [(35, 34, 429), (39, 31, 430), (135, 135, 600)]):
        job = env.job("x\n", slot, "r")  # host-c was never measured: upstream's fixed rules
        argv = job.argv
        assert (argv[argv.index("--startup") + 1], argv[argv.index("--eval-timeout") + 1]) == (f"{startup}", f"{evaluation}")
        assert job.timeout_s == limit
    capped = AutoresearchEnv(EnvCfg(name="autoresearch", budget_s=300.0, timeout_s=400.0, device="cuda"))
    capped.use_calibration(cal)
    assert capped.job("x\n", slots[0], "r").timeout_s == 400.0  # never past env.timeout_s
