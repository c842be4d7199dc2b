"""A fault-injecting TCP proxy between an MQTT client and the broker.

It runs its own asyncio loop in a background thread, so the controls are plain methods that
work the same from synchronous tests and from async tests (each returns within milliseconds):

    with FaultProxy(broker.host, broker.port) as proxy:   # client connects to proxy.port
        proxy.pause_downstream()  # broker→client bytes are withheld (e.g. a PUBACK) ...
        proxy.cut()               # ... and every connection is reset: the PUBACK is lost
        proxy.resume_downstream()
        proxy.refuse(True)        # new connections are accepted, then reset: "broker down"

Bytes held back while a direction is paused are forwarded on resume, or dropped by `cut()`.
`cut()` and refused connections end with a TCP reset (SO_LINGER 0), as a dropped link or a
crashed peer would; a connection one side closes normally is closed normally on the other.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

__all__ = ["FaultProxy"]

T = TypeVar("T")
_UP, _DOWN = "upstream", "downstream"  # client→broker, broker→client


def _reset_on_close(transport: asyncio.BaseTransport) -> None:
    """Make the next close of this transport send RST instead of FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Side(asyncio.Protocol):
    """One socket of a proxied connection; forwards what it receives to its peer side."""

    def __init__(self, link: _Link, direction: str) -> None:
        self.link = link
        self.direction = direction  # the direction of the bytes this side *receives*
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.held: list[bytes] = []  # received while its direction was paused
        self.peer_writes_paused = False
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.link.refused:
            self.link.close(reset=True)

    def data_received(self, data: bytes) -> None:
        if self.link.proxy.paused(self.direction) or self.peer is None:
            self.held.append(data)
            self.update_reading()
        else:
            self.forward(data)

    def forward(self, data: bytes) -> None:
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.write(data)
        self.link.proxy.count(self.direction, len(data))

    def flush(self) -> None:
        """Forward what was held back, once the direction is open and the peer exists."""
        if self.peer is None or self.link.proxy.paused(self.direction):
            return
        held, self.held = self.held, []
        for data in held:
            self.forward(data)
        self.update_reading()

    def update_reading(self) -> None:
        """Read only while there is somewhere to put the bytes (held bytes stay bounded)."""
        if self.transport is None or self.transport.is_closing():
            return
        stalled = self.peer is None or self.peer_writes_paused
        if stalled or (self.held and self.link.proxy.paused(self.direction)):
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    # flow control: our transport's write buffer is full → stop reading from the peer socket
    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.peer_writes_paused = True
            self.peer.update_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.peer_writes_paused = False
            self.peer.update_reading()

    def eof_received(self) -> bool:
        self.link.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self.link.close()
        self.link.check_gone()


class _Link:
    """A client connection and its connection to the broker."""

    def __init__(self, proxy: FaultProxy, *, refused: bool) -> None:
        self.proxy = proxy
        self.refused = refused
        self.client = _Side(self, _UP)
        self.upstream: _Side | None = None
        self.connector: asyncio.Task[None] | None = None
        self.closing = False
        if not refused:
            self.connector = asyncio.ensure_future(self.connect())
            self.connector.add_done_callback(lambda _: self.check_gone())

    async def connect(self) -> None:
        """Open the broker side; until then the client's bytes are held."""
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(
                lambda: _Side(self, _DOWN), self.proxy.target_host, self.proxy.target_port
            )
        except OSError:
            self.close(reset=True)
            return
        self.upstream = upstream
        if self.closing:
            self.close(reset=True)
            return
        upstream.peer, self.client.peer = self.client, upstream
        self.client.flush()
        upstream.flush()

    def sides(self) -> list[_Side]:
        return [s for s in (self.client, self.upstream) if s is not None and s.transport]

    def close(self, *, reset: bool = False) -> None:
        """Close both sides: normally (pending bytes flushed) or with a TCP reset."""
        if self.closing and not reset:
            return
        self.closing = True
        if self.connector is not None and not self.connector.done():
            self.connector.cancel()
        for side in self.sides():
            assert side.transport is not None
            if reset:
                _reset_on_close(side.transport)
                side.transport.abort()
            elif not side.transport.is_closing():
                side.transport.close()

    def check_gone(self) -> None:
        """Forget this link once both sockets are closed and no connect is pending."""
        connecting = self.connector is not None and not self.connector.done()
        if self.closing and not connecting and all(s.closed.done() for s in self.sides()):
            self.proxy.forget(self)

    async def wait_closed(self) -> None:
        if self.connector is not None:
            await asyncio.gather(self.connector, return_exceptions=True)
        await asyncio.gather(*(s.closed for s in self.sides()))


