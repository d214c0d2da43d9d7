"""rfs.agent.connection over real loopback sockets: a raw HTTP/1.1 server (below) plays each case
a researcher server can put a connection in: kept alive, closed while idle, `Connection: close`,
chunked, cut short, garbage, silent."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable

import anyio
import httpx
import pytest

from rfs.agent.client import ResearcherClient, ServerDown
from rfs.agent.connection import Connection
from rfs.config import ResearcherCfg


class RawServer:
    """Accepts connections on loopback; `handle(conn, i)` serves the i-th one in its own thread."""

    def __init__(self, handle: Callable[[socket.socket, int], None]):
        self.handle, self.accepted = handle, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1/x"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._one, args=(conn, self.accepted), daemon=True).start()

    def _one(self, conn: socket.socket, i: int) -> None:
        with conn:
            try:
                self.handle(conn, i)
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() above
        except OSError:
            pass
        self.sock.close()


def read_request(conn: socket.socket) -> bytes:
    """One request's body (b"" once the client closed the connection)."""
    data = b""
    while b"\r\n\r\n" not in data:
        if not (chunk := conn.recv(65536)):
            return b""
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += conn.recv(65536)
    return body


def reply(payload: dict, *headers: str) -> bytes:
    body = json.dumps(payload).encode()
    head = "".join(f"{h}\r\n" for h in ("HTTP/1.1 200 OK", "Content-Type: application/json", f"Content-Length: {len(body)}", *headers))
    return head.encode() + b"\r\n" + body


def echo(conn: socket.socket, i: int) -> None:
    """Answers every request on the connection with its body and the connection's number."""
    while body := read_request(conn):
        conn.sendall(reply({"conn": i, "got": json.loads(body)}))


async def post(connection: Connection, url: str, n: int) -> dict:
    resp = await connection.handle_async_request(httpx.Request("POST", url, json={"n": n}))
    return json.loads(await resp.aread())


def posts(connection: Connection, url: str, *ns: int, pause: float = 0.0) -> list:
    """Requests one after another in one event loop (a connection belongs to one loop); between
    them, `pause` seconds of idleness."""

    async def go():
        out = []
        for n in ns:
            out.append(await post(connection, url, n))
            await anyio.sleep(pause)
        return out

    return anyio.run(go)


@pytest.fixture
def served():
    """served(handle, timeout=…) -> (a RawServer, a Connection to use with it); servers close after the test."""
    servers: list[RawServer] = []

    def start(handle, *, timeout: float = 10.0) -> tuple[RawServer, Connection]:
        servers.append(server := RawServer(handle))
        return server, Connection(connect_timeout=5.0, timeout=timeout)

    yield start
    for server in servers:
        server.close()


def test_requests_share_one_kept_alive_connection(served):
    server, conn = served(echo)
    assert posts(conn, server.url, 0, 1, 2) == [{"conn": 1, "got": {"n": n}} for n in range(3)]
    assert server.accepted == 1


def test_a_connection_the_server_closed_while_idle_is_replaced(served):
    def answer_once(sock, i):  # as a server whose keep-alive timeout ran out
        sock.sendall(reply({"conn": i, "got": json.loads(read_request(sock))}))

    server, conn = served(answer_once)
    # the server's close arrives while the connection is idle
    assert posts(conn, server.url, 1, 2, pause=0.2) == [{"conn": 1, "got": {"n": 1}}, {"conn": 2, "got": {"n": 2}}]


def test_a_reply_with_connection_close_is_the_connections_last(served):
    def close_after(sock, i):
        read_request(sock)
        sock.sendall(reply({"conn": i}, "Connection: close"))
        time.sleep(1)  # the socket stays open: only the header says not to reuse it

    server, conn = served(close_after)
    assert posts(conn, server.url, 1, 2) == [{"conn": 1}, {"conn": 2}]


def test_a_chunked_reply_is_read_whole(served):
    def chunked(sock, i):
        read_request(sock)
        body = json.dumps({"text": "x" * 5000}).encode()
        parts = [body[:100], body[100:]]
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in parts:
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        sock.sendall(b"0\r\n\r\n")

    server, conn = served(chunked)
    assert posts(conn, server.url, 1) == [{"text": "x" * 5000}]


@pytest.mark.parametrize("answer", [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"cut", b"hello\r\n\r\n", b""])
def test_a_reply_cut_short_garbage_or_none_is_a_transport_error_and_the_next_request_reconnects(answer, served):
    def bad_then_good(sock, i):
        if i == 1:
            read_request(sock)
            sock.sendall(answer)
            return  # and close
        echo(sock, i)

    server, conn = served(bad_then_good)

    async def go():
        with pytest.raises(httpx.TransportError):
            await post(conn, server.url, 1)
        return await post(conn, server.url, 2)

    assert anyio.run(go) == {"conn": 2, "got": {"n": 2}}


def test_a_silent_server_times_out(served):
    server, conn = served(lambda sock, i: (read_request(sock), time.sleep(5)), timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        posts(conn, server.url, 1)
    assert time.monotonic() - t0 < 4


def test_nothing_listening_is_a_connect_error():
    with socket.socket() as sock:  # a port that was free a moment ago, where nothing listens
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/x"
    with pytest.raises(httpx.ConnectError):
        posts(Connection(connect_timeout=5.0, timeout=10.0), url, 1)


def test_a_request_cancelled_midway_leaves_no_reply_behind_for_the_next(served):
    def slow_first(sock, i):
        body = read_request(sock)
        if i == 1:
            time.sleep(0.5)  # the client gave up meanwhile; a reused connection would read this reply next
            sock.sendall(reply({"conn": i, "got": "stale"}))
        else:
            sock.sendall(reply({"conn": i, "got": json.loads(body)}))

    server, conn = served(slow_first)

    async def go():
        with anyio.move_on_after(0.1):
            await conn.handle_async_request(httpx.Request("POST", server.url, json={"n": 1}))
        return await post(conn, server.url, 2)

    assert anyio.run(go) == {"conn": 2, "got": {"n": 2}}


def test_the_client_uses_it_for_plain_http_and_httpx_for_tls_or_a_proxy(monkeypatch):
    assert isinstance(ResearcherClient("http://10.0.0.1:8000", "m", ResearcherCfg(backend="vllm"))._borrow(), Connection)
    tls = ResearcherClient("https://api.example.com", "m", ResearcherCfg(backend="external"))._borrow()
    assert isinstance(tls, httpx.AsyncHTTPTransport)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example.com:3128")
    proxied = ResearcherClient("http://api.example.com", "m", ResearcherCfg(backend="external"))._borrow()
    assert isinstance(proxied, httpx.AsyncHTTPTransport)


def test_garbage_from_the_researcher_server_is_server_down(served):
    def garbage(sock, i):
        read_request(sock)
        sock.sendall(b"\x00\xff not http at all\r\n\r\n")

    server, _ = served(garbage)
    client = ResearcherClient(server.url.removesuffix("/x"), "m", ResearcherCfg(backend="vllm"))

    async def go():
        async with client:
            await client.act([{"role": "user", "content": "go"}], {"type": "object"}, max_tokens=8, temperature=0.0, seed=1)

    with pytest.raises(ServerDown, match="ReadError"):
        anyio.run(go)
