"""One round of one loop: collect a wave, record it, and (gold loops) consolidate it into V_r.

Each phase is idempotent at the file level — a wave returns its compacted traces file if it exists,
a consolidation returns its merged model if it exists — so a controller killed at any instant
re-enters the interrupted phase and never collects or trains a round twice.
"""

from __future__ import annotations

import math
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
import pyarrow.compute as pc

from rfs import atomic, mirror, trace
from rfs.agent import prompts
from rfs.agent.rollout import RolloutSpec
from rfs.collect.aggregate import aggregate_round, controls, researchers
from rfs.collect.wave import run_wave, seed_controls
from rfs.devices import pick_device
from rfs.evals import behaviour
from rfs.evals.metrics import record_thread_rounds
from rfs.loop import fit_process, guard
from rfs.loop.fit_process import FitJob
from rfs.loop.experiment import Experiment
from rfs.loop.memory import budget_tokens, build_memory, token_counter
from rfs.loop.plan import LoopSpec, control_id, rollout_id, rollout_seed
from rfs.loop.serving import V0, Served
from rfs.loop.state import LoopState, RoundStats
from rfs.trace import SHARED, outcome_stamp


async def play(ex: Experiment, loop: LoopSpec, r: int) -> int:
    """Round r of the loop, up to (not including) its probes and the state's move to round r; the
    version the loop ends the round on (V_r once consolidated)."""
    traces = trace.read(await _collect(ex, loop, r))
    record_thread_rounds(ex.run, traces.filter(pc.invert(traces["seed_control"])))  # the researcher's threads
    _record(ex, loop, r, traces.to_pylist())
    if not loop.trains:
        return 0
    if r == ex.cfg.experiment.max_rounds and not ex.cfg.loop.final_fit:
        ex.events.emit("scheduler", decision=f"round {r} not consolidated (loop.final_fit = false: "
                       f"no round would collect with V{r})", loop=loop.name)
        return r - 1
    await _consolidate(ex, loop, r)
    await behaviour.measure(ex, loop.name, r)
    return r


async def _collect(ex: Experiment, loop: LoopSpec, r: int) -> Path:
    ex.events.emit("phase", loop=loop.name, round=r, phase="collect")
    if r == 1 and loop.kind != "floor":
        return await _shared_round(ex, loop)
    version = r - 1 if loop.trains else 0
    key = loop.name if loop.trains else V0
    server = await ex.servers.serve(key, version)
    start_py, start_bpb = _start(ex, loop)
    specs = _specs(ex, loop, r, version, server, start_py, start_bpb,
                   memory=_memory(ex, loop, r), stamp=_stamp(ex, loop, version))
    return await _wave(ex, specs, server, key)


async def _shared_round(ex: Experiment, loop: LoopSpec) -> Path:
    """Round 1 is collected once per replicate with V0 and linked into every loop that shares it."""
    async with ex.shared_lock:
        shared = ex.run.traces(loop.shared, 1)
        if not shared.exists():
            server = await ex.servers.serve(V0, 0)
            wave = LoopSpec(loop.shared, "shared", "A", "", SHARED, loop.replicate)
            specs = _specs(ex, wave, 1, 0, server, ex.env.seed_train_py(), ex.noise.mean)
            await _wave(ex, specs, server, V0)
    mine = ex.run.traces(loop.name, 1)
    if not mine.exists():  # a hard link through a temp name: the loop's file appears whole or not at all
        mine.parent.mkdir(parents=True, exist_ok=True)
        tmp = mine.with_suffix(".link.tmp")
        tmp.unlink(missing_ok=True)
        os.link(shared, tmp)
        os.replace(tmp, mine)
    return mine


def _start(ex: Experiment, loop: LoopSpec) -> tuple[str, float]:
    """Arc A resets to the pristine train.py every round; arc B continues from the best so far."""
    best = ex.run.best_train_py(loop.name)
    if loop.arc == "B" and best.exists():
        return best.read_text(), ex.state.loops[loop.name].best_val_bpb
    return ex.env.seed_train_py(), ex.noise.mean


def _memory(ex: Experiment, loop: LoopSpec, r: int) -> str:
    """CTRL's prompt carries its own earlier rounds, sized in tokens (rfs.loop.memory); no other
    loop has a memory."""
    if loop.kind != "ctrl":
        return ""
    past = [row for k in range(1, r) for row in _rows(ex, loop.name, k)]
    count = token_counter(ex.servers.model_dir(V0, 0))
    start_py, start_bpb = _start(ex, loop)
    space = ex.cfg.researcher.action_space
    fixed = prompts.system(ex.env.program_md(), space) + prompts.first_user(start_py, space, start_bpb)
    return build_memory(past, budget_tokens(ex.cfg, fixed, count), count)


def _stamp(ex: Experiment, loop: LoopSpec, version: int) -> str:
    """Arm S asks for an outcome just past its best so far, once its weights have learned stamps
    (its no-prefill line never does: LoopSpec.conditioned)."""
    st = ex.state.loops[loop.name]
    if not (loop.conditioned and version >= 1 and math.isfinite(st.best_val_bpb)):
        return ""
    return outcome_stamp("success", st.best_val_bpb - ex.cfg.loop.stamp_margin, st.best_steps)


def _rows(ex: Experiment, loop: str, r: int) -> list[dict[str, Any]]:
    path = ex.run.traces(loop, r)
    return trace.read_rows(path) if path.exists() else []


