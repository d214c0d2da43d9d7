"""The driver: every loop of the experiment, round after round, resumable from the run directory.

`rfs resume` after a kill -9 at any instant re-enters the interrupted phase (rfs/loop/round.py);
state.json records where each loop stands for people and tools, and the files are the truth.
"""

from __future__ import annotations

import math
import sys
from functools import partial

import anyio

from rfs import atomic, config, mirror
from rfs.config import Config
from rfs.envs import Environment, environment
from rfs.events import EventLog
from rfs.hosts import HostsFile
from rfs.loop import experiment
from rfs.loop.experiment import Experiment
from rfs.loop.plan import plan
from rfs.loop.schedule import schedule
from rfs.loop.state import LoopState
from rfs.rundir import Lock, RunDir
from rfs.tui.bridge import with_tui


def drive(cfg: Config, run: RunDir, hosts: HostsFile, plain: bool = False, env: Environment | None = None) -> int:
    """Run (or resume) the experiment in `run`. `env` replaces the configured environment (tests).

    On a terminal the TUI shows the run while the controller works in a thread; quitting the TUI
    leaves the run going with plain progress lines. Ctrl-C or SIGTERM stops the controller with
    either, its jobs killed.
    """
    tui = not plain and sys.stdout.isatty()
    with Lock(run.root):
        if not run.config.exists():
            atomic.write_text(run.config, config.to_toml(cfg))
        events = EventLog(run.events, echo=not tui)
        try:
            main = partial(_main, cfg, run, hosts, events, env or environment(cfg.env))
            return with_tui(main, run.root, events) if tui else anyio.run(main)
        finally:
            events.close()


async def _main(cfg: Config, run: RunDir, hosts: HostsFile, events: EventLog, env: Environment) -> int:
    async with experiment.started(cfg, run, hosts, events, env) as ex:
        loops = plan(cfg)
        for loop in loops:
            ex.state.loops.setdefault(loop.name, LoopState.fresh(loop, ex.noise.mean))
        ex.save()
        await schedule(ex, loops)
        await mirror.push(cfg.mirror, run)  # the finished run, whole
    events.emit("experiment_finished", experiment=cfg.experiment.name)
    _print_summary(ex)
    return 0


def _print_summary(ex: Experiment) -> None:
    print(f"\n{ex.cfg.experiment.name}: {ex.run.root}")
    for name, st in ex.state.loops.items():
        bests = " ".join(f"{h.best_val_bpb:.4f}" if math.isfinite(h.best_val_bpb) else "nan" for h in st.history)
        print(f"  {name:6s} rounds={st.round} status={st.status} ({st.reason}) best per round: {bests}")
    print(f"report: python rfs.py report {ex.run.root}")
