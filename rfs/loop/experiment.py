"""What every loop of an experiment shares: config, run directory, hosts, events, environment,
slot pool, researcher servers, the seed's noise floor, V0's weights and the state.json content."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import anyio

from rfs import config
from rfs.collect.slots import SlotPool
from rfs.collect.wave import reclaimed
from rfs.config import Config
from rfs.envs import Environment
from rfs.envs.calibrate import announce, calibrate, load_calibration, use_timing
from rfs.events import EventLog
from rfs.hosts import HostsFile, pooled, slots
from rfs.launch import wave_launchers
from rfs.loop.plan import plan
from rfs.loop.serving import Servers
from rfs.loop.state import ExperimentState, Noise
from rfs.placement import announce_placement, place
from rfs.rundir import RunDir
from rfs.setup import setup_embedded
from rfs.trace import text_sha256


@dataclass(frozen=True)
class Experiment:
    cfg: Config
    run: RunDir
    hosts: HostsFile
    events: EventLog
    env: Environment
    pool: SlotPool
    servers: Servers
    noise: Noise
    v0: Path | None  # None for an external researcher that is never trained (baselines only)
    state: ExperimentState
    # Round 1 and V0's probes are made once, by whichever loop asks first; the others wait for it.
    shared_lock: anyio.Lock = field(default_factory=anyio.Lock)
    # One fit at a time: LoRA trains on one device (hosts.toml [train]), and transformers' model
    # loading is not thread-safe (concurrent loads in worker threads hit its meta-device init).
    fit_lock: anyio.Lock = field(default_factory=anyio.Lock)

    def save(self) -> None:
        self.run.write_state(self.state.to_json())

    def over_budget(self) -> bool:
        hours = self.cfg.experiment.budget_hours
        return hours > 0 and self.state.elapsed_s >= hours * 3600

    def seed_hashes(self) -> tuple[str, str]:
        return text_sha256(self.env.program_md()), text_sha256(self.env.seed_train_py())


@asynccontextmanager
async def started(cfg: Config, run: RunDir, hosts: HostsFile, events: EventLog, env: Environment) -> AsyncIterator[Experiment]:
    """The experiment in `run`, new or resumed, calibrated and with its servers; they stop on exit."""
    hosts = pooled(hosts, run.root)  # the SLURM allocation named for this run (rfs.launch.slurm)
    state = ExperimentState.from_json(run.read_state(), cfg.experiment.name)
    events.emit("experiment_started", experiment=cfg.experiment.name, resumed=bool(state.loops))
    await anyio.to_thread.run_sync(env.prepare)
    placement = place(cfg, hosts)  # before anything starts: a GPU given twice stops the run here
    announce_placement(run, placement, events)
    pool = SlotPool(slots(hosts), cfg.collect, events)
    if state.noise is None:
        state.noise = await _calibrated(cfg, run, hosts, events, env, pool)
        run.write_state(state.to_json())  # a resumed run does not calibrate again
    if limits := use_timing(env, load_calibration(cfg.env, pool.slots) or {}):  # limits from measured seconds
        print(limits, flush=True)
    v0 = await anyio.to_thread.run_sync(_resolve_v0, cfg)
    async with Servers(cfg, hosts, run, events, v0, placement) as servers:
        yield Experiment(cfg, run, hosts, events, env, pool, servers, state.noise, v0, state)


async def _calibrated(cfg: Config, run: RunDir, hosts: HostsFile, events: EventLog, env: Environment,
                      pool: SlotPool) -> Noise:
    """The seed's val_bpb mean ± std on this machine at the wave's concurrency (calibrated once)."""
    cal = load_calibration(cfg.env, pool.slots)
    k = cfg.env.calibration_k
    if cal is None:
        events.emit("phase", loop="*", round=0, phase="calibrate", k=k)
        key = await reclaimed(run, pool.slots, hosts, events, "calibrate", 0)
        async with wave_launchers(pool.slots, hosts, key) as launcher_of:
            cal = await calibrate(env, pool, k, launcher_of, cfg.env, on_run=announce(k, events))
    print(f"seed train.py: val_bpb {cal['mean']:.4f} ± {cal['std']:.4f} over {cal['k']} runs", flush=True)
    return Noise(cal["mean"], cal["std"], cal["k"])


def _resolve_v0(cfg: Config) -> Path | None:
    """V0's weights on disk, or None for an external researcher we cannot train (baselines only)."""
    r = cfg.researcher
    if r.model == "smollm2":
        return setup_embedded()
    path = Path(r.model).expanduser()
    if (path / "config.json").exists():
        return path
    if r.backend == "external" and not any(l.trains for l in plan(cfg)):
        return None
    raise config.ConfigError(f"researcher.model: {path} is not a local model directory (no config.json); "
                             "rfs never downloads weights, and the gold loops need weights to train")
