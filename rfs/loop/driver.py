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
            code = with_tui(main, run.root, events) if tui else anyio.run(main)
        finally:
            events.close()
        print(summary(run), flush=True)  # after the TUI has given the terminal back
        return code


async def _main(cfg: Config, run: RunDir, hosts: HostsFile, events: EventLog, env: Environment) -> int:
    async with experiment.started(cfg, run, hosts, events, env) as ex:
        loops = plan(cfg)
        for loop in loops:
            ex.state.loops.setdefault(loop.name, LoopState.fresh(loop, ex.noise.mean))
        ex.save()
        await schedule(ex, loops)
        await mirror.push(cfg.mirror, run)  # the finished run, whole
    events.emit("experiment_finished", experiment=cfg.experiment.name)
    return 0


def summary(run: RunDir) -> str:
    """The run's answer, printed when it ends: each loop's best per round, the decomposition table
    from the report it writes, where that report is, and the commands that look further."""
    from rfs.evals.report import report  # lazy: it plots with matplotlib, which only the end needs

    lines = [f"\n{run.root.name}: {run.root}"]
    for name, st in run.read_state().get("loops", {}).items():
        bests = " ".join(_bpb(h.get("best_val_bpb", math.nan)) for h in st.get("history", []))
        lines.append(f"  {name:6s} rounds={st.get('round', '-')} status={st.get('status', '-')} "
                     f"({st.get('reason', '')}) best per round: {bests}")
    out = report(run.root)
    lines += ["", (run.report / "decomposition.md").read_text().rstrip(), "",
              f"report: {out} (hero plot, statuses, alarms, every rollout in results.tsv)",
              "look further:"]
    further = [(f"python rfs.py report {run.root}", "write the report again"),
               (f"python rfs.py watch {run.root}", "the run in the TUI, every rollout's transcript"),
               ("python rfs.py plan", "what a powered study costs (replicates × rounds × rollouts)")]
    width = max(len(c) for c, _ in further)
    lines += [f"  {c.ljust(width)}  {why}" for c, why in further]
    return "\n".join(lines)


def _bpb(x: float) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) and math.isfinite(x) else "nan"