class FaultProxy:
    """TCP proxy on its own free 127.0.0.1 port, with faults on command."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = 0
        self.bytes_upstream = 0  # client→broker bytes forwarded
        self.bytes_downstream = 0  # broker→client bytes forwarded
        self.connections_accepted = 0
        self.connections_refused = 0
        self.cuts = 0
        self._paused = {_UP: False, _DOWN: False}
        self._refusing = False
        self._links: set[_Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Listen (in a background thread) and return once the port accepts connections."""
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        self._thread = threading.Thread(target=self._run, name=f"fault-proxy-{id(self):x}")
        self._thread.daemon = True
        self._thread.start()
        self._ready.wait(10)
        if self._failure is not None:
            self._thread.join()
            raise RuntimeError("fault proxy failed to start") from self._failure
        if not self._ready.is_set():
            raise RuntimeError("fault proxy did not start within 10 s")
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(); nothing else reads it
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await self._loop.create_server(self._accept, self.host, self.port or 0)
        self.port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            await server.wait_closed()
            links = list(self._links)
            for link in links:
                link.close(reset=True)
            await asyncio.gather(*(link.wait_closed() for link in links))

    def close(self) -> None:
        """Reset every connection, stop listening, end the thread."""
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        if self._thread.is_alive():
            raise RuntimeError("fault proxy thread did not stop")
        self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- called in the proxy's loop ----------------------------------------------------------

    def _accept(self) -> _Side:
        link = _Link(self, refused=self._refusing)
        self.connections_accepted += 1
        self.connections_refused += link.refused
        self._links.add(link)
        return link.client

    def forget(self, link: _Link) -> None:
        self._links.discard(link)

    def paused(self, direction: str) -> bool:
        return self._paused[direction]

    def count(self, direction: str, size: int) -> None:
        if direction == _UP:
            self.bytes_upstream += size
        else:
            self.bytes_downstream += size

    def _set_paused(self, direction: str, paused: bool) -> None:
        self._paused[direction] = paused
        for link in self._links:
            side = link.client if direction == _UP else link.upstream
            if side is None:
                continue
            if paused:
                side.update_reading()
            else:
                side.flush()

    def _cut(self) -> None:
        self.cuts += 1
        for link in list(self._links):
            link.close(reset=True)

    # -- controls (any thread) ---------------------------------------------------------------

    def _call(self, func: Callable[..., T], *args: Any) -> T:
        """Run func in the proxy's loop and wait for it."""
        if self._loop is None or self._thread is None:
            raise RuntimeError("proxy not started")

        async def run() -> T:
            return func(*args)

        return self._submit(run())

    def _submit(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(10)

    def cut(self) -> None:
        """Reset every current connection (both sides), as a dropped link would."""
        self._call(self._cut)

    def pause_downstream(self) -> None:
        """Withhold broker→client bytes (PUBACKs, deliveries); client→broker still flows."""
        self._call(self._set_paused, _DOWN, True)

    def resume_downstream(self) -> None:
        """Forward withheld broker→client bytes and continue."""
        self._call(self._set_paused, _DOWN, False)

    def pause_upstream(self) -> None:
        """Withhold client→broker bytes; broker→client still flows."""
        self._call(self._set_paused, _UP, True)

    def resume_upstream(self) -> None:
        """Forward withheld client→broker bytes and continue."""
        self._call(self._set_paused, _UP, False)

    def refuse(self, refusing: bool = True) -> None:
        """While True, new connections are accepted and reset at once (current ones stay)."""
        self._call(setattr, self, "_refusing", refusing)

    @property
    def active_connections(self) -> int:
        """Client connections currently open through the proxy."""
        return self._call(lambda: sum(1 for link in self._links if not link.closing))

    def wait_connections(self, count: int = 1, timeout: float = 5.0) -> None:
        """Block until at least `count` client connections are open through the proxy."""
        deadline = time.monotonic() + timeout
        while self.active_connections < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.active_connections} connections, wanted {count}")
            time.sleep(0.01)

    def __repr__(self) -> str:
        return (
            f"<FaultProxy {self.host}:{self.port} → {self.target_host}:{self.target_port} "
            f"up {self.bytes_upstream} B, down {self.bytes_downstream} B>"
        )
