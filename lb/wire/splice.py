"""Two connections joined into a byte tunnel: a WebSocket after its 101, or
a `[[tcp]]` listener's client and its backend.

Each side's transport gets a `_Side` protocol (transport.set_protocol), so
bytes go from one transport's read callback straight into the other's
write, with no task and no copy in between.  The rules:

- backpressure: when one side's write buffer passes its high-water mark
  (limits.write_buffer_high, set on both transports), the other side stops
  reading until it drains, so a tunnel holds at most about one buffer's
  worth each way however fast one end sends and however slowly the other
  reads;
- half-close: an EOF from one side is passed on as our FIN to the other
  (write_eof), and the tunnel goes on the other way; when both have sent
  theirs, or either connection is lost, the tunnel is over;
- a side held back (not read, because the other cannot take more) is not
  watched by the event loop, so a reset from it would go unseen while the
  other side stays stuck: it is looked at every HELD_CHECK seconds, and a
  reset ends the tunnel;
- idle: no byte either way for `idle` seconds (timeouts.tunnel_idle) ends it;
- what ends it is said once, to `on_end(why)`; `on_client_lost()` follows
  when the client's connection is closed for good (the listener counts it).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Callable

# Why a tunnel ended (the access log's `ended=`).
CLIENT_CLOSED, BACKEND_CLOSED = "client_closed", "backend_closed"
CLIENT_RESET, BACKEND_RESET = "client_reset", "backend_reset"
IDLE_TIMEOUT, SHUTDOWN = "idle_timeout", "shutdown"

_CHECKS = 4     # the idle timer looks this many times per `idle` seconds
HELD_CHECK = 1.0    # seconds between looks at a held-back side for a reset


def _socket_error(transport: asyncio.Transport) -> int:
    """The error the kernel has for the transport's socket (ECONNRESET
    after an RST), 0 if none."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError:
        return 0


class _Side(asyncio.Protocol):
    __slots__ = ("splice", "transport", "peer", "name", "received", "eof", "lost", "held")

    def __init__(self, splice: "Splice", transport: asyncio.Transport, name: str):
        self.splice = splice
        self.transport = transport
        self.peer: _Side | None = None
        self.name = name            # "client" | "backend"
        self.received = 0           # bytes read from this side (and written to the peer)
        self.eof = False            # this side sent its FIN
        self.lost = False
        self.held = False           # not read: the peer's write buffer is full

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.splice.active = True
        peer = self.peer.transport
        if not peer.is_closing():
            peer.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        self.splice.active = True
        peer = self.peer
        if peer.eof:
            # Both ways are closed now; the side that closed first ended it.
            self.splice.end(CLIENT_CLOSED if peer.name == "client" else BACKEND_CLOSED)
            return False
        if not peer.transport.is_closing():
            try:
                peer.transport.write_eof()      # after what is buffered for it
            except (OSError, RuntimeError, NotImplementedError):
                peer.transport.close()
        return True     # keep our transport open: the other way goes on

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        splice = self.splice
        if exc is None:
            splice.end(CLIENT_CLOSED if self.name == "client" else BACKEND_CLOSED)
        else:
            splice.end(CLIENT_RESET if self.name == "client" else BACKEND_RESET)
        if self.name == "client":
            splice.client_lost()
        if self.peer.lost:
            splice.all_lost()
        else:
            splice.close_side(self.peer)

    def pause_writing(self) -> None:
        # Our buffer toward this side is full: stop reading the side that fills it.
        peer = self.peer
        if not peer.transport.is_closing():
            peer.transport.pause_reading()
            peer.held = True
            self.splice.watch_held()

    def resume_writing(self) -> None:
        peer = self.peer
        peer.held = False
        if not peer.transport.is_closing():
            peer.transport.resume_reading()


