"""One proxied request's life: pick a backend, forward, stream back, account.

Bodies stream both ways with backpressure and nothing is buffered beyond one
write-buffer's worth: while the backend connection is being opened, request
body chunks wait in `_pending` and the client is paused once that passes the
high-water mark; after that, each side's reading pauses while the other
side's write buffer is above its high-water mark.

One `Deadline` watches the whole exchange; what it means depends on the phase:

    SENDING    request body still coming     -> `timeouts.idle` of silence
    WAITING    request sent, no response yet -> `timeouts.first_byte`
    RECEIVING  response body streaming       -> `timeouts.idle` of silence

(connecting is bounded by `timeouts.connect` in the pool).

The commit point: until the response head has gone to the client, a failure
becomes a JSON error answer (502/504); after it, the client connection is
closed without ending the body, so a cut-short response never looks whole.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import h11

from . import headers as hdr
from .timer import Deadline

if TYPE_CHECKING:
    from .backend import Backend
    from .balancer import Balancer
    from .client import ClientConnection
    from .upstream import UpstreamConnection

CONNECTING, SENDING, WAITING, RECEIVING, DONE = range(5)

# The keep-alive race: a backend closes an idle pooled connection just as we
# send a request on it.  Such a request was never processed, so it is sent
# again once on a fresh connection, if its body (up to REPLAY_LIMIT bytes) is
# still at hand and the loss came within REPLAY_WINDOW seconds of sending.
# A later loss means the backend may have worked on it: that is a failure.
REPLAY_LIMIT = 64 * 1024
REPLAY_WINDOW = 0.25

# While connecting, a backstop beyond timeouts.connect in case the connect
# task dies in a way nobody foresaw: the request must not hang.
CONNECT_BACKSTOP = 1.0

_EndOfMessage = h11.EndOfMessage()


class Exchange:
    __slots__ = ("balancer", "client", "request", "request_id", "started", "phase",
                 "backend", "upstream", "_pending", "_pending_bytes", "_request_ended",
                 "_replay", "_replay_bytes", "info", "_deadline", "_connect_task",
                 "bytes_in", "bytes_out", "status", "ttfb", "note", "response_started",
                 "_upstream_request", "_reused", "_sent_at", "_resend_body")

    def __init__(self, balancer: "Balancer", client: "ClientConnection",
                 request: h11.Request, info: hdr.RequestInfo):
        self.balancer = balancer
        self.client = client
        self.request = request
        self.info = info
        self.request_id = info.request_id
        self.started = time.monotonic()
        self.phase = CONNECTING
        self.backend: Backend | None = None
        self.upstream: UpstreamConnection | None = None
        self._pending: list[bytes] = []      # body received before the backend is connected
        self._pending_bytes = 0
        self._request_ended = False
        self._replay: list[bytes] | None = []  # body kept for one resend on a stale connection
        self._replay_bytes = 0
        self._deadline = Deadline(balancer.loop, self._on_deadline)
        self._connect_task: asyncio.Task | None = None
        self._upstream_request: h11.Request | None = None
        self._reused = False
        self._sent_at = 0.0                   # when the request went out on `upstream`
        self._resend_body: list[bytes] = []   # what a resend replays before `_pending`
        self.bytes_in = 0                     # request body bytes from the client
        self.bytes_out = 0                    # response body bytes to the client
        self.status = 0                       # what the client got (499: it left)
        self.ttfb: float | None = None
        self.note = ""                        # why it failed, for the access log
        self.response_started = False

    # --- start

    def start(self) -> None:
        backend = self.balancer.policy.pick(self.balancer.backends)
        if backend is None:
            self._answer_error(503, "no backend available")
            return
        self.backend = backend
        backend.in_flight += 1
        backend.requests += 1
        info = self.info
        self._upstream_request = hdr.request_event(
            self.request.method, self.request.target,
            hdr.to_backend(info.headers, client_ip=self.client.peer_ip,
                           request_id=self.request_id, chunked=info.chunked,
                           default_host=backend.host_header))
        conn = backend.pool.acquire()
        if conn is not None:
            self._attach(conn, reused=True)
        else:
            self._connect()

    def _connect(self) -> None:
        self.phase = CONNECTING
        # The pool bounds connecting with timeouts.connect; this is the backstop.
        self._deadline.set(self.balancer.config.timeouts.connect + CONNECT_BACKSTOP)
        self._connect_task = self.balancer.loop.create_task(self._open_connection())

    async def _open_connection(self) -> None:
        backend = self.backend
        try:
            conn = await backend.pool.connect()
        except asyncio.TimeoutError:
            self._connect_task = None
            self._fail("connect_timeout", 504,
                       f"backend {backend.name} did not accept a connection within "
                       f"{self.balancer.config.timeouts.connect:g}s")
            return
        except OSError as exc:
            self._connect_task = None
            self._fail("connect", 502, f"cannot connect to backend {backend.name}: "
                       f"{exc.strerror or exc}")
            return
        except Exception as exc:  # e.g. a host name that cannot be encoded
            self._connect_task = None
            self._fail("connect", 502, f"cannot connect to backend {backend.name}: {exc!r}")
            return
        self._connect_task = None
        if self.phase == DONE:       # the client left while we were connecting
            backend.pool.release(conn)
            return
        self._attach(conn, reused=False)

    def _attach(self, conn: "UpstreamConnection", *, reused: bool) -> None:
        self.upstream = conn
        conn.owner = self
        self._reused = reused
        if not reused:
            self._replay = None  # a fresh connection is never part of the race
        self._sent_at = time.monotonic()
        conn.send(self._upstream_request)
        # A resend first replays what the lost connection had been sent.
        for chunk in self._resend_body:
            conn.send_data(chunk)
        self._resend_body = []
        for chunk in self._pending:
            conn.send_data(chunk)
        self._pending.clear()
        self._pending_bytes = 0
        if self.client.write_paused:
            conn.pause_reading()
        if self._request_ended:
            conn.send(_EndOfMessage)
            self._enter(WAITING)
        else:
            self._enter(SENDING)
        if not conn.write_paused:
            self.client.resume_reading_for_backpressure()
        else:
            self.client.pause_reading_for_backpressure()

    # --- from the client connection

    def client_data(self, data: bytes) -> None:
        if self.phase == DONE:
            return
        self.bytes_in += len(data)
        if self.bytes_in > self.balancer.config.limits.max_body_bytes:
            self._client_error(413, "request body larger than limits.max_body_bytes "
                               f"({self.balancer.config.limits.max_body_bytes} bytes)")
            return
        if self._replay is not None:
            self._replay_bytes += len(data)
            if self._replay_bytes > REPLAY_LIMIT:
                self._replay = None
            else:
                self._replay.append(data)
        if self.phase == CONNECTING:
            self._pending.append(data)
            self._pending_bytes += len(data)
            if self._pending_bytes > self.balancer.config.limits.write_buffer_high:
                self.client.pause_reading_for_backpressure()
        elif self.upstream is not None:
            self._deadline.set(self.balancer.config.timeouts.idle)
            self.upstream.send_data(data)

    def client_end(self) -> None:
        if self.phase == DONE:
            return
        self._request_ended = True
        if self.phase != CONNECTING and self.upstream is not None:
            self.upstream.send(_EndOfMessage)
            if self.phase == SENDING:
                self._enter(WAITING)

    def client_bad_body(self, reason: str) -> None:
        """The request body's framing broke (bad chunk, early close)."""
        if self.phase != DONE:
            self._client_error(400, reason)

    def client_lost(self) -> None:
        """The client went away: free the backend connection (and GPU slot) now."""
        if self.phase == DONE:
            return
        self.status = 499
        self.note = "client closed connection"
        if self.upstream is not None:
            self.upstream.abort()
        self._finish()

    def client_write_paused(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def client_write_resumed(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()
            if self.phase == RECEIVING:
                self._deadline.set(self.balancer.config.timeouts.idle)

    # --- from the upstream connection

    def upstream_write_paused(self) -> None:
        self.client.pause_reading_for_backpressure()

    def upstream_write_resumed(self) -> None:
        self.client.resume_reading_for_backpressure()
        if self.phase == SENDING:
            self._deadline.set(self.balancer.config.timeouts.idle)

    def upstream_response(self, response: h11.Response) -> None:
        backend = self.backend
        backend.record_response(response.status_code)
        self.status = response.status_code
        self.ttfb = time.monotonic() - self.started
        self.response_started = True
        self._replay = None
        self._enter(RECEIVING)
        self.client.send_response(response.status_code,
                                  hdr.to_client(hdr.as_list(response.headers),
                                                request_id=self.request_id),
                                  response.reason)

    def upstream_data(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self._deadline.set(self.balancer.config.timeouts.idle)
        self.client.send_data(data)

    def upstream_end(self) -> None:
        conn, self.upstream = self.upstream, None
        if conn.finish_for_reuse():
            self.backend.pool.release(conn)
        else:
            conn.close()
        self._finish()
        self.client.send_end()

    def upstream_failed(self, kind: str, reason: str) -> None:
        self._fail(kind, 502, reason)

    def upstream_lost(self, exc: Exception | None) -> None:
        if self.phase == DONE:
            return
        self.upstream = None
        if (not self.response_started and self._reused and self._replay is not None
                and time.monotonic() - self._sent_at < REPLAY_WINDOW):
            # The keep-alive race (see REPLAY_WINDOW): send it again on a
            # fresh connection.  Only once: a second loss is the backend's.
            self._resend_body, self._replay = self._replay, None
            self._connect()
            return
        if self.response_started:
            self._fail("reset", 502, "backend closed the connection in the middle of the response")
        elif exc is not None:
            self._fail("reset", 502, f"backend {self.backend.name} reset the connection "
                       f"before answering ({exc})")
        else:
            self._fail("reset", 502, f"backend {self.backend.name} closed the connection "
                       "before answering")

    # --- timeouts

    def _enter(self, phase: int) -> None:
        self.phase = phase
        timeouts = self.balancer.config.timeouts
        self._deadline.set(timeouts.first_byte if phase == WAITING else timeouts.idle)

    def _on_deadline(self) -> None:
        timeouts = self.balancer.config.timeouts
        if self.phase == CONNECTING:
            self._fail("connect_timeout", 504, f"backend {self.backend.name} did not accept "
                       f"a connection within {timeouts.connect:g}s")
        elif self.phase == SENDING:
            if self.upstream is not None and self.upstream.write_paused:
                self._fail("idle_timeout", 504, f"backend {self.backend.name} stopped reading "
                           f"the request body for {timeouts.idle:g}s")
            else:
                self._client_error(408, f"client sent no request body for {timeouts.idle:g}s")
        elif self.phase == WAITING:
            self._fail("first_byte_timeout", 504, f"backend {self.backend.name} sent no response "
                       f"within {timeouts.first_byte:g}s")
        elif self.phase == RECEIVING:
            if self.client.write_paused:
                # The client stopped reading; the backend is not at fault.
                self._abandon(504, f"client read nothing for {timeouts.idle:g}s")
            else:
                self._fail("idle_timeout", 504, f"backend {self.backend.name} sent nothing for "
                           f"{timeouts.idle:g}s in the middle of the response")

    # --- endings

    def _fail(self, kind: str, status: int, reason: str) -> None:
        """The backend failed us: count it, then answer or break the response."""
        if self.phase == DONE:
            return
        self.backend.record_failure(kind, reason)
        self._abandon(status, reason)

    def _client_error(self, status: int, reason: str) -> None:
        """The client broke the rules mid-request: answer if we still can, drop the backend."""
        self._abandon(status, reason, close=True)

    def _abandon(self, status: int, reason: str, close: bool = False) -> None:
        """Drop the backend connection; answer `status` if nothing was sent yet,
        else end the client's response visibly broken."""
        self.note = reason
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        if self.response_started:
            self._finish()
            self.client.abort_response()
        else:
            self._answer_error(status, reason, close=close)

    def _answer_error(self, status: int, reason: str, close: bool = False) -> None:
        self.status = status
        self.note = reason
        self._finish()
        self.client.send_error(status, reason, self.request_id, close=close)

    def _finish(self) -> None:
        """Release the backend slot and account, exactly once."""
        if self.phase == DONE:
            return
        self.phase = DONE
        self._deadline.cancel()
        if self._connect_task is not None:
            self._connect_task.cancel()
            self._connect_task = None
        self._pending.clear()
        self._replay = None
        self._resend_body = []
        backend = self.backend
        if backend is not None:
            backend.in_flight -= 1
            backend.bytes_sent += self.bytes_in
            backend.bytes_received += self.bytes_out
        self.balancer.request_finished(self)
