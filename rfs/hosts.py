"""hosts.toml: the slots that run training, where the researcher is served and where LoRA trains.

With no `[[slot]]` tables, slots are local: one per CPU core (or GPU) that the server does not use.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rfs import ROOT
from rfs.config import ConfigError, _build


@dataclass(frozen=True)
class HostCfg:
    address: str = "127.0.0.1"
    port: int = 22
    user: str = ""
    key: str = ""  # private key file; "" uses the ssh agent / default keys
    python: str = "python3"  # the interpreter on that host (with rfs[train] installed)
    root: str = ""  # the rfs checkout on that host
    known_hosts: str = ""  # "" disables host key checking (loopback and trusted clusters only)


@dataclass(frozen=True)
class SlurmCfg:
    partition: str = ""
    account: str = ""
    time_limit: str = "04:00:00"  # the wave allocation's limit
    queue_wait_s: float = 3600.0  # how long a wave waits in the queue for its allocation before failing
    extra_args: tuple[str, ...] = ()
    python: str = sys.executable
    root: str = str(ROOT)
    # The job shape of one slot in the experiment's one allocation (rfs.launch.slurm.Allocation).
    cpus_per_slot: int = 0  # 0: the slot's `cpus` count (at least 1)
    mem_per_cpu: str = ""  # SLURM's --mem-per-cpu, e.g. "8G" (a slot gets cpus × this); "": the partition's default
    pool: str = ""  # the allocation's job name; "": named after the run directory (one controller per run)


@dataclass(frozen=True)
class SlotCfg:
    name: str = ""
    launcher: str = "local"  # local | ssh | slurm
    host: str = "localhost"  # a [hosts.<name>] for ssh
    cpus: tuple[int, ...] = ()  # cores this slot's runs are pinned to
    gpu: int = -1  # CUDA device index; -1 for CPU
    # This table stands for `count` slots: copy k gets gpu + k and cpus shifted by k * len(cpus)
    # (SLURM picks its slots' devices itself), so 8 GPUs of a node are one table, not eight.
    count: int = 1
    # MB of host memory one job on this slot may use; 0: local slots share 3/4 of the machine's
    # memory equally, remote ones have no limit set here.
    memory_mb: int = 0


@dataclass(frozen=True)
class ServerCfg:
    cpus: tuple[int, ...] = (0,)  # cores the embedded researcher server is pinned to
    gpus: tuple[int, ...] = ()  # vLLM's devices: each server takes its own tensor_parallel of them (rfs.placement)
    port: int = 0  # the first server's port, the next ones follow; 0: free ports


@dataclass(frozen=True)
class TrainCfg:
    device: str = "auto"  # cpu | cuda | auto
    gpus: tuple[int, ...] = ()  # the controller host's GPU the LoRA fit runs on (rfs.placement)


@dataclass(frozen=True)
class HostsFile:
    server: ServerCfg = field(default_factory=ServerCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    slurm: SlurmCfg = field(default_factory=SlurmCfg)
    hosts: dict[str, HostCfg] = field(default_factory=dict)
    slot: tuple[SlotCfg, ...] = ()


@dataclass(frozen=True)
class Slot:
    """A resolved slot: everything a launcher needs to start one training run."""

    name: str
    launcher: str
    host: str
    cpus: tuple[int, ...]
    gpu: int
    python: str
    root: str
    memory_mb: int = 0  # host memory the job may use (0: not limited here); see SlotCfg.memory_mb


MACHINE_SHARE = 0.75  # of this machine's memory, split between its local slots; the rest: controller, server


def local_share_mb(n_slots: int) -> int:
    """Each of n local slots' equal share of this machine's memory, in MB."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(total * MACHINE_SHARE / max(1, n_slots)) >> 20


def load(path: Path | None = None) -> HostsFile:
    path = Path(path) if path else ROOT / "hosts.toml"
    where = f"{path}:"
    try:
        table: dict[str, Any] = tomllib.loads(path.read_text()) if path.exists() else {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    hosts = table.pop("hosts", {})
    if not isinstance(hosts, dict):
        raise ConfigError(f"{where} hosts: expected a table of [hosts.<name>] tables")
    cfg = _build(HostsFile, table, where)
    built = {name: _build(HostCfg, h, f"{where} hosts.{name}") for name, h in hosts.items()}
    cfg = HostsFile(cfg.server, cfg.train, cfg.slurm, built, cfg.slot)
    for i, s in enumerate(cfg.slot):
        if s.count < 1:
            raise ConfigError(f"{where} slot[{i}].count: expected 1 or more, got {s.count}")
        if s.launcher not in ("local", "ssh", "slurm"):
            raise ConfigError(f"{where} slot[{i}].launcher: expected local, ssh or slurm, got {s.launcher!r}")
        if s.launcher == "ssh" and s.host not in built:
            raise ConfigError(f"{where} slot[{i}].host: {s.host!r} has no [hosts.{s.host}] table")
    return cfg


def slots(cfg: HostsFile) -> list[Slot]:
    if not cfg.slot:
        cores = sorted(os.sched_getaffinity(0))
        free = [c for c in cores if c not in cfg.server.cpus] or cores
        share = local_share_mb(len(free))
        return [Slot(f"local-{c}", "local", "localhost", (c,), -1, sys.executable, str(ROOT), share) for c in free]
    tables = _expanded(cfg.slot)
    share = local_share_mb(sum(s.launcher == "local" for s in tables))
    out = []
    for i, s in enumerate(tables):
        name = s.name or f"{s.launcher}-{i}"
        if s.launcher == "ssh":
            h = cfg.hosts[s.host]
            out.append(Slot(name, "ssh", s.host, s.cpus, s.gpu, h.python, h.root or str(ROOT), s.memory_mb))
        elif s.launcher == "slurm":
            out.append(Slot(name, "slurm", s.host, s.cpus, s.gpu, cfg.slurm.python, cfg.slurm.root, s.memory_mb))
        else:
            out.append(Slot(name, "local", "localhost", s.cpus, s.gpu, sys.executable, str(ROOT), s.memory_mb or share))
    return out


def _expanded(tables: tuple[SlotCfg, ...]) -> list[SlotCfg]:
    """Each `count = n` table as its n slots, named `<name>-<k>` when the table names them."""
    out = []
    for t in tables:
        if t.count == 1:
            out.append(t)
            continue
        width = len(t.cpus)
        for k in range(t.count):
            gpu = t.gpu + k if t.gpu >= 0 and t.launcher != "slurm" else t.gpu
            cpus = tuple(c + k * width for c in t.cpus)
            out.append(replace(t, name=f"{t.name}-{k}" if t.name else "", gpu=gpu, cpus=cpus, count=1))
    return out


def pooled(cfg: HostsFile, run_root: Path) -> HostsFile:
    """`cfg` with its SLURM allocation named after the run directory, unless hosts.toml names it:
    a resumed controller then finds (and cancels) the one its killed predecessor left."""
    if cfg.slurm.pool:
        return cfg
    key = hashlib.sha256(str(Path(run_root).resolve()).encode()).hexdigest()[:12]
    return replace(cfg, slurm=replace(cfg.slurm, pool=key))
