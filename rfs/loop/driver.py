"""The driver: every loop of the experiment, round after round, resumable from the run directory.

Each phase of a round is idempotent at the file level — a wave returns its compacted traces file if
it exists, a consolidation returns its merged model if it exists — so `rfs resume` after a kill -9
at any instant re-enters the interrupted phase and never collects or trains a round twice.
state.json records where each loop stands for people and tools; the files are the truth.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
import anyio.from_thread
import anyio.lowlevel
import pyarrow.parquet as pq

from rfs import atomic, config
from rfs.collect.aggregate import aggregate_round
from rfs.config import Config
from rfs.evals.metrics import record_thread_rounds
from rfs.events import EventLog
from rfs.hosts import HostsFile
from rfs.loop import evals, guard
from rfs.loop.memory import build_memory
from rfs.loop.plan import SHARED, LoopSpec, plan, rollout_id, rollout_seed
from rfs.loop.serving import V0, Servers
from rfs.rundir import Lock, RunDir
from rfs.trace import outcome_stamp, text_sha256


def drive(cfg: Config, run: RunDir, hosts: HostsFile, plain: bool = False, env: Any = None) -> int:
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
            if not tui:
                return anyio.run(_main, Driver(cfg, run, hosts, events), env)
            return _with_tui(Driver(cfg, run, hosts, events), env)
        finally:
            events.close()


def _with_tui(d: Driver, env: Any) -> int:
    from rfs.tui import watch

    outcome: list[Any] = []
    loop: list[tuple[Any, anyio.CancelScope]] = []  # the controller's event loop, to stop it from here

    async def main() -> int:
        with anyio.CancelScope() as scope:
            loop.append((anyio.lowlevel.current_token(), scope))
            return await _main(d, env)
        raise KeyboardInterrupt  # cancelled from the main thread, below

    def controller() -> None:
        try:
            outcome.append(anyio.run(main))
        except BaseException as exc:  # shown after the TUI closes, never lost in a thread
            outcome.append(exc)

    worker = threading.Thread(target=controller, name="rfs-controller", daemon=True)
    worker.start()
    try:
        watch(d.run.root)
        if worker.is_alive():
            print("TUI closed; the run goes on (Ctrl-C stops it, `python rfs.py resume` continues it)", flush=True)
            d.events.echo = True
        worker.join()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM lands in this thread: cancel the controller as the
        while not loop and worker.is_alive():  # plain path is cancelled, so its launchers kill their jobs
            time.sleep(0.01)
        if loop:
            token, scope = loop[0]
            try:
                anyio.from_thread.run_sync(scope.cancel, token=token)
            except RuntimeError:  # its event loop has ended already
                pass
        worker.join()
        raise
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


@dataclass
class Driver:
    cfg: Config
    run: RunDir
    hosts: HostsFile
    events: EventLog
    state: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def save(self) -> None:
        self.state["elapsed_s"] = self.state.get("elapsed_before_s", 0.0) + time.monotonic() - self.started
        self.run.write_state(self.state)

    def over_budget(self) -> bool:
        hours = self.cfg.experiment.budget_hours
        return hours > 0 and self.state.get("elapsed_s", 0.0) >= hours * 3600


async def _main(d: Driver, env: Any) -> int:
    from rfs.collect.slots import SlotPool
    from rfs.envs import environment
    from rfs.hosts import slots

    cfg = d.cfg
    d.state = d.run.read_state() or {"experiment": cfg.experiment.name, "loops": {}}
    d.state["elapsed_before_s"] = d.state.get("elapsed_s", 0.0)
    d.events.emit("experiment_started", experiment=cfg.experiment.name, resumed=bool(d.state["loops"]))
    env = env or environment(cfg.env)
    await anyio.to_thread.run_sync(env.prepare)
    pool = SlotPool(slots(d.hosts), cfg.collect, d.events)
    noise = await _noise(d, env, pool)
    v0 = await anyio.to_thread.run_sync(_resolve_v0, cfg)
    async with Servers(cfg, d.hosts, d.run, d.events, v0) as servers:
        ctx = Round(d, env, pool, servers, noise, v0)
        loops = plan(cfg)
        for loop in loops:
            d.state["loops"].setdefault(loop.name, _fresh_loop_state(loop, noise))
        d.save()
        await _schedule(ctx, loops)
    d.events.emit("experiment_finished", experiment=cfg.experiment.name)
    _print_summary(d)
    return 0


def _fresh_loop_state(loop: LoopSpec, noise: dict[str, float]) -> dict[str, Any]:
    return {"kind": loop.kind, "arc": loop.arc, "arm": loop.arm, "round": 0, "version": 0, "status": "running",
            "reason": "", "best_val_bpb": math.nan, "best_steps": 0, "best_rollout": "", "strikes": 0,
            "history": [], "start_val_bpb": noise["mean"]}


def _resolve_v0(cfg: Config) -> Path | None:
    """V0's weights on disk, or None for an external researcher we cannot train (baselines only)."""
    r = cfg.researcher
    if r.model == "smollm2":
        from rfs.setup import setup_embedded

        return setup_embedded()
    path = Path(r.model).expanduser()
    if (path / "config.json").exists():
        return path
    if r.backend == "external" and not any(l.trains for l in plan(cfg)):
        return None
    raise config.ConfigError(f"researcher.model: {path} is not a local model directory (no config.json); "
                             "rfs never downloads weights, and the gold loops need weights to train")


