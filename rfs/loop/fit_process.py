"""Each fit in a process of its own.

A fit loads models, builds an optimizer and frees them; in the controller's process the allocator
kept what they used, and the embedded default's controller grew to 20.7 GB resident over three
fits and was killed by the kernel's OOM killer. A child process gives everything back when it ends.
The child dies with the controller (PR_SET_PDEATHSIG), so a killed controller never leaves a fit
writing a version its resumed successor is also writing.

The device is the placement's (rfs.placement: "cuda:N" from hosts.toml train.gpus). The child
sees only the placed GPUs (CUDA_VISIBLE_DEVICES, set before torch loads), so the fit, its memory
check and a multi-GPU device map all count from the placed GPUs and cannot reach a server's. It
records what it was given and checks those GPUs exist before loading anything: a GPU index this
host does not have would otherwise surface as a CUDA error deep in the fit.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import anyio

from rfs.config import ConsolidateCfg
from rfs.errors import RfsError
from rfs.events import EventLog
from rfs.rundir import RunDir

PR_SET_PDEATHSIG = 1


class FitFailed(RfsError):
    """The fit's process failed: its error and where its log is."""


@dataclass(frozen=True)
class FitJob:
    run: RunDir
    loop: str
    round: int
    parent: Path
    v0: Path
    cfg: ConsolidateCfg
    noise: dict[str, Any]
    device: str
    seed: int
    echo: bool  # plain progress lines on the controller's stdout (no TUI): the child prints its own
    gpus: tuple[int, ...] = ()  # the placement's fit GPUs; () for the CPU or an unplaced "cuda"

    @property
    def log(self) -> Path:
        return self.run.logs / f"fit-{self.loop}-r{self.round}.log"


def _child(job: FitJob, conn: Connection) -> None:
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if not job.echo:  # under the TUI the terminal is the TUI's: the fit's own lines go to its log
        job.log.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(job.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    events = EventLog(job.run.events, echo=job.echo)
    device = job.device
    if job.gpus:  # before torch: the child's cuda:0 … are the placed GPUs, and only they
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, job.gpus))
        device = "cuda:0"
    events.emit("fit_started", loop=job.loop, round=job.round, device=job.device, pid=os.getpid(),
                cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    try:
        _device_present(job.device, device, len(job.gpus) or 1)
        from rfs.consolidate import consolidate  # the train extra (torch, transformers): the child's alone

        out = consolidate(job.run, job.loop, job.round, job.parent, job.v0, job.cfg, job.noise, events,
                          device=device, seed=job.seed)
        conn.send(("ok", str(out)))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}".splitlines()[0], isinstance(exc, RfsError),
                   traceback.format_exc()))
    finally:
        events.close()


def _device_present(placed: str, device: str, gpus: int) -> None:
    """Raise FitFailed unless this process sees the `gpus` CUDA devices from `device` on ("cpu" and
    "auto" pass); `placed` is what hosts.toml named, for the message."""
    if not device.startswith("cuda"):
        return
    import torch  # the train extra, imported in the fit's child only

    index = int(device.partition(":")[2] or 0)
    seen = torch.cuda.device_count()
    if index + gpus > seen:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise FitFailed(f"the fit is placed on {placed} (hosts.toml train.gpus), but this host shows {seen} CUDA "
                        f"device(s){f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}; "
                        "name a GPU it has in train.gpus")


def _receive(conn: Connection) -> tuple[Any, ...]:
    try:
        return conn.recv()
    except EOFError:  # the child died without a word (killed, out of memory)
        return ("died",)


async def fit(job: FitJob) -> Path:
    """Run the fit in a fresh process and return the version it published."""
    ctx = mp.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(job, sender), name=f"rfs-fit-{job.loop}-r{job.round}")
    child.start()  # on the event loop's thread, which lives as long as the run (the death signal's parent)
    sender.close()
    reply: tuple[Any, ...] = ()
    try:
        reply = await anyio.to_thread.run_sync(_receive, receiver, abandon_on_cancel=True)
    finally:
        if not reply and child.is_alive():  # cancelled (Ctrl-C, SIGTERM): the fit stops with the run
            child.kill()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(child.join)
        receiver.close()
    if reply[0] == "ok":
        return Path(reply[1])
    where = f"its log: {job.log}" if not job.echo else "its output is above"
    if reply[0] == "died":
        raise FitFailed(f"{job.loop} round {job.round}: the fit's process died (exit {child.exitcode}; "
                        f"out of memory?); {where}; `python rfs.py resume` refits the round")
    _, message, expected, trace = reply
    if expected:
        raise FitFailed(f"{job.loop} round {job.round}: {message}")
    raise RuntimeError(f"{job.loop} round {job.round}: the fit failed:\n{trace}")
