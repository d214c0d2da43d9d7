"""The noise floor's calibration: k seed runs through the slot pool, each on its own slot's launcher."""

from __future__ import annotations

import json

import anyio

from rfs.collect.slots import SlotPool
from rfs.config import CollectCfg, EnvCfg
from rfs.envs.calibrate import calibrate, calibration_path
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
    assert json.loads(calibration_path(env_cfg, 2).read_text()) == out
    assert pool.free == 2  # every slot went back to the pool