async def _noise(d: Driver, env: Any, pool: Any) -> dict[str, float]:
    """The seed's val_bpb mean ± std on this machine at the wave's concurrency (calibrated once)."""
    from rfs.collect.wave import reclaimed
    from rfs.envs.calibrate import announce, calibrate, load_calibration
    from rfs.launch import launcher_for

    if "noise" in d.state:
        return d.state["noise"]
    cal = load_calibration(d.cfg.env, len(pool.slots))
    if cal is None:
        d.events.emit("phase", arm="*", round=0, phase="calibrate")
        slots, k = pool.slots, d.cfg.env.calibration_k
        key = await reclaimed(d.run, slots, d.hosts, d.events, "calibrate", 0)
        cal = await calibrate(env, slots, k, launcher_for(slots[0], d.hosts, key), d.cfg.env, on_run=announce(k))
    print(f"seed train.py: val_bpb {cal['mean']:.4f} ± {cal['std']:.4f} over {cal['k']} runs", flush=True)
    d.state["noise"] = {"mean": cal["mean"], "std": cal["std"], "k": cal["k"]}
    d.save()
    return d.state["noise"]


async def _schedule(ctx: "Round", loops: list[LoopSpec]) -> None:
    """Run loops in priority order, `loop.max_concurrent` at a time, sharing one slot pool.

    Concurrent loops keep the slots full: while one loop fits its LoRA (no slot needed), another's
    wave runs. Each start and finish is a `scheduler` event.
    """
    limit = anyio.Semaphore(max(1, ctx.d.cfg.loop.max_concurrent))

    async def one(loop: LoopSpec) -> None:
        async with limit:
            ctx.d.events.emit("scheduler", decision="start", loop=loop.name)
            await run_loop(ctx, loop)
            ctx.d.events.emit("scheduler", decision="finish", loop=loop.name,
                              status=ctx.d.state["loops"][loop.name]["status"])

    async with anyio.create_task_group() as tg:
        for loop in loops:
            tg.start_soon(one, loop)


@dataclass
class Round:
    """What every round of every loop shares: the driver, the environment, slots and servers."""

    d: Driver
    env: Any
    pool: Any
    servers: Servers
    noise: dict[str, float]
    v0: Path | None
    shared_lock: anyio.Lock = field(default_factory=anyio.Lock)
    # One fit at a time: LoRA trains on one device (hosts.toml [train]), and transformers' model
    # loading is not thread-safe (concurrent loads in worker threads hit its meta-device init).
    fit_lock: anyio.Lock = field(default_factory=anyio.Lock)

    def seed_hashes(self) -> tuple[str, str]:
        return text_sha256(self.env.program_md()), text_sha256(self.env.seed_train_py())


def _stop_reason(d: Driver, st: dict[str, Any], loop: LoopSpec) -> str:
    e, cfg = d.cfg.experiment, d.cfg
    cap = cfg.loop.floor_waves if loop.kind == "floor" else e.max_rounds
    if cap and st["round"] >= cap:
        return f"reached {cap} rounds"
    if d.over_budget():
        return f"budget of {e.budget_hours} h spent"
    hist = st["history"]
    if e.plateau_rounds and len(hist) > e.plateau_rounds:
        recent = min(h["best_val_bpb"] for h in hist[-e.plateau_rounds:])
        earlier = min(h["best_val_bpb"] for h in hist[: -e.plateau_rounds])
        if not recent < earlier:
            return f"plateau: no new best in {e.plateau_rounds} rounds"
    return ""


