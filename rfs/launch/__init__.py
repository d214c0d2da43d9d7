"""Launchers: start one training run on a slot, stream its output, enforce the hard timeout,
kill the whole process tree, and report what happened. One interface, three ways to reach a slot.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

import anyio

from rfs.hosts import HostsFile, Slot
from rfs.launch.base import Job, JobOutcome, Launcher
from rfs.launch.local import LocalLauncher
from rfs.launch.local import reclaim as reclaim_local
from rfs.launch.slurm import SlurmLauncher, shared_allocation

CLOSE_TIMEOUT_S = 60.0  # scancel and ssh disconnects each bound themselves; this bounds them all


def launcher_for(slot: Slot, hosts: HostsFile, wave: str = "") -> Launcher:
    if slot.launcher == "local":
        return LocalLauncher(wave=wave)
    if slot.launcher == "ssh":
        from rfs.launch.ssh import SshLauncher  # lazy: asyncssh, which a local-only user need not install

        return SshLauncher(hosts.hosts[slot.host], wave)
    # every wave's steps run in the experiment's one allocation: concurrent waves never queue for two
    return SlurmLauncher(hosts.slurm, wave=wave, allocation=shared_allocation(hosts.slurm))


async def reclaim(slots: list[Slot], hosts: HostsFile, wave: str) -> list[str]:
    """Stop what a killed controller of this wave left running on its local and SLURM slots, before
    the wave starts anew; say what that was. An ssh job's own watchdog ends it with its session, and
    the wave's ssh launchers remove its working folders when they first connect."""
    found = []
    if any(s.launcher == "local" for s in slots):
        if n := await reclaim_local(wave):
            found.append(f"{n} local process(es) killed")
    if slurm := [s for s in slots if s.launcher == "slurm"]:
        if ids := await launcher_for(slurm[0], hosts, wave).reclaim():
            found.append(f"SLURM allocation(s) {' '.join(ids)} cancelled")
    return found


def _shared_by(slot: Slot) -> tuple[str, str]:
    # ssh launchers pool connections per host; SLURM runs every slot as a step of one allocation
    return slot.launcher, slot.host if slot.launcher == "ssh" else ""


@asynccontextmanager
async def wave_launchers(slots: list[Slot], hosts: HostsFile, wave: str = "") -> AsyncIterator[Callable[[Slot], Launcher]]:
    """Launchers shared across a wave's slots: `async with wave_launchers(slots, hosts) as launcher_of:`.

    One local launcher, one ssh launcher per host (it pools connections), one SLURM launcher that
    joins the experiment's one allocation, sized to the slurm slots, on entry (made, waiting in the
    queue up to hosts.slurm.queue_wait_s, if no concurrent wave holds it), so each run is an `srun`
    step in it. On exit, also on error or cancellation, the last wave out cancels the allocation and
    the ssh connections close; a failure to release
    one is raised once all were tried, since a leaked allocation holds the cluster's nodes.
    """
    shared: dict[tuple[str, str], Launcher] = {}
    releases: list[Callable[[], Awaitable[None]]] = []  # the local launcher holds nothing to release

    def launcher_of(slot: Slot) -> Launcher:
        key = _shared_by(slot)
        if key not in shared:
            shared[key] = launcher = launcher_for(slot, hosts, wave)
            if slot.launcher != "local":
                releases.append(launcher.aclose if slot.launcher == "ssh" else launcher.close)
        return shared[key]

    try:
        if slurm := [s for s in slots if s.launcher == "slurm"]:
            cpus = max(max(1, len(s.cpus)) for s in slurm)
            gpus = int(any(s.gpu >= 0 for s in slurm))
            await launcher_of(slurm[0]).open(len(slurm), cpus, gpus, hosts.slurm.queue_wait_s)
        yield launcher_of
    finally:
        with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await _release(releases)


async def _release(releases: list[Callable[[], Awaitable[None]]]) -> None:
    errors = []
    for release in releases:
        try:
            await release()
        except Exception as exc:  # release the others first
            errors.append(exc)
    if errors:
        raise errors[0]


__all__ = ["Job", "JobOutcome", "Launcher", "launcher_for", "reclaim", "wave_launchers"]
