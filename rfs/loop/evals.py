"""The held-out probes inside the loop: zero-shot, transfer and code, per researcher version.

V0 is probed once for every loop (recorded under the loop SHARED, as rfs.evals reads it); a gold loop's
V_n after its merge, every `loop.eval_every` versions. Each probe is recorded in
metrics/version_eval.parquet the moment it finishes, and a probe with a row there is never run
again, so a resumed run re-does only what was missing or failed for infrastructure reasons.

Zero-shot rollouts are trace rows of the loop PROBE, written by run_wave into a run directory of
their own, `probes/<line>/`: each (line, version) gets its own round file there, and the loop's
curves (rfs.evals.load reads traces/*/) never see them.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass
from typing import Any

import anyio
import pyarrow.compute as pc

from rfs import atomic, trace
from rfs.agent.client import ServerDown
from rfs.agent.rollout import RolloutSpec
from rfs.collect.slots import NoSlotsLeft
from rfs.collect.wave import reclaimed, run_wave
from rfs.envs import RunResult, execute
from rfs.evals import code_probe, drift, metrics, probes
from rfs.hosts import Slot
from rfs.launch import wave_launchers
from rfs.launch.base import JobOutcome
from rfs.loop.experiment import Experiment
from rfs.loop.plan import LoopSpec
from rfs.loop.serving import V0, Served
from rfs.rundir import RunDir
from rfs.trace import PROBE, SHARED

INFRA = "infra_error"  # a version_eval detail starting with this is no measurement: retried on resume


@dataclass(frozen=True)
class Target:
    """One researcher version to probe, and where its measurements go."""

    loop: str  # version_eval's loop: the gold loop's name, or SHARED for V0
    arc: str
    server_key: str  # rfs.loop.serving key: "v0" or the gold loop's name
    version: int


def due(ex: Experiment, version: int) -> bool:
    """Whether V_version is probed: V0, and every loop.eval_every-th version after it."""
    return version % max(1, ex.cfg.loop.eval_every) == 0


async def evaluate_v0(ex: Experiment) -> bool:
    """Probe V0 once for the whole experiment (loops that ask together wait for one another)."""
    async with ex.shared_lock:
        return await _evaluate(ex, Target(SHARED, "A", V0, 0))


async def evaluate(ex: Experiment, loop: LoopSpec, version: int) -> None:
    """Probe a gold loop's V_version (V0 if version is 0), then raise its drift alarms, once."""
    if version == 0:
        complete = await evaluate_v0(ex)
    else:
        complete = await _evaluate(ex, Target(loop.name, loop.arc, loop.name, version))
    if complete and version:  # V0 alone is no trend
        _drift_alarms(ex, loop, version)


async def _evaluate(ex: Experiment, t: Target) -> bool:
    """Run the target's missing probes; True when all three have a measurement."""
    todo = [p for p in metrics.PROBES if p not in _done(ex.run, t)]
    if not todo:
        return True
    ex.events.emit("phase", loop=t.loop, round=t.version, phase="eval", probes=todo)
    if {"zero_shot", "code"} & set(todo):  # the transfer alone needs no researcher server started or swapped
        served = await ex.servers.serve(t.server_key, t.version)
        if "zero_shot" in todo:
            rows = await _zero_shot(ex, t, served)
            _record(ex, t, "zero_shot", metrics.rollout_values(rows), _zero_shot_detail(rows))
        if "code" in todo:
            _record(ex, t, "code", *await _code(ex, served))
    if "transfer" in todo:  # after the zero-shot rollouts, whose best train.py it re-runs
        _record(ex, t, "transfer", *await _transfer(ex, t))
    missing = [p for p in metrics.PROBES if p not in _done(ex.run, t)]
    ex.events.emit("phase", loop=t.loop, round=t.version, phase="eval_done", missing=missing)
    return not missing


def _done(run: RunDir, t: Target) -> set[str]:
    table = metrics.read(run.metrics("version_eval"), metrics.VERSION_EVAL)
    return {
        r["probe"] for r in table.to_pylist()
        if (r["arc"], r["loop"], r["version"]) == (t.arc, t.loop, t.version) and not r["detail"].startswith(INFRA)
    }