async def run_loop(ctx: Round, loop: LoopSpec) -> None:
    d = ctx.d
    st = d.state["loops"][loop.name]
    probing = loop.trains and d.cfg.loop.eval_every > 0
    if probing:
        await evals.evaluate(ctx, loop, 0)  # V0 once, shared by every loop: the verdict's baseline
    while st["status"] == "running":
        reason = _stop_reason(d, st, loop)
        if reason:
            st.update(status="done", reason=reason)
            d.save()
            break
        r = st["round"] + 1
        traces = pq.read_table(await _collect(ctx, loop, r))
        record_thread_rounds(d.run, traces)
        _record(ctx, loop, r, traces.to_pylist())
        if loop.trains:
            await _consolidate(ctx, loop, r)
            if probing and evals.due(ctx, r):  # before the state moves on, so a kill resumes the probes
                await evals.evaluate(ctx, loop, r)
        st["round"], st["version"] = r, (r if loop.trains else 0)
        d.save()
    if probing and st["version"]:
        await evals.evaluate(ctx, loop, st["version"])  # the last version, whatever its number
    d.events.emit("phase", arm=loop.name, round=st["round"], phase=st["status"], reason=st["reason"])


async def _collect(ctx: Round, loop: LoopSpec, r: int) -> Path:
    d = ctx.d
    d.events.emit("phase", arm=loop.name, round=r, phase="collect")
    if r == 1 and loop.kind != "floor":
        return await _shared_round(ctx, loop)
    st = d.state["loops"][loop.name]
    version = r - 1 if loop.trains else 0
    key = loop.name if loop.trains else V0
    server = await ctx.servers.serve(key, version)
    past = [row for k in range(1, r) for row in _rows(d.run, loop.name, k)] if loop.kind == "ctrl" else []
    memory = build_memory(past, d.cfg.loop.ctrl_memory_chars) if loop.kind == "ctrl" else ""
    stamp = ""
    if loop.conditioned and version >= 1 and math.isfinite(st["best_val_bpb"]):
        stamp = outcome_stamp("success", st["best_val_bpb"] - d.cfg.loop.stamp_margin, st["best_steps"])
    start_py, start_bpb = _start(ctx, loop)
    specs = _specs(ctx, loop.name, loop.arc, r, version, server, start_py, start_bpb, memory, stamp)
    return await _wave(ctx, specs, server, key)


async def _shared_round(ctx: Round, loop: LoopSpec) -> Path:
    """Round 1 is collected once with V0 and linked into every loop that shares it."""
    d = ctx.d
    async with ctx.shared_lock:
        shared = d.run.traces(SHARED, 1)
        if not shared.exists():
            server = await ctx.servers.serve(V0, 0)
            specs = _specs(ctx, SHARED, "A", 1, 0, server, ctx.env.seed_train_py(), ctx.noise["mean"], "", "")
            await _wave(ctx, specs, server, V0)
    mine = d.run.traces(loop.name, 1)
    if not mine.exists():
        mine.parent.mkdir(parents=True, exist_ok=True)
        tmp = mine.with_suffix(".link.tmp")
        tmp.unlink(missing_ok=True)
        os.link(shared, tmp)
        os.replace(tmp, mine)
    return mine


def _specs(ctx: Round, arm: str, arc: str, r: int, version: int, server: Any, start_py: str,
           start_bpb: float, memory: str, stamp: str) -> list[Any]:
    from rfs.agent.rollout import RolloutSpec

    cfg = ctx.d.cfg
    program_sha, seed_sha = ctx.seed_hashes()
    return [
        RolloutSpec(
            experiment=cfg.experiment.name, arm=arm, arc=arc, round=r, version=f"v{version}", thread=t,
            rollout_id=rollout_id(arm, r, t), seed=rollout_seed(cfg.experiment.seed, arm, r, t),
            start_train_py=start_py, start_val_bpb=start_bpb, memory=memory, conditioning_stamp=stamp,
            researcher_model=server.model_id, researcher_weights_sha256=server.weights_sha256,
            env_name=ctx.env.name, program_md=ctx.env.program_md(), seed_train_py_sha256=seed_sha,
            program_md_sha256=program_sha,
        )
        for t in range(cfg.collect.rollouts)
    ]


async def _wave(ctx: Round, specs: list[Any], server: Any, key: str) -> Path:
    from rfs.collect.wave import run_wave

    d = ctx.d
    return await run_wave(d.run, specs, cfg=d.cfg, env=ctx.env, pool=ctx.pool, hosts=d.hosts,
                          client=server.client, events=d.events, calibration=ctx.noise,
                          revive=lambda: ctx.servers.revive(key))


