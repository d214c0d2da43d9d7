"""One kept-alive HTTP/1.1 connection to a researcher server, as an httpx transport.

rfs's own servers (vLLM, llama.cpp) speak plain HTTP on the cluster's network. httpx's transport
(httpcore) brings what a JSON POST to them does not need, a cancel scope around every socket read
and write and the proxy and TLS layers, and at 48 rollouts that CPU lies on a wave's critical path
(bench/wave_overhead.py). This is h11, httpcore's own parser, over one anyio TCP stream, with one
deadline for the whole exchange. An external API (TLS, a proxy) keeps httpx's transport.
"""

from __future__ import annotations

import select
import socket

import anyio
import h11
import httpx
from anyio.abc import SocketAttribute, SocketStream


class Connection(httpx.AsyncBaseTransport):
    """One request at a time over one connection, opened on first use and again whenever the
    server closed it. A request that fails or is cancelled closes it: its state is unknown."""

    def __init__(self, *, connect_timeout: float, timeout: float):
        self.connect_timeout, self.timeout = connect_timeout, timeout
        self._stream: SocketStream | None = None
        self._sock: socket.socket | None = None
        self._h11: h11.Connection  # one per stream, made by _open

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            with anyio.fail_after(self.timeout):
                if self._stream is None or _closed_by_peer(self._sock):
                    await self._open(request.url)
                return await self._exchange(request)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            if isinstance(exc, TimeoutError):
                raise httpx.ReadTimeout(f"no whole reply within {self.timeout} s") from exc
            if isinstance(exc, (OSError, anyio.EndOfStream, anyio.BrokenResourceError, h11.RemoteProtocolError)):
                raise httpx.ReadError(f"{type(exc).__name__}: {exc}") from exc
            raise

    async def _open(self, url: httpx.URL) -> None:
        await self.aclose()
        try:
            with anyio.fail_after(self.connect_timeout):
                self._stream = await anyio.connect_tcp(url.host, url.port or 80)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {url.host}:{url.port} took over {self.connect_timeout} s") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"{url.host}:{url.port}: {exc}") from exc
        self._sock = self._stream.extra(SocketAttribute.raw_socket)
        self._h11 = h11.Connection(h11.CLIENT)

    async def _exchange(self, request: httpx.Request) -> httpx.Response:
        conn = self._h11
        data = conn.send(h11.Request(method=request.method, target=request.url.raw_path, headers=request.headers.raw))
        if request.content:
            data += conn.send(h11.Data(data=request.content))
        await self._stream.send(data + conn.send(h11.EndOfMessage()))
        head, body = None, []
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(await self._receive())
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.ConnectionClosed):
                raise anyio.EndOfStream("the server closed the connection without a reply")
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:  # the server said Connection: close
            await self.aclose()
        return httpx.Response(head.status_code, headers=list(head.headers), content=b"".join(body), request=request)

    async def _receive(self) -> bytes:
        try:
            return await self._stream.receive(1 << 16)
        except anyio.EndOfStream:
            return b""  # h11 then ends a body delimited by the close, or says the reply was cut short

    async def aclose(self) -> None:
        stream, self._stream, self._sock = self._stream, None, None
        if stream is not None:
            await stream.aclose()


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether an idle connection is unusable: it turns readable only once the server closed it
    (its keep-alive timeout, a restart) or sent what no request asked for."""
    fd = sock.fileno()
    if fd < 0:
        return True  # asyncio closes its transport as soon as the server's close arrives
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    return bool(poll.poll(0))
