"""One researcher server per line of weights: V0 (shared by round 1, CTRL, FLOOR and probes) and
one per gold loop, swapped to V_{n+1} after each merge and health-checked before a wave uses it.

Each server runs on its own GPUs and port from the placement plan (rfs.placement). A gold loop's
server is stopped when the loop finishes, and V0's once no loop can ask for it any more (v0_needed),
so a server holds its GPUs only while someone uses it; exit stops whatever is left."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import anyio

from rfs.agent.client import ResearcherClient
from rfs.config import Config
from rfs.events import EventLog
from rfs.hosts import HostsFile
from rfs.loop.state import LoopState
from rfs.placement import V0, Placement, place
from rfs.rundir import RunDir
from rfs.serve import make_server
from rfs.setup import weights_sha256

__all__ = ["V0", "Served", "Servers", "v0_needed"]


def v0_needed(loops: Iterable[LoopState]) -> bool:
    """Whether any loop may still ask for V0's server: a baseline (CTRL, FLOOR) every round it has
    left, a gold loop until its round 1 is done (the shared round 1, V0's probes before it, and V0's
    behaviour samples after its first fit). A loop not yet started counts, as it is still "running"."""
    return any(st.status == "running" and (st.kind != "gold" or st.round < 1) for st in loops)


@dataclass
class Served:
    version: int
    model_id: str
    weights_sha256: str
    server: Any
    client: Any


class Servers:
    def __init__(self, cfg: Config, hosts: HostsFile, run: RunDir, events: EventLog, v0: Path | None,
                 placement: Placement | None = None):
        self.cfg, self.hosts, self.run, self.events, self.v0 = cfg, hosts, run, events, v0
        self.placement = placement or place(cfg, hosts)
        self._served: dict[str, Served] = {}
        self._locks: dict[str, anyio.Lock] = {}

    async def __aenter__(self) -> "Servers":
        return self

    async def __aexit__(self, *exc: object) -> None:
        for s in self._served.values():
            await s.client.aclose()
            await s.server.stop()

    def model_dir(self, key: str, version: int) -> Path | None:
        return self.v0 if key == V0 or version == 0 else self.run.model(key, version)

    async def serve(self, key: str, version: int) -> Served:
        """The server for `key` serving `version`, (re)started and healthy."""
        async with self._locks.setdefault(key, anyio.Lock()):
            # an external server names its own model; ours serve each version under its own id
            external = self.cfg.researcher.backend == "external"
            model_id = self.cfg.researcher.model if external else f"{key}/v{version}"
            current = self._served.get(key)
            if current and (external or current.version == version) and await current.server.health():
                return current
            model_dir = self.model_dir(key, version)
            # an external server's weights are not ours to vouch for: the row says so with ""
            sha = "" if external or model_dir is None else await anyio.to_thread.run_sync(weights_sha256, model_dir)
            self.events.emit("phase", loop=key, round=version + 1, phase="swap", version=model_id)
            if current:
                await current.server.restart(model_dir, model_id)
                server = current.server
                await current.client.aclose()
            else:
                log = self.run.logs / f"server-{key}.log"
                place = None if external else self.placement.server(key)
                server = make_server(self.cfg.researcher, self.hosts, model_dir, model_id, log, self.events,
                                     gpus=place.gpus if place else None, port=place.port if place else 0)
                await server.start()
            client = ResearcherClient(server.base_url, model_id, self.cfg.researcher, model_dir=model_dir,
                                      enforced=server.enforces_schema)
            self._served[key] = Served(version, model_id, sha, server, client)
            return self._served[key]

    async def revive(self, key: str) -> None:
        """Restart the server for `key` on the weights it had, if it died; a no-op when healthy.

        Many rollouts find a dead server at once; the first restarts it, the others see it healthy.
        """
        async with self._locks[key]:
            served = self._served[key]
            if await served.server.health():
                return
            await served.server.restart(self.model_dir(key, served.version), served.model_id)

    async def release_v0_unless_needed(self, loops: Iterable[LoopState]) -> None:
        """Stop V0's server once no loop needs it (a no-op while one may, or when it is not up).

        Only a saving: a later serve(V0) (a resumed probe that failed before) starts it again."""
        if V0 in self._served and not v0_needed(loops):
            self.events.emit("scheduler", decision="release server", loop=V0, reason="no loop needs V0 any more")
            await self.release(V0)

    async def release(self, key: str) -> None:
        """Stop the server for `key`: no loop needs it any more, and its GPUs go back."""
        async with self._locks.setdefault(key, anyio.Lock()):
            served = self._served.pop(key, None)
            if served is not None:
                await served.client.aclose()
                await served.server.stop()