def _rows(run: RunDir, arm: str, r: int) -> list[dict[str, Any]]:
    path = run.traces(arm, r)
    return pq.read_table(path).to_pylist() if path.exists() else []


def _start(ctx: Round, loop: LoopSpec) -> tuple[str, float]:
    """Arc A resets to the pristine train.py every round; arc B continues from the best so far."""
    st = ctx.d.state["loops"][loop.name]
    best = ctx.d.run.root / "best" / f"{loop.name}.py"
    if loop.arc == "B" and best.exists():
        return best.read_text(), st["best_val_bpb"]
    return ctx.env.seed_train_py(), ctx.noise["mean"]


def _record(ctx: Round, loop: LoopSpec, r: int, rows: list[dict[str, Any]]) -> None:
    """The loop's best so far, its history, and the collapse guard's verdict on this round."""
    d = ctx.d
    st = d.state["loops"][loop.name]
    agg = aggregate_round(d.run, loop.name, r, rows)
    ok = [row for row in rows if row["status"] == "success"]
    if ok:
        top = min(ok, key=lambda row: row["val_bpb"])
        if not top["val_bpb"] >= st["best_val_bpb"]:  # NaN-safe: any finite beats no best yet
            st.update(best_val_bpb=top["val_bpb"], best_steps=top["steps"], best_rollout=top["rollout_id"])
            atomic.write_text(d.run.root / "best" / f"{loop.name}.py", top["final_train_py"])
    hist = {"round": r, "best_val_bpb": agg["best_val_bpb"], "mean_val_bpb": agg["mean_val_bpb"],
            "success_rate": agg["success_rate"], "ast_diversity": agg["ast_diversity"]}
    problems = guard.strikes(agg, st["history"], d.cfg.guard) if loop.kind != "floor" else []
    st["history"].append(hist)
    st["strikes"] = st["strikes"] + 1 if problems else 0
    if problems:
        d.events.emit("alarm", arm=loop.name, alarm="collapse", message="; ".join(problems))
    if guard.should_pause(st["strikes"], d.cfg.guard):
        st.update(status="paused", reason="collapse guard: " + "; ".join(problems))
        d.events.emit("arm_paused", arm=loop.name, reason=st["reason"])


async def _consolidate(ctx: Round, loop: LoopSpec, r: int) -> Path:
    from rfs.consolidate import consolidate

    d = ctx.d
    d.events.emit("phase", arm=loop.name, round=r, phase="consolidate")
    parent = ctx.v0 if r == 1 else d.run.model(loop.name, r - 1)
    async with ctx.fit_lock, _cores_for_fit(ctx):
        return await anyio.to_thread.run_sync(
            lambda: consolidate(d.run, loop.name, r, parent, ctx.v0, d.cfg.consolidate, ctx.noise, d.events,
                                device=d.hosts.train.device, seed=d.cfg.experiment.seed)
        )


@asynccontextmanager
async def _cores_for_fit(ctx: Round) -> AsyncIterator[None]:
    """A CPU fit on a machine whose slots are all local holds every slot while it runs.

    A wall-clock training budget turns stolen cores into fewer steps and a worse val_bpb, so a
    wave running beside a CPU fit would be measured on a slower machine than the waves around it
    and the arms would not be compared fairly. Rollouts keep thinking; their runs wait.
    """
    from rfs.consolidate.fit import pick_device

    slots = ctx.pool.live
    if pick_device(ctx.d.hosts.train.device) != "cpu" or any(s.launcher != "local" for s in slots):
        yield
        return
    held = []
    try:  # a cancellation while still acquiring gives back what was already held
        for _ in slots:
            held.append(await ctx.pool.acquire())
        ctx.d.events.emit("scheduler", decision="fit holds the slots", slots=[s.name for s in held])
        yield
    finally:
        for slot in held:
            ctx.pool.release(slot)


def _print_summary(d: Driver) -> None:
    print(f"\n{d.cfg.experiment.name}: {d.run.root}")
    for name, st in d.state["loops"].items():
        bests = " ".join(f"{h['best_val_bpb']:.4f}" if math.isfinite(h["best_val_bpb"]) else "nan" for h in st["history"])
        print(f"  {name:6s} rounds={st['round']} status={st['status']} ({st['reason']}) best per round: {bests}")
    print(f"report: python rfs.py report {d.run.root}")
