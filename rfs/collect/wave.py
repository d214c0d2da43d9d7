"""One wave: N rollouts as coroutines in one task group, each finished row on disk at once.

Exactly once, across kill -9: a finished rollout is its own small file,
`run.pending_row(loop, round, rollout_id)` (written atomically), so a restarted wave skips it;
when all are there the round file `run.traces(loop, round)` is compacted from them (atomically)
and is the wave's answer from then on. A restarted wave first stops the jobs a killed controller
left running (`reclaimed`). A rollout holds a slot only while its training run executes, so N
rollouts share few slots while the researcher thinks.

Seed controls (`controls`) run beside the rollouts in the same wave, through the same slots and
harness: the unmodified starting train.py, no researcher turn, a row with seed_control=True. They
measure the noise under the conditions this wave ran in (its concurrency, its researcher server's
load), so "improvement" is judged against them; nothing trains on them or counts them as the
researcher's.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
import traceback
from pathlib import Path
from typing import Any, Awaitable, Callable

import anyio

from rfs import atomic, trace
from rfs.agent.client import ResearcherClient, ServerDown
from rfs.agent.rollout import Executed, RolloutSpec, rollout
from rfs.collect import aggregate, anomaly
from rfs.collect.slots import NoSlotsLeft, SlotPool
from rfs.config import CollectCfg, Config
from rfs.envs.base import Environment, RunResult
from rfs.events import EventLog
from rfs.hosts import HostsFile, Slot
from rfs.launch import reclaim, wave_launchers
from rfs.launch.base import JobOutcome, Launcher
from rfs.rundir import RunDir

RolloutFn = Callable[..., Awaitable[dict[str, Any]]]
_RETRY_PAUSE_S = 0.5  # before re-running a rollout whose researcher server was down


async def run_wave(
    run: RunDir,
    specs: list[RolloutSpec],
    *,
    cfg: Config,
    env: Environment,
    pool: SlotPool,
    hosts: HostsFile,
    client: ResearcherClient,
    events: EventLog,
    rollout_fn: RolloutFn = rollout,
    calibration: dict[str, float] | None = None,
    revive: Callable[[], Awaitable[None]] | None = None,
    controls: list[RolloutSpec] = (),  # type: ignore[assignment]  # seed-control runs of the same (loop, round)
) -> Path:
    """Run every spec's rollout and every control's seed run once (resuming a killed wave); return
    traces(loop, round).

    `calibration` ({mean, std} of the seed's val_bpb) sharpens the anomaly flags when given.
    `revive()` restarts a researcher server found down, before the rollouts it failed play again.
    """
    loop, round_ = _one_round(specs + list(controls))
    out = run.traces(loop, round_)
    if out.exists():  # compacted before a kill: at most the pending files are left to remove
        shutil.rmtree(run.pending(loop, round_), ignore_errors=True)
        return out
    pending = run.pending(loop, round_)
    pending.mkdir(parents=True, exist_ok=True)
    blobs = run.blob(loop, round_, "-").parent  # the round's blob folder
    for litter in [*pending.glob(".*.tmp"), *blobs.glob(".*.tmp")]:
        litter.unlink(missing_ok=True)  # half-written temp files of a killed controller, never renamed
    done = {p.name.removesuffix(".json") for p in pending.glob("*.json")}
    todo = [s for s in specs if s.rollout_id not in done]
    todo_controls = [s for s in controls if s.rollout_id not in done]
    finished: dict[str, dict[str, Any]] = {}  # this controller's rows, kept so compaction need not read them back
    # Disk writes (fsync) go to worker threads so rollouts never wait on one another's I/O; a few
    # threads keep up with a wave's ends, and each new one (anyio retires idle ones after 10 s, so a
    # wave's ends find none) costs the event loop a thread start.
    writers = anyio.CapacityLimiter(4)

    async def one(spec: RolloutSpec, launcher: Callable[[Slot], Launcher], control: bool = False) -> None:
        training = _Training(run, spec, cfg, env, pool, launcher, events)
        if control:
            row = await _control_row(spec, cfg, training)
        else:
            row = await _rollout_row(spec, cfg, client, training, events, rollout_fn, revive)
        await anyio.to_thread.run_sync(_persist, training, run.pending_row(loop, round_, spec.rollout_id), row, limiter=writers)
        finished[spec.rollout_id] = row
        events.emit(
            "rollout_finished", loop=loop, round=round_, rollout_id=spec.rollout_id, status=row["status"], val_bpb=row["val_bpb"]
        )

    if todo or todo_controls:  # a SLURM allocation is made (and waited for) only when there is something to run
        wave = await reclaimed(run, pool.slots, hosts, events, loop, round_)
        async with wave_launchers(pool.slots, hosts, wave) as launcher, anyio.create_task_group() as tg:
            for spec in todo_controls:  # first: they take slots while the researcher is still thinking
                tg.start_soon(one, spec, launcher, True, name=spec.rollout_id)
            for spec in todo:
                tg.start_soon(one, spec, launcher, name=spec.rollout_id)
    return await anyio.to_thread.run_sync(_compact, run, specs + list(controls), finished, cfg, events, calibration)


def seed_controls(cfg: CollectCfg) -> int:
    """Seed-control runs per wave: `collect.seed_controls` of the wave's slots, at least one."""
    return max(1, math.ceil(cfg.seed_controls * cfg.rollouts))


async def _control_row(spec: RolloutSpec, cfg: Config, training: _Training) -> dict[str, Any]:
    """The starting train.py run as it is, through the same slots, launcher and harness retries as a
    rollout's run; the status is the harness's. No researcher turn, nothing to train on."""
    started = time.time()
    ex = await training(spec.start_train_py)
    res = ex.result
    row = trace.new_row(
        **spec.columns(), seed_control=True, host=ex.host, slot=ex.slot, gpu_type=ex.gpu_type, job_id=ex.job_id,
        blob_path=ex.blob_path, infra_attempts=ex.infra_attempts, action_space=cfg.researcher.action_space,
        final_train_py=spec.start_train_py, exit_code=res.exit_code, status=res.status,
        detail=(res.detail.splitlines() or [""])[0], val_bpb=float(res.val_bpb) if res.status == "success" else math.nan,
        steps=int(res.steps), tokens=int(res.tokens), peak_vram_mb=float(res.peak_memory_mb),
        training_seconds=float(res.training_seconds), wall_seconds=float(res.wall_seconds),
        stdout_tail=res.stdout_tail.encode("utf-8", "replace").decode(), started_at=started, finished_at=time.time(),
    )
    trace.validate(row)
    return row


def wave_key(run: RunDir, loop: str, round_: int) -> str:
    """A short key naming this wave of this run, for its jobs to carry (see rfs.launch.reclaim)."""
    return hashlib.sha256(f"{run.root.resolve()}\0{loop}\0{round_}".encode()).hexdigest()[:16]


async def reclaimed(run: RunDir, slots: list[Slot], hosts: HostsFile, events: EventLog, loop: str, round_: int) -> str:
    """The key for the jobs of (loop, round) in `run`, once whatever a killed controller left running
    under it is stopped; an `orphans` alarm says what that was. Call it before starting those jobs."""
    key = wave_key(run, loop, round_)
    if left := await reclaim(slots, hosts, key):
        events.emit("alarm", loop=loop, round=round_, alarm="orphans", message=f"left running by a killed controller: {'; '.join(left)}")
    return key


def _one_round(specs: list[RolloutSpec]) -> tuple[str, int]:
    if not specs:
        raise ValueError("run_wave: no rollouts to run")
    rounds = {(s.loop, s.round) for s in specs}
    if len(rounds) != 1:
        raise ValueError(f"run_wave: one wave is one (loop, round), got {sorted(rounds)}")
    ids = [s.rollout_id for s in specs]
    if len(set(ids)) != len(ids):
        raise ValueError("run_wave: rollout_ids must be distinct")
    return rounds.pop()


async def _rollout_row(
    spec: RolloutSpec, cfg: Config, client: ResearcherClient, training: _Training, events: EventLog, rollout_fn: RolloutFn,
    revive: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """The rollout's row, or a truthful infra_error row: one rollout's failure never ends the wave."""
    started = time.time()
    for attempt in range(cfg.collect.infra_retries + 1):
        if attempt:
            await anyio.sleep(_RETRY_PAUSE_S * attempt)
        events.emit("rollout_started", loop=spec.loop, round=spec.round, rollout_id=spec.rollout_id, thread=spec.thread)
        try:
            row = await rollout_fn(spec, cfg.researcher, client, training, events)
            trace.validate(row)  # checked once, before it is written: a malformed row is our bug, one rollout's
        except ServerDown as exc:
            detail = f"researcher server down after {attempt + 1} attempt(s): {exc}"
            await _revive(revive, spec, events)
            continue
        except NoSlotsLeft:  # the whole pool is gone: no rollout of this wave can run, so the run stops
            raise
        except Exception as exc:  # a bug in one rollout: record it, keep the other N-1 going
            detail = f"rollout raised {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            events.emit("alarm", loop=spec.loop, alarm="rollout_error", message=f"{spec.rollout_id}: {type(exc).__name__}: {exc}")
            break
        # An infra_error before any training run is the researcher server's: play the rollout again.
        # One after a run already had its slot retries inside run_training.
        if row["status"] != "infra_error" or training.runs:
            return row
        detail = f"{row['detail']} (after {attempt + 1} attempt(s))"
    row = infra_row(spec, cfg, detail, started=started, infra_attempts=training.attempts, blob_path=training.blob_path)
    trace.validate(row)  # checked before it is written, as every other row
    return row


async def _revive(revive: Callable[[], Awaitable[None]] | None, spec: RolloutSpec, events: EventLog) -> None:
    if revive is None:
        return
    try:
        await revive()
    except Exception as exc:  # a server that will not come back: the retries record infra_error
        events.emit("alarm", loop=spec.loop, alarm="server", message=f"restart failed: {type(exc).__name__}: {exc}")


def _persist(training: _Training, row_path: Path, row: dict[str, Any]) -> None:
    """The rollout's blob, then its row: a row on disk never points at a blob that is not.
    A kill before the row is written replays the rollout, blob and all."""
    if training.log:
        atomic.write_zstd(training.run.root / training.blob_path, bytes(training.log))
    atomic.write_bytes(row_path, trace.dumps(row))


def infra_row(spec: RolloutSpec, cfg: Config, detail: str, *, started: float, infra_attempts: int = 0, blob_path: str = "") -> dict[str, Any]:
    """The trace row of a rollout the infrastructure (or our own code) failed."""
    now = time.time()
    return trace.new_row(
        **spec.columns(), action_space=cfg.researcher.action_space, final_train_py=spec.start_train_py,
        status="infra_error", detail=detail, wall_seconds=now - started, blob_path=blob_path,
        infra_attempts=infra_attempts, started_at=started, finished_at=now,
    )


class _Training:
    """The rollout's RunTraining callback: slot → env.job → launcher.run → env.result, with retries.

    An infra_error is retried on another slot up to cfg.collect.infra_retries times; every run's
    full output goes to `log`, the rollout's blob (all runs of the rollout, in order), written
    with its row. gpu_type is "cpu" or "cuda": the slot knows its device index, not the card's model.
    """

    def __init__(self, run: RunDir, spec: RolloutSpec, cfg: Config, env: Environment, pool: SlotPool,
                 launcher: Callable[[Slot], Launcher], events: EventLog):
        self.run, self.spec, self.cfg, self.env, self.pool = run, spec, cfg, env, pool
        self.launcher, self.events = launcher, events
        self.blob_path = ""  # relative to the run directory, once there is output to keep
        self.attempts = 0  # runs that ended in infra_error, across the rollout's runs
        self.runs = 0  # training runs launched
        self.log = bytearray()

    async def __call__(self, train_py: str) -> Executed:
        failed: set[str] = set()
        for attempt in range(self.cfg.collect.infra_retries + 1):
            slot = await self.pool.acquire(avoid=failed)
            failure = ""
            try:
                outcome = await self._run_on(slot, train_py)
                failure = outcome.infra_error
                result = self._result(outcome, attempt)
                s = self.spec
                self.events.emit("run_finished", loop=s.loop, round=s.round, rollout_id=s.rollout_id, slot=slot.name,
                                 host=outcome.host or slot.host, status=result.status, val_bpb=result.val_bpb, steps=result.steps)
            finally:  # cancelled mid-run (the wave is stopping): the slot goes back, uncounted
                self.pool.release(slot, failure=failure)
            self._keep(slot, attempt, outcome)
            if not outcome.infra_error:
                break
            failed.add(slot.name)
            self.attempts += 1
        gpu_type = "cpu" if slot.gpu < 0 else "cuda"
        return Executed(result, outcome.host or slot.host, slot.name, gpu_type, outcome.job_id, self.attempts, self.blob_path)

    async def _run_on(self, slot: Slot, train_py: str) -> JobOutcome:
        s = self.spec
        self.runs += 1
        self.events.emit("run_started", loop=s.loop, round=s.round, rollout_id=s.rollout_id, slot=slot.name, host=slot.host)
        try:
            job = self.env.job(train_py, slot, s.rollout_id)
            return await self.launcher(slot).run(slot, job)
        except Exception as exc:  # the launcher itself broke: that is the slot's failure, not the code's
            text = traceback.format_exc()
            return JobOutcome(None, text.encode(), False, 0.0, infra_error=f"{type(exc).__name__}: {exc}")

    def _result(self, outcome: JobOutcome, attempt: int) -> RunResult:
        if outcome.infra_error:
            tail = outcome.output[-2000:].decode(errors="replace")
            detail = f"infra_error on attempt {attempt + 1}: {outcome.infra_error}"
            return RunResult("infra_error", exit_code=outcome.exit_code, wall_seconds=outcome.wall_seconds, detail=detail, stdout_tail=tail)
        return self.env.result(outcome)

    def _keep(self, slot: Slot, attempt: int, outcome: JobOutcome) -> None:
        header = f"=== {self.spec.rollout_id} on {slot.name} ({slot.host}) attempt {attempt + 1}"
        header += f" exit={outcome.exit_code} timed_out={outcome.timed_out} infra={outcome.infra_error!r} ===\n"
        self.log += header.encode() + outcome.output + b"\n"
        s = self.spec
        self.blob_path = str(self.run.blob(s.loop, s.round, s.rollout_id).relative_to(self.run.root))


def _compact(
    run: RunDir, specs: list[RolloutSpec], finished: dict[str, dict[str, Any]], cfg: Config, events: EventLog,
    calibration: dict[str, float] | None,
) -> Path:
    """All pending rows (read back only if an earlier controller wrote them) → one flagged,
    ordered round file; then the pending files can go."""
    loop, round_ = specs[0].loop, specs[0].round
    pending = run.pending(loop, round_)
    earlier = {p.name.removesuffix(".json"): p for p in pending.glob("*.json")}
    rows = {rid: trace.loads(p.read_bytes()) for rid, p in earlier.items() if rid not in finished} | finished
    missing = [s.rollout_id for s in specs if s.rollout_id not in rows]
    if missing:
        raise RuntimeError(f"wave {loop} round {round_}: rollouts {missing} have no row after the wave")
    flagged = anomaly.flag_wave([rows[s.rollout_id] for s in specs], budget_s=cfg.env.budget_s, calibration=calibration)
    out = run.traces(loop, round_)
    atomic.write_parquet(out, trace.to_table(flagged, validated=True))  # each row was, before it was written
    shutil.rmtree(pending, ignore_errors=True)
    scores = aggregate.outcomes(flagged) | aggregate.controls(flagged)
    events.emit("wave_finished", loop=loop, round=round_, n=scores["n"], success_rate=scores["success_rate"],
                best_val_bpb=scores["best_val_bpb"], mean_val_bpb=scores["mean_val_bpb"],
                control_n=scores["control_n"], control_mean_val_bpb=scores["control_mean_val_bpb"])
    return out
