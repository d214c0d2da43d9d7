"""The noise floor: the seed train.py run k times at the wave's concurrency, across training seeds.

`SEED` is one of the researcher's own settings, so noise measured at one fixed SEED would leave
out the spread a researcher's run sees: calibration run i trains with SEED + i where train.py has
a `SEED = <int>` line (the builtin env); a file without one (autoresearch) is run as it is.

A val_bpb difference smaller than the seed's own run-to-run spread is not an improvement, and the
spread depends on how many runs share the machine, so it is measured at that concurrency (one run
per slot at a time) and stored per env, device, budget and concurrency.

The same runs measure what upstream's time rules leave outside the budget: the harness's start-up
and evaluation seconds, per host kind (the GPU's or CPU's name, as the runner reports it); the
autoresearch env derives later runs' kill limits from them (`use_timing`).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import re
import statistics
from pathlib import Path
from typing import Callable, Sequence

import anyio

from rfs.atomic import write_json
from rfs.collect.slots import SlotPool
from rfs.config import EnvCfg, cache_dir
from rfs.envs import Environment, RunResult, execute
from rfs.envs.autoresearch import AutoresearchEnv
from rfs.events import EventLog
from rfs.hosts import Slot
from rfs.launch.base import Launcher


PHASES = ("startup_seconds", "eval_seconds")  # the harness's own clock, outside the training budget
_SEED = re.compile(r"^SEED = (\d+)", re.MULTILINE)


def with_seed(train_py: str, i: int) -> str:
    """train.py with its training SEED moved on by i (unchanged when it has no SEED line)."""
    return _SEED.sub(lambda m: f"SEED = {int(m.group(1)) + i}", train_py, count=1)


def calibration_path(env_cfg: EnvCfg, slots: Sequence[Slot]) -> Path:
    """Where the noise floor of this env, device and budget on these slots is kept. The key names
    the machines as well as their number: the same concurrency on other hosts (or with other
    devices) is another noise floor, so it is calibrated anew."""
    layout = sorted(f"{s.launcher}:{s.host}:{'gpu' if s.gpu >= 0 else 'cpu'}" for s in slots)
    digest = hashlib.sha256("\n".join([platform.node(), *layout]).encode()).hexdigest()[:10]
    name = f"{env_cfg.name}-{env_cfg.device}-{env_cfg.budget_s:g}-c{len(slots)}-{digest}.json"
    return cache_dir() / "calibration" / name


async def calibrate(env: Environment, pool: SlotPool, k: int, launcher_of: Callable[[Slot], Launcher],
                    env_cfg: EnvCfg | None = None, on_run: Callable[[int, RunResult], None] | None = None) -> dict:
    """Run the seed k times, one run per slot of the pool at a time; store and return the spread of val_bpb.

    Each run goes through its slot's own launcher (`launcher_of`, from `rfs.launch.wave_launchers`),
    so a run on an ssh slot reaches that slot's host. The result is stored under `env_cfg` (default:
    the EnvCfg the adapter was built from); `on_run(i, result)` hears each run as it ends (the first
    val_bpb is worth showing at once)."""
    if k < 1:
        raise ValueError(f"calibrate needs k >= 1 (got k={k})")
    seed = env.seed_train_py()
    runs: list[tuple[int, str, float, str]] = []
    timed: list[tuple[str, dict[str, str]]] = []  # (slot host, the harness's summary) per run

    async def one(i: int) -> None:
        slot = await pool.acquire()
        failure = ""
        try:
            result, outcome = await execute(env, launcher_of(slot), slot, with_seed(seed, i), f"calibrate-{i}")
            failure = outcome.infra_error
            runs.append((i, result.status, result.val_bpb, result.detail))
            timed.append((slot.host, result.summary))
            if on_run:
                on_run(i, result)
        finally:
            pool.release(slot, failure=failure)

    async with anyio.create_task_group() as tg:
        for i in range(k):
            tg.start_soon(one, i)
    failed = [r for r in runs if r[1] != "success" or not math.isfinite(r[2])]
    if failed:
        i, status, _, detail = failed[0]
        raise RuntimeError(f"calibration run {i} of the seed ended {status}: {detail} ({len(failed)}/{k} failed)")
    values = [v for _, _, v, _ in sorted(runs)]
    cfg: EnvCfg = env_cfg or env.cfg  # type: ignore[attr-defined]  # every adapter keeps the EnvCfg it was built from
    out = {
        "env": env.name,
        "device": cfg.device,
        "budget_s": cfg.budget_s,
        "concurrency": len(pool.slots),
        "host": platform.node(),
        "k": k,
        "seeds_varied": bool(_SEED.search(seed)),
        "values": values,
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if k > 1 else 0.0,
        **timing(timed),
    }
    write_json(calibration_path(cfg, pool.slots), out)
    return out


def timing(runs: list[tuple[str, dict[str, str]]]) -> dict:
    """The harness's measured start-up and evaluation seconds (median and max) per host kind, and
    which slot host is of which kind; empty when the harness reports no host kind (the builtin env)."""
    kinds: dict[str, dict[str, list[float]]] = {}
    hosts: dict[str, str] = {}
    for host, summary in runs:
        kind = summary.get("host_kind")
        if not kind or not all(key in summary for key in PHASES):
            continue
        hosts[host] = kind
        for key in PHASES:
            kinds.setdefault(kind, {}).setdefault(key, []).append(float(summary[key]))
    if not kinds:
        return {}
    return {
        "host_kinds": hosts,
        "timing": {kind: {**{key: {"median": statistics.median(v), "max": max(v)} for key, v in phases.items()},
                          "runs": len(phases[PHASES[0]])} for kind, phases in kinds.items()},
    }


def use_timing(env: Environment, cal: dict) -> str:
    """Hand the calibration's measured seconds to an environment that derives its kill limit from
    them (autoresearch: upstream's time rules); the line that says the limit, to print once ("" for
    an environment whose limit is fixed by its config)."""
    return env.use_calibration(cal) if isinstance(env, AutoresearchEnv) else ""


def announce(k: int, events: EventLog | None = None) -> Callable[[int, RunResult], None]:
    """An on_run that prints each seed run as it ends (as a `calibrate_run` event when given a log)."""

    def show(i: int, res: RunResult) -> None:
        if events:  # the event log prints its own progress line (plain) or feeds the TUI
            return events.emit("calibrate_run", loop="*", run=i, k=k, status=res.status, val_bpb=res.val_bpb, steps=res.steps)
        print(f"seed train.py, calibration run {i + 1}/{k}: {res.status} val_bpb={res.val_bpb:.4f} "
              f"steps={res.steps} training_seconds={res.training_seconds:.1f}", flush=True)

    return show


def load_calibration(env_cfg: EnvCfg, slots: Sequence[Slot]) -> dict | None:
    """The stored calibration for this env, device, budget and slots, or None if never run."""
    path = calibration_path(env_cfg, slots)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ValueError(f"{path}: not a calibration file ({exc}); delete it and calibrate again") from None
