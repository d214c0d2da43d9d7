"""Placement: one explicit plan of which GPUs serve which researcher version, which fit LoRA and
which run the slots' jobs, decided once at start, printed, and recorded in the run directory.

vLLM refuses to start on a GPU that lacks `gpu_memory_utilization` of its memory free, and a 7B
LoRA fit peaks near 47 GiB, so two of them on one GPU at once is never a slowdown but a failure
hours into a run. The plan is where that is caught: any GPU named twice is a ConfigError naming
both users, before a single server or job starts.

GPUs are counted per host. The controller's host ("localhost") holds the servers, the fit and
local slots; an ssh slot's GPU is on its [hosts.<name>]; a SLURM slot's GPU is chosen by SLURM
(gres) inside the allocation, which never hands out a GPU another job (the controller's own
included) holds, so SLURM slots never clash with anything here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rfs import atomic
from rfs.config import Config, ConfigError
from rfs.events import EventLog
from rfs.hosts import HostsFile, Slot, slots
from rfs.loop.plan import plan
from rfs.rundir import RunDir
from rfs.serve.base import free_port

V0 = "v0"  # the server key of the frozen V0 (round 1, CTRL, FLOOR, probes); gold loops use their names
LOCAL = "localhost"


@dataclass(frozen=True)
class ServerPlace:
    key: str  # V0 or a gold loop's name
    gpus: tuple[int, ...]  # on the controller's host; () for a CPU server
    port: int


@dataclass(frozen=True)
class SlotPlace:
    name: str
    host: str  # LOCAL, an ssh host's name, or "slurm" (SLURM picks the GPU)
    gpu: int  # -1: CPU, or chosen by SLURM


@dataclass(frozen=True)
class Placement:
    servers: tuple[ServerPlace, ...]
    fit_gpus: tuple[int, ...]  # on the controller's host
    fit_device: str  # what the LoRA fit is given: "cuda:<gpu>" when placed, else hosts.train.device
    slots: tuple[SlotPlace, ...]

    def server(self, key: str) -> ServerPlace:
        for s in self.servers:
            if s.key == key:
                return s
        raise KeyError(key)

    def lines(self) -> list[str]:
        """The plan as people read it, one line per GPU user."""
        gpus = lambda g: ",".join(map(str, g)) if g else "cpu"  # noqa: E731
        out = [f"server {s.key:6s} {LOCAL} gpus {gpus(s.gpus)} port {s.port}" for s in self.servers]
        out.append(f"fit    LoRA   {LOCAL} gpus {gpus(self.fit_gpus)} device {self.fit_device}")
        for s in self.slots:
            where = "chosen by SLURM" if s.host == "slurm" and s.gpu >= 0 else gpus((s.gpu,) if s.gpu >= 0 else ())
            out.append(f"slot   {s.name} {s.host} gpus {where}")
        return out

    def to_json(self) -> dict:
        return asdict(self)


def server_keys(cfg: Config) -> list[str]:
    """V0 first, then a server per gold loop (its V_n from round 2), in scheduling order."""
    return [V0] + [loop.name for loop in plan(cfg) if loop.trains]


def place(cfg: Config, hosts: HostsFile) -> Placement:
    """The experiment's placement; a ConfigError names any GPU given to two users."""
    keys = server_keys(cfg) if cfg.researcher.backend != "external" else []
    servers = _servers(cfg, hosts, keys)
    fit_gpus, fit_device = _fit(hosts, cfg.consolidate.devices)
    placed = tuple(_slot(s) for s in slots(hosts))
    _no_clash(servers, fit_gpus, placed)
    return Placement(servers, fit_gpus, fit_device, placed)


def _servers(cfg: Config, hosts: HostsFile, keys: list[str]) -> tuple[ServerPlace, ...]:
    """Each server takes its own `tensor_parallel` GPUs from hosts' [server] gpus, in key order."""
    pool, tp = hosts.server.gpus, cfg.researcher.vllm.tensor_parallel
    on_gpu = cfg.researcher.backend == "vllm" and bool(pool)
    if on_gpu and len(pool) < tp * len(keys):
        raise ConfigError(
            f"hosts.toml: server.gpus: {len(pool)} GPUs {list(pool)} cannot hold {len(keys)} servers "
            f"({', '.join(keys)}) of researcher.vllm.tensor_parallel = {tp} each; name {tp * len(keys)} "
            "GPUs, or run fewer arms")
    ports = _ports(hosts.server.port, len(keys))
    return tuple(ServerPlace(k, tuple(pool[i * tp:(i + 1) * tp]) if on_gpu else (), ports[i])
                 for i, k in enumerate(keys))


def _ports(base: int, n: int) -> list[int]:
    """Consecutive from [server] port when it is set, else free ones; distinct either way."""
    if base:
        return [base + i for i in range(n)]
    out: list[int] = []
    while len(out) < n:
        p = free_port()
        if p not in out:
            out.append(p)
    return out


def _fit(hosts: HostsFile, devices: int) -> tuple[tuple[int, ...], str]:
    """The fit's GPUs (one per consolidate.devices: the 32B fit spreads over several) and the device
    it is named by, its first GPU's."""
    gpus, device = hosts.train.gpus, hosts.train.device
    if not gpus:
        return (), device
    if len(gpus) != devices:
        raise ConfigError(f"hosts.toml: train.gpus = {list(gpus)} for consolidate.devices = {devices}; "
                          "name one GPU per device the fit spreads over")
    if device not in ("auto", "cuda"):
        raise ConfigError(f"hosts.toml: train.gpus = {list(gpus)} with train.device = {device!r}; "
                          "set device to cuda (or auto), or drop gpus")
    return gpus, f"cuda:{gpus[0]}"


def _slot(s: Slot) -> SlotPlace:
    host = {"local": LOCAL, "slurm": "slurm"}.get(s.launcher, s.host)
    return SlotPlace(s.name, host, s.gpu)


def _no_clash(servers: tuple[ServerPlace, ...], fit_gpus: tuple[int, ...], placed: tuple[SlotPlace, ...]) -> None:
    users: dict[tuple[str, int], str] = {}

    def take(host: str, gpu: int, who: str) -> None:
        if (host, gpu) in users:
            raise ConfigError(f"hosts.toml: GPU {gpu} on {host} is given to both {users[host, gpu]} and {who}; "
                              "give each server, the fit and each slot its own GPUs")
        users[host, gpu] = who

    for s in servers:
        for g in s.gpus:
            take(LOCAL, g, f"the {s.key} server")
    for g in fit_gpus:
        take(LOCAL, g, "the LoRA fit (train.gpus)")
    for s in placed:
        if s.gpu >= 0 and s.host != "slurm":
            take(s.host, s.gpu, f"slot {s.name}")


def announce_placement(run: RunDir, placement: Placement, events: EventLog) -> None:
    """Print the plan, record it in the run directory, and log it as one event."""
    print("placement:", *placement.lines(), sep="\n  ", flush=True)
    atomic.write_json(run.placement, placement.to_json())
    events.emit("placement", path=str(run.placement), plan="; ".join(placement.lines()))
