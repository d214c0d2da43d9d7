"""The scheduler: which loops run, in what order and how many at once, and when each one stops."""

from __future__ import annotations

import anyio

from rfs.loop import evals
from rfs.loop.experiment import Experiment
from rfs.loop.plan import LoopSpec
from rfs.loop.round import play
from rfs.loop.state import LoopState


async def schedule(ex: Experiment, loops: list[LoopSpec]) -> None:
    """Run loops in priority order, `loop.max_concurrent` at a time, sharing one slot pool.

    Concurrent loops keep the slots full: while one loop fits its LoRA (no slot needed), another's
    wave runs. Each start and finish is a `scheduler` event.
    """
    limit = anyio.Semaphore(max(1, ex.cfg.loop.max_concurrent))

    async def one(loop: LoopSpec) -> None:
        async with limit:
            ex.events.emit("scheduler", decision="start", loop=loop.name)
            await run_loop(ex, loop)
            if loop.trains:  # its V_n server has no other user: stopped, its GPUs go back
                await ex.servers.release(loop.name)
            await ex.servers.release_v0_unless_needed(ex.state.loops.values())
            ex.events.emit("scheduler", decision="finish", loop=loop.name, status=ex.state.loops[loop.name].status)

    async with anyio.create_task_group() as tg:
        for loop in loops:
            tg.start_soon(one, loop)


async def run_loop(ex: Experiment, loop: LoopSpec) -> None:
    """The loop's rounds until it stops, with its held-out probes (gold loops)."""
    st = ex.state.loops[loop.name]
    probing = loop.trains and ex.cfg.loop.eval_every > 0
    if probing:
        await evals.evaluate(ex, loop, 0)  # V0 once, shared by every loop: the verdict's baseline
    while st.status == "running":
        if reason := stop_reason(ex, st, loop):
            st.status, st.reason = "done", reason
            ex.save()
            break
        r = st.round + 1
        version = await play(ex, loop, r)
        if probing and version == r and evals.due(ex, r):  # before the state moves on, so a kill resumes the probes
            await evals.evaluate(ex, loop, r)
        st.round, st.version = r, version
        ex.save()
        await ex.servers.release_v0_unless_needed(ex.state.loops.values())  # a gold loop past round 1
    if probing and st.version:
        await evals.evaluate(ex, loop, st.version)  # the last version, whatever its number
    ex.events.emit("phase", loop=loop.name, round=st.round, phase=st.status, reason=st.reason)


def stop_reason(ex: Experiment, st: LoopState, loop: LoopSpec) -> str:
    """Why the loop stops before its next round: its round cap, the budget, or a plateau; "" if not."""
    e = ex.cfg.experiment
    cap = ex.cfg.loop.floor_waves if loop.kind == "floor" else e.max_rounds
    if cap and st.round >= cap:
        return f"reached {cap} rounds"
    if ex.over_budget():
        return f"budget of {e.budget_hours} h spent"
    if not loop.trains and (why := arms_stopped(ex, st, loop)):
        return why
    if loop.trains and e.plateau_rounds and len(st.history) > e.plateau_rounds:
        recent = min(h.best_val_bpb for h in st.history[-e.plateau_rounds:])
        earlier = min(h.best_val_bpb for h in st.history[: -e.plateau_rounds])
        if not recent < earlier:
            return f"plateau: no new best in {e.plateau_rounds} rounds"
    return ""


def arms_stopped(ex: Experiment, st: LoopState, loop: LoopSpec) -> str:
    """A baseline stops only when its arms stop: once every gold loop of its arc and replicate has
    stopped and the baseline has played as many rounds as the furthest of them ("" until then)."""
    arms = [a for a in ex.state.loops.values() if a.kind == "gold" and a.arc == loop.arc and a.replicate == loop.replicate]
    if not arms or any(a.status == "running" for a in arms):
        return ""
    furthest = max(a.round for a in arms)
    return f"its arms stopped at round {furthest}" if st.round >= furthest else ""
