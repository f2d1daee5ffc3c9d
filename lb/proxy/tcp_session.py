"""One connection accepted by a `[[tcp]]` listener, from accept to close.

    WAITING     a slot from the listener's scheduler, or a place in its queue
                (up to queue_timeout); nothing is read from the client, so
                what it sends waits in the kernel and a queue holds no bytes
    CONNECTING  to the chosen backend, within timeouts.connect; a failure is
                the backend's (record_failure, scheduler.failed: passive
                ejection) and the next try goes to another one, up to
                retry.attempts tries in all
    JOINED      both connections spliced (wire.splice): bytes both ways with
                backpressure and half-close, until it ends
    DONE        slot released, counted and logged once (`owner.session_ended`)

`ended` says why: a splice reason, or queue_timeout / queue_full /
no_backend / connect_failed, or shutdown.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from ..scheduling.scheduler import NO_BACKEND, QUEUE_FULL, QUEUE_TIMEOUT, Scheduler, Ticket
from ..wire.splice import BACKEND_CLOSED, CLIENT_CLOSED, CLIENT_RESET, SHUTDOWN, Splice

if TYPE_CHECKING:
    from ..scheduling.tcp_backend import TcpBackend

CONNECT_FAILED = "connect_failed"
WAITING, CONNECTING, JOINED, DONE = "waiting", "connecting", "joined", "done"


@dataclass(frozen=True)
class SessionSettings:
    """What a connection needs of the configuration, as it was when it was accepted."""
    connect_timeout: float      # timeouts.connect
    attempts: int               # retry.attempts: backends tried in all
    queue_timeout: float        # the listener's queue_timeout
    idle: float                 # timeouts.tunnel_idle
    write_buffer_high: int      # limits.write_buffer_high


class Owner(Protocol):
    """The listener a session belongs to."""
    loop: asyncio.AbstractEventLoop
    scheduler: Scheduler
    settings: SessionSettings

    def session_started(self, session: "TcpSession") -> None: ...
    def session_ended(self, session: "TcpSession") -> None: ...
    def client_closed(self, session: "TcpSession") -> None: ...


class Held(asyncio.Protocol):
    """A connection not spliced yet, reading nothing.  uvloop starts reading
    a new transport after connection_made even when that paused it, so the
    first read that comes anyway (one read at most: it pauses again) and an
    EOF are kept here for the splice: a server that speaks first finds its
    greeting waiting for the client, and a client's first bytes for the
    backend."""

    def __init__(self):
        self.held: asyncio.Transport | None = None
        self.early = bytearray()
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()
        self.held = transport

    def data_received(self, data: bytes) -> None:
        self.early += data
        self.held.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        return True       # half-closed: the other way may still carry bytes

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


def join(loop: asyncio.AbstractEventLoop, client: Held, backend: Held, *, idle: float,
         on_end: Callable[[str], None], on_client_lost: Callable[[], None]) -> Splice:
    """Splice two held connections, with what each sent so far; then
    `pass_on_eofs`, once the caller holds the splice (it may end at once)."""
    return Splice(loop, client.held, backend.held, idle=idle, on_end=on_end,
                  on_client_lost=on_client_lost, client_first=bytes(client.early),
                  backend_first=bytes(backend.early))


def pass_on_eofs(splice: Splice, client: Held, backend: Held) -> None:
    """An EOF either side sent before the join, passed on as it would have been."""
    for side, held in ((splice.client, client), (splice.backend, backend)):
        if held.eof and not splice.ended:
            side.eof_received()
    if splice.ended:                # both had closed their side: nothing left to carry
        splice.close(splice.why)


class TcpSession(Held):
    def __init__(self, owner: Owner):
        super().__init__()
        self.owner = owner
        self.settings = owner.settings
        self.state = WAITING
        self.transport: asyncio.Transport | None = None
        self.client_ip = "-"
        self.started = time.monotonic()
        self.backend: "TcpBackend | None" = None   # the one joined, or tried last
        self.tried: list[str] = []
        self.errors: list[str] = []
        self.ticket: Ticket | None = None
        self.queued_for = 0.0
        self.splice: Splice | None = None
        self.ended = ""
        self.bytes_in = self.bytes_out = 0     # from the client / to the client
        self.finished_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None
        self._holding = False                  # a scheduler slot on self.backend

    # --- accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)     # read nothing until joined to a backend
        high = self.settings.write_buffer_high
        transport.set_write_buffer_limits(high=high, low=high // 4)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else "-"
        self.started = time.monotonic()
        self.owner.session_started(self)
        self._acquire()

    def connection_lost(self, exc: Exception | None) -> None:
        """Before it is joined only (the splice takes the transport over): we
        closed it, the client reset, or the balancer is stopping."""
        self.lost = True
        if self.state != DONE:
            self._abandon()
            self._finish(CLIENT_RESET if exc is not None else CLIENT_CLOSED)
        self.owner.client_closed(self)

    # --- a slot

    def _acquire(self) -> None:
        tried = self.tried
        result = self.owner.scheduler.acquire(self, frozenset(tried), retry=bool(tried))
        if isinstance(result, Ticket):
            self.ticket = result
            self._timer = self.owner.loop.call_later(self.settings.queue_timeout,
                                                     self._queue_timed_out)
        elif result == QUEUE_FULL:
            self._refuse(QUEUE_FULL)
        elif result == NO_BACKEND:
            self._refuse(NO_BACKEND)
        else:
            self._connect(result)

    def dispatch(self, backend: "TcpBackend") -> None:
        """The scheduler found us a slot (we were queued)."""
        self._left_queue()
        self._connect(backend)

    def no_backend(self) -> None:
        """Nothing is in the rotation any more (we were queued)."""
        self._left_queue()
        self._refuse(NO_BACKEND)

    def _left_queue(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.ticket is not None:
            self.queued_for += time.monotonic() - self.ticket.since
            self.ticket = None

    def _queue_timed_out(self) -> None:
        self._timer = None
        if self.ticket is not None:
            self.owner.scheduler.cancel(self.ticket, timed_out=True)
            self._left_queue()
        self._refuse(QUEUE_TIMEOUT)

    # --- the backend connection

    def _connect(self, backend: "TcpBackend") -> None:
        self.state = CONNECTING
        self.backend = backend
        self._holding = True
        self._task = self.owner.loop.create_task(self._open(backend))

    async def _open(self, backend: "TcpBackend") -> None:
        timeout = self.settings.connect_timeout
        try:
            _, held = await asyncio.wait_for(
                self.owner.loop.create_connection(Held, backend.host, backend.port), timeout)
        except asyncio.TimeoutError:
            self._connect_failed(backend, "connect_timeout",
                                 f"no connection within {timeout:g}s (timeouts.connect)")
        except OSError as exc:
            self._connect_failed(backend, "connect", f"cannot connect: {exc.strerror or exc}")
        else:
            self._connected(backend, held)

    def _connect_failed(self, backend: "TcpBackend", kind: str, reason: str) -> None:
        self._task = None
        if self.state != CONNECTING:
            return
        scheduler = self.owner.scheduler
        backend.record_failure(kind, reason)
        self.tried.append(backend.name)
        self.errors.append(f"{backend.name}: {reason}")
        # Before the release: a failed half-open trial ejects the backend again.
        scheduler.failed(backend, local=True, reason=reason)
        self._release()
        if len(self.tried) < self.settings.attempts:
            self.state = WAITING
            self._acquire()
        else:
            self._refuse(CONNECT_FAILED)

    def _connected(self, backend: "TcpBackend", held: Held) -> None:
        self._task = None
        if self.state != CONNECTING:   # given up meanwhile (wait_for returned anyway)
            held.held.abort()
            return
        self.tried.append(backend.name)
        self.owner.scheduler.succeeded(backend)
        if held.lost:
            # It accepted, maybe said something, and closed before the join.
            self.bytes_out = len(held.early)
            self.transport.write(bytes(held.early))
            self._release()
            self._finish(BACKEND_CLOSED)
            self.transport.close()
            return
        high = self.settings.write_buffer_high
        held.held.set_write_buffer_limits(high=high, low=high // 4)
        self.state = JOINED
        self.splice = splice = join(self.owner.loop, self, held, idle=self.settings.idle,
                                    on_end=self._splice_ended, on_client_lost=self._client_lost)
        backend.connections.joined(splice)
        pass_on_eofs(splice, self, held)

    def _splice_ended(self, why: str) -> None:
        splice = self.splice
        self.bytes_in, self.bytes_out = splice.bytes_to_backend, splice.bytes_to_client
        self.backend.connections.parted(splice)
        self._release()
        self._finish(why)

    def _client_lost(self) -> None:
        self.owner.client_closed(self)

    # --- the end

    def shutdown(self) -> None:
        """The balancer stops (or its drain timed out): end it now."""
        if self.splice is not None:
            self.splice.close(SHUTDOWN)
        elif self.state != DONE:
            self._abandon()
            self._finish(SHUTDOWN)
            self.transport.abort()

    def _refuse(self, why: str) -> None:
        """No backend for this connection: close it, having read nothing."""
        self._finish(why)
        self.transport.close()

    def _abandon(self) -> None:
        """Give up whatever is under way before the join."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.ticket is not None:
            self.owner.scheduler.cancel(self.ticket)
            self._left_queue()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._release()

    def _release(self) -> None:
        if self._holding:
            self._holding = False
            self.owner.scheduler.release(self.backend)

    def _finish(self, why: str) -> None:
        if self.state == DONE:
            return
        self.state = DONE
        self.ended = why
        self.finished_at = time.monotonic()
        self.owner.session_ended(self)
