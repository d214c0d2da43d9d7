"""The researcher client: one structured action per request, over httpx with keep-alive connections.

Every backend speaks OpenAI chat completions; they differ only in how a JSON schema is requested
and in how a reply is pre-filled (arm S conditions on an outcome stamp placed at the start of the
assistant reply). A client sends every request one way, prefill or not, so no line of an
experiment reaches the researcher by another path than the others (the prompt rendering and the
constrained decoding would differ, a confound beside the weights): llama.cpp with the model's
directory renders every prompt with the model's own template through /completions (its chat
endpoint cannot continue an assistant turn); every other client uses /chat/completions. A server that is down, slow or answering 5xx raises ServerDown: an
infrastructure failure, never the researcher's fault.
"""

from __future__ import annotations

import json
import math
import os
import re
import ssl
import urllib.request
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import httpx

from rfs.agent import prompts
from rfs.agent.connection import Connection
from rfs.config import ResearcherCfg
from rfs.errors import RfsError
from rfs.serve.base import response_format
from rfs.serve.llamacpp import N_CTX


class ServerDown(RfsError, RuntimeError):
    """The researcher server failed (connection, timeout, 5xx, malformed reply): infra_error."""


class ServerRejected(RuntimeError):
    """The server refused the request (4xx): a bug in the request, not in the researcher."""


class ContextOverflow(ServerRejected):
    """The chat no longer fits the served context window: the researcher's context overflow
    (trace status context_overflow), never an infrastructure failure to retry."""


@dataclass(frozen=True)
class Reply:
    text: str  # the generated text, without any prefill
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    enforced: bool  # the server constrained decoding to the schema


@cache
def _tls() -> ssl.SSLContext:
    """One TLS context per process: each one loads the CA bundle (~20 ms)."""
    return ssl.create_default_context()


def _env_proxy(url: str) -> str | None:
    """The proxy HTTP(S)_PROXY names for url, unless NO_PROXY exempts its host (the stdlib's rules)."""
    parsed = httpx.URL(url)
    if urllib.request.proxy_bypass(parsed.host):
        return None
    return urllib.request.getproxies().get(parsed.scheme)


def api_base(base_url: str) -> str:
    """The OpenAI base URL (…/v1), as rfs.serve reports it; a bare http://host:port gets /v1 added."""
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


