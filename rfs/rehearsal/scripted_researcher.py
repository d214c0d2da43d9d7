"""TEST DOUBLE: the scripted researcher (tests, benchmarks and `rfs rehearse`), an OpenAI-compatible HTTP server on loopback.

It stands in for a served LLM in tests and benchmarks: it returns *planned* replies, one per
assistant turn, chosen by the request's `seed` (the agent sends rollout seed + turn). It speaks real HTTP (/v1/chat/completions,
/v1/completions, /v1/models, /health) with `usage`, records every request body, and can be killed
mid-rollout: a plan step of `DIE` drops the connection and stops the server.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

DIE = object()  # a plan step: drop the connection and stop serving (the server was killed)


@dataclass(frozen=True)
class Refuse:
    """A plan step: answer with an HTTP error, as a server refusing the request would."""

    status: int
    message: str


Step = str | dict | Refuse | Callable[[list[dict[str, Any]]], str] | object


def action(kind: str, thought: str = "", **fields: Any) -> str:
    return json.dumps({"thought": thought or f"I will {kind}.", "action": kind, **fields})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # a wave opens dozens of connections at once; the default backlog is 5

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client killed with its connections open: the kill tests do it on purpose
        super().handle_error(request, client_address)


class ScriptedResearcher:
    """plans: {rollout seed: [reply text | JSON-able dict | fn(messages) -> text | DIE, ...]}."""

    def __init__(self, plans: dict[int, list[Step]], model: str = "scripted", port: int = 0):
        self.plans, self.model = plans, model
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._killing = threading.Lock()
        self.dead = False  # set by kill(): in-flight handlers drop their connections too
        self._server = _Server(("127.0.0.1", port), self._handler())  # a port: a restart where it was
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> ScriptedResearcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def kill(self) -> None:
        """Stop serving and close the listening socket: later requests see connection refused.

        One kill at a time: a DIE step kills from a thread of its own while a test may kill too,
        and the second of two concurrent closes returns before the first has closed the socket."""
        with self._killing:
            self.dead = True
            if threading.current_thread() is self._thread or not self._thread.is_alive():
                self._server.server_close()
                return
            self._server.shutdown()
            self._server.server_close()

    def _next(self, body: dict[str, Any]) -> Step:
        """The plan step for this request. The agent sends seed = rollout seed + turn, so plan keys
        (rollout seeds) must be more than max_turns apart; the turn is the distance to the key."""
        with self._lock:
            self.requests.append(body)
        seed = int(body.get("seed", 0))
        key = max((k for k in self.plans if k <= seed), default=None)
        if key is None:
            return "no plan for this seed"
        plan, turn = self.plans[key], seed - key
        return plan[turn] if turn < len(plan) else action("finish", "Nothing more to do.")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes: with Nagle on, the body waits for the
            # client's delayed ACK (~40 ms a reply). Real servers (vLLM's uvicorn) send at once.
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _send(self, code: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/health":
                    return self._send(200, {"status": "ok"})
                if self.path == "/v1/models":
                    return self._send(200, {"object": "list", "data": [{"id": outer.model, "object": "model"}]})
                self._send(404, {"error": f"no route {self.path}"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                try:
                    body = json.loads(self.rfile.read(length))
                except ValueError:
                    return self._send(400, {"error": "body is not JSON"})
                if self.path not in ("/v1/chat/completions", "/v1/completions"):
                    return self._send(404, {"error": f"no route {self.path}"})
                step = DIE if outer.dead else outer._next(body)
                if step is DIE:
                    outer.dead = True
                    threading.Thread(target=outer.kill, daemon=True).start()
                    self.close_connection = True
                    self.connection.close()
                    return
                if isinstance(step, Refuse):
                    return self._send(step.status, {"object": "error", "message": step.message, "code": step.status})
                messages = body.get("messages") or [{"role": "user", "content": body.get("prompt", "")}]
                text = step(messages) if callable(step) else step if isinstance(step, str) else json.dumps(step)
                usage = {
                    "prompt_tokens": sum(len(m["content"]) for m in messages) // 4 + 1,
                    "completion_tokens": len(text) // 4 + 1,
                    "total_tokens": 0,
                }
                if self.path == "/v1/completions":
                    choice = {"index": 0, "text": text, "finish_reason": "stop"}
                else:
                    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                self._send(200, {"id": "scripted", "object": "chat.completion", "model": outer.model, "choices": [choice], "usage": usage})

        return Handler