class SpliceTally:
    """Splices to one backend: how many were joined, those open now, and
    the bytes each way of all of them (the open ones read as they stand)."""
    __slots__ = ("total", "open", "_to_backend", "_to_client")

    def __init__(self):
        self.total = 0
        self.open: set[Splice] = set()
        self._to_backend = self._to_client = 0     # of those ended

    def joined(self, splice: "Splice") -> None:
        self.total += 1
        self.open.add(splice)

    def parted(self, splice: "Splice") -> None:
        self.open.discard(splice)
        self._to_backend += splice.bytes_to_backend
        self._to_client += splice.bytes_to_client

    @property
    def bytes_to_backend(self) -> int:
        return self._to_backend + sum(s.bytes_to_backend for s in self.open)

    @property
    def bytes_to_client(self) -> int:
        return self._to_client + sum(s.bytes_to_client for s in self.open)


class Splice:
    __slots__ = ("client", "backend", "active", "ended", "why", "_loop", "_idle", "_timer",
                 "_silent", "_on_end", "_on_client_lost", "_linger", "_held_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, client: asyncio.Transport,
                 backend: asyncio.Transport, *, idle: float, on_end: Callable[[str], None],
                 on_client_lost: Callable[[], None] = lambda: None,
                 client_first: bytes = b"", backend_first: bytes = b""):
        """`client_first`/`backend_first`: bytes each side sent before the
        tunnel existed (behind a request head, behind a 101)."""
        self._loop = loop
        self._idle = idle
        self._on_end = on_end
        self._on_client_lost = on_client_lost
        self.active = False
        self.ended = False
        self.why = ""
        self._silent = 0
        self._linger: asyncio.TimerHandle | None = None
        self._held_timer: asyncio.TimerHandle | None = None
        self.client = _Side(self, client, "client")
        self.backend = _Side(self, backend, "backend")
        self.client.peer, self.backend.peer = self.backend, self.client
        client.set_protocol(self.client)
        backend.set_protocol(self.backend)
        if client_first:
            self.client.data_received(client_first)
        if backend_first:
            self.backend.data_received(backend_first)
        client.resume_reading()
        backend.resume_reading()
        self._timer = loop.call_later(idle / _CHECKS, self._check_idle)

    @property
    def bytes_to_backend(self) -> int:
        return self.client.received

    @property
    def bytes_to_client(self) -> int:
        return self.backend.received

    def close(self, why: str = SHUTDOWN) -> None:
        """End the tunnel from our side: both connections closed after what
        is buffered for them is written."""
        self.end(why)
        self.close_side(self.client)
        self.close_side(self.backend)

    def end(self, why: str) -> None:
        if self.ended:
            return
        self.ended = True
        self.why = why
        self._timer.cancel()
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        self._on_end(why)

    def client_lost(self) -> None:
        callback, self._on_client_lost = self._on_client_lost, None
        if callback is not None:
            callback()

    def all_lost(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None

    def close_side(self, side: _Side) -> None:
        transport = side.transport
        if side.lost:
            return
        if not transport.is_closing():
            transport.close()
        if self._linger is None:
            # close() waits for the write buffer to drain; a peer that never
            # reads it is dropped after `idle` more seconds.
            self._linger = self._loop.call_later(self._idle, self._abort_all)

    def _abort_all(self) -> None:
        for side in (self.client, self.backend):
            if not side.lost:
                side.transport.abort()

    def watch_held(self) -> None:
        if self._held_timer is None and not self.ended:
            self._held_timer = self._loop.call_later(HELD_CHECK, self._check_held)

    def _check_held(self) -> None:
        self._held_timer = None
        for side in (self.client, self.backend):
            if side.held and not side.lost and _socket_error(side.transport):
                # Reset while held back: the stream is broken both ways (what
                # is buffered toward the peer that does not read is dropped).
                self.end(CLIENT_RESET if side.name == "client" else BACKEND_RESET)
                self._abort_all()
                return
        if self.client.held or self.backend.held:
            self.watch_held()

    def _check_idle(self) -> None:
        if self.active:
            self.active = False
            self._silent = 0
        else:
            self._silent += 1
            if self._silent >= _CHECKS:
                self.close(IDLE_TIMEOUT)
                return
        self._timer = self._loop.call_later(self._idle / _CHECKS, self._check_idle)