class ResearcherClient:
    """One researcher server's client; share it between all rollouts of a wave.

    Each request borrows a single-connection httpx transport from an idle list (kept alive
    between requests) instead of sharing one client's big pool: httpcore rescans every pooled
    connection, with a syscall each, on every request it queues or finishes (httpcore 1.0.9),
    which at 48 concurrent rollouts cost more controller CPU than everything else in a wave, and
    grows as N**2. Requests go to the transport directly: a POST of JSON needs none of the
    client's auth, redirect and cookie machinery, a third of the controller's cost per turn.
    A plain-HTTP server reached without a proxy (rfs's own) gets rfs.agent.connection, lighter
    still; TLS or a proxy (an external API) gets httpx's own transport.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        cfg: ResearcherCfg,
        *,
        model_dir: Path | None = None,  # llama.cpp pre-fill renders the prompt with this dir's chat template
        enforced: bool | None = None,  # the server constrains decoding to the schema (default: not external)
    ):
        self.backend, self.model, self.model_dir = cfg.backend, model, model_dir
        # The one path of this client's every request: prompts rendered here, through /completions.
        self.rendered = cfg.backend == "llamacpp" and model_dir is not None
        self.enforced = cfg.backend != "external" if enforced is None else enforced
        self.base_url = api_base(base_url)
        key = os.environ.get(cfg.api_key_env, "") if cfg.backend == "external" else ""
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._timeout = httpx.Timeout(cfg.turn_timeout_s, connect=min(cfg.turn_timeout_s, 10.0))
        self._extensions = {"timeout": self._timeout.as_dict()}
        # rfs's own servers (vLLM, llama.cpp) are on the cluster's network, never behind the
        # proxy that HTTP(S)_PROXY names for the internet; only an external API goes through it.
        self._proxy = _env_proxy(self.base_url) if cfg.backend == "external" else None
        # Parsed once: httpx parses a URL string again for every request (a tenth of a turn's CPU).
        self._urls = {path: httpx.URL(self.base_url + path) for path in ("/chat/completions", "/completions")}
        self._plain = self._proxy is None and self._urls["/completions"].scheme == "http"
        self._idle: list[httpx.AsyncBaseTransport] = []
        self._open: list[httpx.AsyncBaseTransport] = []
        self.window = context_window(cfg)

    def _borrow(self) -> httpx.AsyncBaseTransport:
        if self._idle:
            return self._idle.pop()  # the most recently used: its connection is the likeliest alive
        if self._plain:
            transport: httpx.AsyncBaseTransport = Connection(connect_timeout=self._timeout.connect, timeout=self._timeout.read)
        else:
            transport = httpx.AsyncHTTPTransport(verify=_tls(), proxy=self._proxy,
                                                 limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
        self._open.append(transport)
        return transport

    async def aclose(self) -> None:
        for transport in self._open:
            await transport.aclose()
        self._open.clear()
        self._idle.clear()

    async def __aenter__(self) -> ResearcherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def act(
        self,
        messages: list[dict[str, str]],
        schema: dict[str, Any],
        *,
        max_tokens: int,
        temperature: float,
        seed: int,
        prefill: str = "",
    ) -> Reply:
        self.check_fits(messages, max_tokens, prefill)
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": temperature, "seed": seed}
        if self.rendered or (prefill and self.backend == "llamacpp"):  # the latter raises: no template to render with
            # llama-cpp-python's chat endpoint cannot continue an assistant turn, so rfs renders the
            # prompt with the model's own template and constrains the continuation by grammar.
            body |= {"prompt": prompts.render(self._tokenizer, messages, prefill), "grammar": _gbnf(schema)}
            data = await self._post("/completions", body)
            text = _field(data, lambda d: d["choices"][0]["text"])
        else:
            body |= {"messages": messages, "response_format": response_format(self.backend, schema)}
            if prefill:  # vLLM's continue-the-final-message extension (an external server needs it too)
                body |= {
                    "messages": [*messages, {"role": "assistant", "content": prefill}],
                    "continue_final_message": True,
                    "add_generation_prompt": False,
                }
            data = await self._post("/chat/completions", body)
            text = _field(data, lambda d: d["choices"][0]["message"]["content"] or "")
        usage = data.get("usage") or {}
        details = usage.get("completion_tokens_details") or {}
        return Reply(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            reasoning_tokens=int(details.get("reasoning_tokens") or 0),
            enforced=self.enforced,
        )

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = httpx.Request("POST", self._urls[path], json=body, headers=self._headers, extensions=self._extensions)
        transport = self._borrow()
        try:
            resp = await transport.handle_async_request(request)
            try:
                await resp.aread()
            finally:
                await resp.aclose()
        except httpx.TransportError as exc:  # connect, read timeout, dropped connection …
            raise ServerDown(f"researcher server {self.base_url}{path}: {type(exc).__name__}: {exc}") from exc
        finally:
            self._idle.append(transport)  # a broken connection is dropped and remade on next use
        if resp.status_code >= 500:
            raise ServerDown(f"researcher server {path}: HTTP {resp.status_code}: {resp.text[:300]}")
        if resp.status_code == 400 and _TOO_LONG.search(resp.text):
            raise ContextOverflow(f"researcher server refused {path}: the prompt is too long: {resp.text[:300]}")
        if resp.status_code >= 400:
            raise ServerRejected(f"researcher server refused {path}: HTTP {resp.status_code}: {resp.text[:300]}")
        try:
            data = resp.json()
        except ValueError:
            raise ServerDown(f"researcher server {path}: a reply that is not JSON: {resp.text[:200]!r}") from None
        if not isinstance(data, dict):
            raise ServerDown(f"researcher server {path}: a reply that is not a JSON object")
        return data

    def check_fits(self, messages: list[dict[str, str]], max_tokens: int, prefill: str = "") -> None:
        """Count the request before it is sent; raise ContextOverflow when prompt plus reply would
        pass the served window. Exact with the researcher's tokenizer (a model dir at hand), else
        the conservative CHARS_PER_TOKEN estimate; a server that counts longer still answers 400,
        which _post maps to ContextOverflow too."""
        if not self.window:
            return  # an external API's window is not known here: its 400 is the only signal
        if request_tokens(messages, prefill, None, upper=True) + max_tokens <= self.window:
            return  # fits even at one token per byte: no tokenizer needed (most turns)
        tokens = request_tokens(messages, prefill, self._tokenizer if self.model_dir else None)
        if tokens + max_tokens > self.window:
            raise ContextOverflow(
                f"the chat is ~{tokens} tokens; with max_tokens={max_tokens} it passes the served window of {self.window}"
            )

    @cached_property
    def _tokenizer(self) -> Any:
        if not self.model_dir:
            raise ValueError("a pre-filled llama.cpp reply needs model_dir (the local model dir with its chat template)")
        from transformers import AutoTokenizer  # train extra; only the pre-fill path needs it

        return AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)


# What a server says when a prompt does not fit: vLLM ("maximum context length", "longer than the
# maximum model length"), llama-cpp-python ("exceed context window"), OpenAI ("context_length_exceeded").
_TOO_LONG = re.compile(r"context length|context window|maximum model length|context_length_exceeded", re.I)

# Without the researcher's tokenizer the count errs long: BPE vocabularies give ~3.5-4 characters
# per token on code and English, so 2.5 over-counts; the template adds a few tokens per message.
CHARS_PER_TOKEN = 2.5
TEMPLATE_TOKENS_PER_MESSAGE = 8


def context_window(cfg: ResearcherCfg) -> int:
    """The served context window in tokens (prompt plus reply); 0 when rfs does not serve it."""
    return {"vllm": cfg.vllm.max_model_len, "llamacpp": N_CTX}.get(cfg.backend, 0)


def request_tokens(messages: list[dict[str, str]], prefill: str, tokenizer: Any, *, upper: bool = False) -> int:
    """The prompt's tokens: counted by `tokenizer` in the model's chat template; else estimated
    from characters; with upper=True a hard bound (a byte-level token holds at least one byte)."""
    overhead = TEMPLATE_TOKENS_PER_MESSAGE * (len(messages) + 1)
    texts = [m["content"] for m in messages] + [prefill]
    if upper:
        return sum(len(t.encode()) for t in texts) + overhead
    if tokenizer is None:
        return math.ceil(sum(len(t) for t in texts) / CHARS_PER_TOKEN) + overhead
    return len(tokenizer(prompts.render(tokenizer, messages, prefill), add_special_tokens=False)["input_ids"])


def _field(data: dict[str, Any], get: Any) -> str:
    try:
        text = get(data)
    except (KeyError, IndexError, TypeError):
        raise ServerDown(f"researcher server: a reply without choices: {json.dumps(data)[:200]}") from None
    if not isinstance(text, str):
        raise ServerDown("researcher server: a reply whose text is not a string")
    return text


def _gbnf(schema: dict[str, Any]) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf  # serve extra; only llama.cpp pre-fill needs it

    return json_schema_to_gbnf(json.dumps(schema))