def _specs(ex: Experiment, loop: LoopSpec, r: int, version: int, server: Served, start_py: str,
           start_bpb: float, memory: str = "", stamp: str = "") -> list[RolloutSpec]:
    """The wave's rollouts, then its seed controls (threads N, N+1 …: the unmodified start file,
    no memory, no stamp)."""
    cfg = ex.cfg
    n = cfg.collect.rollouts
    program_sha, seed_sha = ex.seed_hashes()

    def spec(t: int, rid: str, memory: str, stamp: str) -> RolloutSpec:
        return RolloutSpec(
            experiment=cfg.experiment.name, loop=loop.name, line=loop.line_name, replicate=loop.replicate,
            arc=loop.arc, round=r, version=version, thread=t, rollout_id=rid,
            seed=rollout_seed(cfg.experiment.seed, loop.replicate, r, t),
            start_train_py=start_py, start_val_bpb=start_bpb, memory=memory, conditioning_stamp=stamp,
            researcher_model=server.model_id, researcher_weights_sha256=server.weights_sha256,
            env_name=ex.env.name, program_md=ex.env.program_md(), seed_train_py_sha256=seed_sha,
            program_md_sha256=program_sha,
        )

    rollouts = [spec(t, rollout_id(loop.name, r, t), memory, stamp) for t in range(n)]
    return rollouts + [spec(n + i, control_id(loop.name, r, i), "", "") for i in range(seed_controls(cfg.collect))]


async def _wave(ex: Experiment, specs: list[RolloutSpec], server: Served, key: str) -> Path:
    n = ex.cfg.collect.rollouts
    return await run_wave(ex.run, specs[:n], cfg=ex.cfg, env=ex.env, pool=ex.pool, hosts=ex.hosts,
                          client=server.client, events=ex.events, calibration=ex.noise.to_json(),
                          revive=lambda: ex.servers.revive(key), controls=specs[n:])


def _record(ex: Experiment, loop: LoopSpec, r: int, rows: list[dict[str, Any]]) -> None:
    """The loop's best so far, its history, and the collapse guard's verdict on this round."""
    st = ex.state.loops[loop.name]
    agg = aggregate_round(ex.run, loop.name, r, rows)
    ctl = controls(rows)
    _best_so_far(ex, loop.name, st, researchers(rows))
    successes = sum(row["status"] == "success" for row in researchers(rows))
    stats = RoundStats(r, agg["best_val_bpb"], agg["mean_val_bpb"], agg["success_rate"], agg["ast_diversity"],
                       n=successes, control_n=ctl["control_n"], control_mean_val_bpb=ctl["control_mean_val_bpb"],
                       control_std_val_bpb=ctl["control_std_val_bpb"],
                       std_val_bpb=agg["std_val_bpb"] if successes >= 2 else math.nan)
    # A frozen baseline cannot collapse: only a loop that trains is guarded.
    problems = guard.judge(st, stats, ex.cfg.guard, ex.noise.std, guarded=loop.trains)
    if problems:
        ex.events.emit("alarm", loop=loop.name, alarm="collapse", message="; ".join(problems))
    if st.status == "paused":
        ex.events.emit("loop_paused", loop=loop.name, reason=st.reason)


def _best_so_far(ex: Experiment, name: str, st: LoopState, rows: list[dict[str, Any]]) -> None:
    ok = [row for row in rows if row["status"] == "success" and not row["anomaly_flags"]]  # a flagged number is no best
    if not ok:
        return
    top = min(ok, key=lambda row: row["val_bpb"])
    if not top["val_bpb"] >= st.best_val_bpb:  # NaN-safe: any finite beats no best yet
        st.best_val_bpb, st.best_steps, st.best_rollout = top["val_bpb"], top["steps"], top["rollout_id"]
        atomic.write_text(ex.run.best_train_py(name), top["final_train_py"])


async def _consolidate(ex: Experiment, loop: LoopSpec, r: int) -> Path:
    ex.events.emit("phase", loop=loop.name, round=r, phase="consolidate")
    parent = ex.v0 if r == 1 else ex.run.model(loop.name, r - 1)
    async with ex.fit_lock, cores_for_fit(ex):
        await mirror.push(ex.cfg.mirror, ex.run)  # the round's traces and the state, before the fit
        merged = await fit_process.fit(FitJob(
            ex.run, loop.name, r, parent, ex.v0, ex.cfg.consolidate, ex.noise.to_json(),
            device=ex.servers.placement.fit_device, seed=ex.cfg.experiment.seed, echo=ex.events.echo,
            gpus=ex.servers.placement.fit_gpus))
        await mirror.push(ex.cfg.mirror, ex.run)  # the published V_r, before a server loads it
        return merged


@asynccontextmanager
async def cores_for_fit(ex: Experiment) -> AsyncIterator[None]:
    """A CPU fit on a machine whose slots are all local holds every slot while it runs.

    A wall-clock training budget turns stolen cores into fewer steps and a worse val_bpb, so a
    wave running beside a CPU fit would be measured on a slower machine than the waves around it
    and the arms would not be compared fairly. Rollouts keep thinking; their runs wait.
    """
    slots = ex.pool.live
    if pick_device(ex.hosts.train.device) != "cpu" or any(s.launcher != "local" for s in slots):
        yield
        return
    held = []
    try:  # a cancellation while still acquiring gives back what was already held
        for _ in slots:
            held.append(await ex.pool.acquire())
        ex.events.emit("scheduler", decision="fit holds the slots", slots=[s.name for s in held])
        yield
    finally:
        for slot in held:
            ex.pool.release(slot)
