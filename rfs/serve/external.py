"""A researcher someone else runs: rfs only checks it answers and never starts or stops it."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from rfs.events import EventLog
from rfs.serve.base import ServerError


class ExternalServer:
    backend = "external"
    enforces_schema = False  # unknown service: the agent validates every action itself

    def __init__(self, base_url: str, model_id: str, api_key_env: str = "OPENAI_API_KEY",
                 events: EventLog | None = None):
        self.base_url, self.model_id, self.events = base_url.rstrip("/"), model_id, events
        self.api_key = os.environ.get(api_key_env, "")

    async def start(self) -> None:
        if not await self.health():
            raise ServerError(f"external researcher at {self.base_url} does not answer GET /models; "
                              "start it, or fix researcher.base_url")
        self._emit("server_started")

    async def health(self) -> bool:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            async with httpx.AsyncClient(timeout=10.0) as client:
                return (await client.get(f"{self.base_url}/models", headers=headers)).status_code == 200
        except httpx.HTTPError:
            return False

    async def stop(self) -> None:
        self._emit("server_stopped")

    async def restart(self, model_dir: Path, model_id: str) -> None:
        # An external service cannot load our weights; only the name the agent asks for changes.
        self.model_id = model_id
        if not await self.health():
            raise ServerError(f"external researcher at {self.base_url} does not answer GET /models; "
                              "start it, or fix researcher.base_url")
        self._emit("server_restarted")

    def _emit(self, kind: str) -> None:
        if self.events is not None:
            self.events.emit(kind, version=self.model_id, base_url=self.base_url, backend=self.backend)