def _record(ex: Experiment, t: Target, probe: str, values: list[float], detail: str) -> None:
    # Synchronous on purpose: the upsert reads, merges and rewrites the file, and concurrent loops
    # share it; with no await inside, no other loop's upsert can interleave and drop this row.
    row = metrics.version_eval_row(ex.cfg.experiment.name, t.arc, t.loop, t.version, probe, values, detail)
    metrics.record_version_eval(ex.run, [row])
    ex.events.emit("probe_done", loop=t.loop, round=t.version, probe=probe)


async def _zero_shot(ex: Experiment, t: Target, served: Served) -> list[dict[str, Any]]:
    """cfg.eval.zero_shot_rollouts seeded rollouts from the pristine train.py: no memory, no stamp."""
    env = ex.env
    program_sha, seed_sha = ex.seed_hashes()
    specs = [
        RolloutSpec(
            experiment=ex.cfg.experiment.name, loop=PROBE, arc=t.arc, round=t.version, version=t.version,
            thread=p.index, rollout_id=f"{t.loop}-v{t.version}-zs{p.index:03d}", seed=p.seed,
            start_train_py=env.seed_train_py(), start_val_bpb=ex.noise.mean, memory=p.memory,
            conditioning_stamp=p.conditioning_stamp, researcher_model=served.model_id,
            researcher_weights_sha256=served.weights_sha256, env_name=env.name, program_md=env.program_md(),
            seed_train_py_sha256=seed_sha, program_md_sha256=program_sha,
        )
        for p in probes.zero_shot_rollouts(ex.cfg, t.version)
    ]
    path = await run_wave(ex.run.probes(t.loop), specs, cfg=ex.cfg, env=env, pool=ex.pool, hosts=ex.hosts,
                          client=served.client, events=ex.events, calibration=ex.noise.to_json())
    return trace.read_rows(path)


def _zero_shot_detail(rows: list[dict[str, Any]]) -> str:
    ok = sum(r["status"] == "success" for r in rows)
    infra = sum(r["status"] == INFRA for r in rows)
    return f"{ok}/{len(rows)} zero-shot rollouts succeeded" + (f"; {infra} infra_error left out" if infra else "")


async def _transfer(ex: Experiment, t: Target) -> tuple[list[float], str]:
    """The best zero-shot train.py of this version at cfg.eval.transfer_depth, cfg.eval.transfer_runs
    times, each run paired with the seed train.py at that depth with the same seed (rfs.evals.probes).

    The zero-shot rollouts, not the loop's traces, supply the train.py: they depend on the
    version's weights alone, so V0 and every V_n are measured the same way.
    """
    depth = ex.cfg.eval.transfer_depth
    zs = ex.run.probes(t.loop).traces(PROBE, t.version)
    best = probes.best_train_py(trace.read_rows(zs) if zs.exists() else [])
    if best is None:
        return [], "nothing to transfer: no zero-shot rollout of this version succeeded"
    try:
        runs = probes.transfer_runs(ex.cfg, best, ex.env.seed_train_py())
    except ValueError as exc:
        return [], f"not applicable: {exc}"
    done: dict[tuple[bool, int], tuple[RunResult, str]] = {}
    logs: list[bytes] = []

    async def one(r: probes.TransferRun) -> None:
        rollout_id = f"{t.loop}-v{t.version}-{'seed-' if r.of_seed else ''}transfer{r.index}"
        done[(r.of_seed, r.index)] = await _run_once(ex, r.train_py, rollout_id, logs)

    async with anyio.create_task_group() as tg:  # one run per free slot, like a wave
        for r in runs:
            tg.start_soon(one, r)
    atomic.write_zstd(ex.run.probes(t.loop).transfer_log(t.version), b"".join(logs))
    infra = sorted((not why.startswith("after"), why) for _, why in done.values() if why)  # a slot's own failure first
    if infra:
        return [], f"{INFRA} {infra[0][1]}; {len(infra)}/{len(runs)} transfer runs found no working slot"
    n = ex.cfg.eval.transfer_runs
    value = {k: (res.val_bpb if res.status == "success" else math.nan) for k, (res, _) in done.items()}
    mine, seed = ([value[(of_seed, i)] for i in range(n)] for of_seed in (False, True))
    delta, pairs = probes.paired_delta(mine, seed)
    statuses = ", ".join(done[(False, i)][0].status for i in range(n))
    seed_ok = [v for v in seed if math.isfinite(v)]
    seed_mean = f"{sum(seed_ok) / len(seed_ok):.4f}" if seed_ok else "nan"
    return mine, (f"{sum(map(math.isfinite, mine))}/{n} runs at DEPTH={depth} ({statuses}); seed train.py at "
                  f"DEPTH={depth}, same seeds: {len(seed_ok)}/{n} ok, mean {seed_mean}; "
                  f"paired delta (version - seed) {delta:+.4f} over {pairs} pairs")


