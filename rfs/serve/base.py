"""What every researcher server offers the agent: an OpenAI base URL, a model id, a lifecycle."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Protocol

from rfs.errors import RfsError


class ServerError(RfsError, RuntimeError):
    """The server failed to come up or to swap weights; the message carries its log's last line."""


class Server(Protocol):
    base_url: str  # http://127.0.0.1:PORT/v1
    model_id: str  # the served model name = the version id, e.g. "A-S/v1"
    enforces_schema: bool  # True when response_format is enforced by constrained decoding

    async def start(self) -> None: ...
    async def health(self) -> bool: ...
    async def stop(self) -> None: ...
    async def restart(self, model_dir: Path, model_id: str) -> None: ...


def response_format(backend: str, schema: dict[str, Any]) -> dict[str, Any]:
    """The `response_format` request field that makes `backend` enforce `schema`.

    llama.cpp compiles {"type": "json_object", "schema": ...} to a grammar; it is reliable only
    when objects say additionalProperties: false and string patterns hold no control characters.
    vLLM (>= 0.12) and OpenAI-compatible services take the structured-outputs form.
    """
    if backend == "llamacpp":
        return {"type": "json_object", "schema": schema}
    if backend in ("vllm", "external"):
        return {"type": "json_schema", "json_schema": {"name": "action", "schema": schema, "strict": True}}
    raise ValueError(f"backend {backend!r}: expected llamacpp, vllm or external")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def last_log_line(path: Path, chars: int = 3000) -> str:
    """The log's last non-empty line: a failed server's usual last word is its reason."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - chars))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "(no log)"
    return lines[-1].strip() if lines else "(empty log)"