async def _run_once(ex: Experiment, train_py: str, rollout_id: str, logs: list[bytes]) -> tuple[RunResult, str]:
    """One run on a free slot, moved to another slot when the slot fails: (result, "") or, when no
    slot worked, (an infra_error result, why). Every attempt's output goes to `logs`."""
    failed: set[str] = set()
    why = ""
    for _ in range(ex.cfg.collect.infra_retries + 1):
        try:
            slot = await ex.pool.acquire(avoid=failed)
        except NoSlotsLeft as exc:
            return RunResult(INFRA, detail=str(exc)), f"with no slot left: {exc}"
        failure = ""
        try:
            result, outcome = await _execute(ex, slot, train_py, rollout_id)
            failure = outcome.infra_error or (result.detail if result.status == INFRA else "")
        finally:  # cancelled mid-run: the slot goes back, uncounted
            ex.pool.release(slot, failure=failure)
        head = f"=== {rollout_id} on {slot.name} status={result.status} exit={outcome.exit_code} infra={outcome.infra_error!r} ===\n"
        logs.append(head.encode() + outcome.output)
        if not failure:
            return result, ""
        failed.add(slot.name)
        why = f"{slot.name}: {failure}"
    return RunResult(INFRA, detail=why), f"after {len(failed)} slot(s): {why}"


async def _execute(ex: Experiment, slot: Slot, train_py: str, rollout_id: str) -> tuple[RunResult, JobOutcome]:
    try:  # the wave's way to reach a slot: a SLURM allocation or ssh connection, released after the run
        key = await reclaimed(ex.run, [slot], ex.hosts, ex.events, rollout_id, 0)
        async with wave_launchers([slot], ex.hosts, key) as launcher_of:
            return await execute(ex.env, launcher_of(slot), slot, train_py, rollout_id)
    except Exception as exc:  # the launcher or the slot broke, not the researcher's train.py
        failure = f"{type(exc).__name__}: {exc}"
        return RunResult(INFRA, detail=failure), JobOutcome(None, traceback.format_exc().encode(), False, 0.0, infra_error=failure)


async def _code(ex: Experiment, served: Served) -> tuple[list[float], str]:
    """The HumanEval subset, the same problems with the same seeds for every version (paired)."""
    tasks = code_probe.problems(ex.cfg.eval.code_problems)
    try:
        scores = await code_probe.run_with_client(served.client, tasks, ex.cfg.experiment.seed)
    except ServerDown as exc:  # the server's failure: scoring it as wrong answers would blame the researcher
        return [], f"{INFRA}: {exc}"
    passed = [s.name for s in scores if s.ok]
    return code_probe.values(scores), f"{len(passed)}/{len(scores)} HumanEval problems passed: {', '.join(passed) or 'none'}"


def _drift_alarms(ex: Experiment, loop: LoopSpec, version: int) -> None:
    """Emit the loop's drift alarms once per (loop, version), remembered in state.json."""
    seen = ex.state.alarms
    key = f"drift {loop.name} v{version}"
    if key in seen:
        return
    table = metrics.read(ex.run.metrics("version_eval"), metrics.VERSION_EVAL)
    upto = table.filter(pc.less_equal(table["version"], version))  # the series as it stood at this version
    messages = drift.alarms(upto, loop.name, ex.cfg.eval.drift_window)
    for message in messages:
        ex.events.emit("alarm", loop=loop.name, alarm="drift", message=message, version=version)
    seen[key] = messages
    ex.save()  # after the events: a kill in between repeats an alarm rather than losing it
