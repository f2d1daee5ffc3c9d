"""One proxied request's life: a slot, forward, stream back, recover, account.

A request first gets a slot on a backend from the scheduler, or waits in its
queue (QUEUED).  Then it is forwarded; bodies stream both ways with
backpressure: while no backend connection is ready, request body chunks wait
in `_pending` and the client is paused once that passes the high-water mark;
after that, each side's reading pauses while the other side's write buffer
is above its high-water mark.  The one other copy is `_kept`: the request
body so far, for a resend, held until the response head arrives and dropped
for good once it passes `retry.replay_max_bytes`.

One `Deadline` watches the whole exchange; what it means depends on the
phase (see `phases`).

The commit point: until the response head has gone to the client, a failed
attempt is retried on another backend when the failure is one worth retrying
(retry.RETRYABLE_KINDS, or a status in `retry.statuses`), attempts remain,
the retry budget allows and the request body was kept whole (up to
`retry.replay_max_bytes`); otherwise it becomes a JSON error answer
(502/503/504) or, for a status, the backend's own answer -- unless the
call is a TTS call (a configured route) and the Cartesia fallback takes it:
when no backend is in the rotation, when every attempt failed or a 5xx is
left, or, with `spillover`, when the fleet stayed full.  After the commit
point, the client connection is closed without ending the body, so a
cut-short response never looks whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from ..wire import headers as hdr
from ..wire import serialize
from ..wire.framing import Request
from ..scheduling.backend import Backend
from ..tts.openai_speech import error_body
from ..scheduling.scheduler import NO_BACKEND, QUEUE_FULL, Ticket
from ..wire.timer import Deadline
from .phases import (BACKOFF, BUFFERING, CONNECT_BACKSTOP, CONNECTING, DONE, FALLBACK,
                     QUEUE_TIMEOUT, QUEUED, RECEIVING, SENDING, WAITING)
from . import speech_door
from .recovery import Recovery
from .streaming import Streaming
from .tunnel import Tunnelling

log = logging.getLogger("lb")

_NOTHING_TRIED: frozenset = frozenset()

if TYPE_CHECKING:
    from ..control.balancer import Balancer
    from ..wire.client import ClientConnection
    from ..wire.upstream import UpstreamConnection


class Exchange(Streaming, Recovery, Tunnelling):
    __slots__ = ("balancer", "client", "request", "request_id", "started", "phase",
                 "backend", "upstream", "_pending", "_pending_bytes", "_request_ended",
                 "_kept", "_kept_bytes", "info", "_deadline", "_connect_task",
                 "bytes_in", "bytes_out", "status", "ttfb", "note", "response_started",
                 "_upstream_request", "_sent_at", "_replaying", "_race_ok",
                 "ticket", "queued_for", "tried", "why", "_holding",
                 "_retrying", "_replay_failure", "kind", "pinned", "_fallback_task",
                 "fallback_reason", "served_by", "_drained", "_peek", "_fallback", "_open",
                 "_body_deadline", "_trailers", "splice", "ended")
    keeps_time = True       # (for the client connection: the exchange bounds itself)

    def __init__(self, balancer: "Balancer", client: "ClientConnection", request: Request):
        self.balancer = balancer
        self.client = client
        self.request = request
        self.request_id = request.request_id
        self.started = time.monotonic()
        self.phase = QUEUED
        self.backend: Backend | None = None   # of the current (or last) attempt
        self.upstream: UpstreamConnection | None = None
        self._pending: list[bytes] = []      # body not yet sent on this attempt
        self._pending_bytes = 0
        self._request_ended = False
        self._kept: list[bytes] | None = []  # the whole body so far, for a replay
        self._kept_bytes = 0
        self._replaying = False              # the next attach sends `_kept` from the start
        self._race_ok = False                # a keep-alive race resend is still possible
        self._replay_failure = (502, "")     # what the pending resend replaces, if it cannot go
        self._deadline = Deadline(balancer.loop, self._on_deadline)
        self._connect_task: asyncio.Task | None = None
        self._upstream_request = b""         # the request head as sent upstream
        self._body_deadline: Deadline | None = None   # timeouts.client_body
        self._trailers: list = []            # of a chunked request body
        self._sent_at = 0.0                   # when the request went out on `upstream`
        self._holding = False                 # this attempt holds a slot on `backend`
        self._open = False                    # this attempt has not ended in backend's counts
        self._retrying = False                # counted among the budget's retries
        self.ticket: Ticket | None = None     # our place in the queue while QUEUED
        self.queued_for = 0.0                 # seconds waited in the queue, in all
        self.tried: list[str] = []            # backend of each attempt
        self.why: list[str] = []              # why each failed attempt failed
        self.bytes_in = 0                     # request body bytes from the client
        self.bytes_out = 0                    # response body bytes to the client
        self.status = 0                       # what the client got (499: it left)
        self.ttfb: float | None = None
        self.note = ""                        # why it failed, for the access log
        self.response_started = False
        path = request.path
        # A TTS call of this kind may fall back to Cartesia; an upgrade never does.
        self.kind = None if request.upgrade else balancer.routes.get(path)
        self.pinned = balancer.affinity_for(path)   # the backend holding this audio file
        self._fallback_task: asyncio.Task | None = None
        self.fallback_reason = ""             # why the fleet could not serve it
        self.served_by = ""                   # "cartesia" when the fallback answered; for
                                              # the front door, who made the first audio
        self._drained: asyncio.Future | None = None
        self._peek: bytearray | None = None   # a two-step JSON answer, read for audio_url
        self._fallback = None                 # the Fallback this call was handed to
        self.splice = None                    # the tunnel after a 101 (see tunnel)
        self.ended = ""                       # why that tunnel ended, for the access log

    # --- getting a slot

    def start(self) -> None:
        self.balancer.retry.active += 1
        request = self.request
        if request.has_body:
            config = self.balancer.config
            self._body_deadline = Deadline(self.balancer.loop, self._body_timed_out)
            self._body_deadline.set(config.timeouts.client_body)
            if request.chunked or request.content_length <= config.retry.replay_max_bytes:
                # Received whole before a slot is taken: a GPU does nothing
                # while a slow client sends (a larger body is streamed, and
                # takes its slot now, or once it outgrows this buffer).
                self.phase = BUFFERING
                self._deadline.set(config.timeouts.idle)
                return
        self._get_backend()

    def _get_backend(self) -> None:
        if self.pinned is not None:
            # The second step of a two-step call: only that backend has the
            # file.  Fetching it is not GPU work, so it takes no slot.
            self._begin(self.pinned, hold=False)
            return
        if self.kind == "openai" and self.request.method == b"POST" and speech_door.take(self):
            return      # answered by the OpenAI front door (or refused there)
        self._acquire()

    def _acquire(self) -> None:
        if self.request.path in self.balancer.slotless:
            self._choose_slotless()     # a `slot = false` route (see tunnel)
            return
        scheduler = self.balancer.scheduler
        tried = self.tried
        result = scheduler.acquire(self, frozenset(tried) if tried else _NOTHING_TRIED,
                                   retry=bool(tried))
        if isinstance(result, Backend):
            self._begin(result)
        elif isinstance(result, Ticket):
            self.ticket = result
            self.phase = QUEUED
            self._deadline.set(self.balancer.config.balancer.queue_timeout)
        elif result == QUEUE_FULL:
            self._give_up(f"every backend is at its concurrency limit and the queue is full "
                          f"({scheduler.queue_limit} waiting, balancer.queue_limit)",
                          QUEUE_FULL)
        else:
            assert result == NO_BACKEND
            self.no_backend()

    def dispatch(self, backend: Backend) -> None:
        """The scheduler found us a slot (we were queued)."""
        self._left_queue()
        self._begin(backend)

    def no_backend(self) -> None:
        """No backend is in the rotation (all ejected, down, drained or in maintenance)."""
        self._left_queue()
        self._give_up("no backend available: " + self.balancer.why_no_backend(),
                      NO_BACKEND)

    def _left_queue(self) -> None:
        if self.ticket is not None:
            self.queued_for += time.monotonic() - self.ticket.since
            self.ticket = None

    def _quit_queue(self, timed_out: bool = False) -> None:
        """Give up our place in the queue (if we have one) ourselves."""
        if self.ticket is not None:
            self.balancer.scheduler.cancel(self.ticket, timed_out=timed_out)
            self._left_queue()

    def _queue_timed_out(self) -> None:
        self._quit_queue(timed_out=True)
        self._give_up(f"every backend stayed at its concurrency limit for "
                      f"{self.balancer.config.balancer.queue_timeout:g}s "
                      f"(balancer.queue_timeout)", QUEUE_TIMEOUT)

    def _give_up(self, reason: str, why: str) -> None:
        """The fleet cannot take this request now: Cartesia, if this is a TTS
        call and the fallback may take it (a full fleet only with spillover),
        else 503 with Retry-After."""
        if self.why:
            reason += " (after " + "; ".join(self.why) + ")"
        if ((why == NO_BACKEND or self.balancer.config.cartesia.spillover)
                and self._fall_back(503, reason, why)):
            return
        self._answer_error(503, reason, extra=[(b"retry-after", b"1")], code=why)

    # --- one attempt

    def _begin(self, backend: Backend, hold: bool = True) -> None:
        self.backend = backend
        self._holding = hold
        backend.attempt_started(took_slot=hold)
        self._open = True
        self.tried.append(backend.name)
        request = self.request
        self._upstream_request = serialize.request_head(
            request.method, request.target,
            hdr.to_backend(request.headers, client_ip=self.client.peer_ip,
                           request_id=self.request_id, chunked=request.chunked,
                           default_host=backend.host_header,
                           listed=request.connection_tokens, trailers=request.trailers_ok,
                           upgrade=request.upgrade))
        # An upgrade gets a connection of its own: a 101 makes it the tunnel's.
        conn = None if request.upgrade else backend.pool.acquire()
        if conn is not None:
            self._attach(conn, reused=True)
        else:
            self._connect()

    def _connect(self) -> None:
        self.phase = CONNECTING
        # The pool bounds connecting with timeouts.connect; this is the backstop.
        self._deadline.set(self.balancer.config.timeouts.connect + CONNECT_BACKSTOP)
        self._connect_task = self.balancer.loop.create_task(self._open_connection(self.backend))

    async def _open_connection(self, backend: Backend) -> None:
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
        if self.phase != CONNECTING or self.backend is not backend:
            backend.pool.release(conn)   # the client left, or this attempt was given up
            return
        self._attach(conn, reused=False)

    def _attach(self, conn: "UpstreamConnection", *, reused: bool) -> None:
        self.upstream = conn
        conn.owner = self
        self._race_ok = reused
        self._sent_at = time.monotonic()
        request = self.request
        conn.start(self, request.method, self._upstream_request, request.chunked,
                   bool(request.upgrade))
        if self._replaying:
            # The whole body so far; `_pending` is its tail, so it goes too.
            self._replaying = False
            for chunk in self._kept:
                conn.send_data(chunk)
        else:
            for chunk in self._pending:
                conn.send_data(chunk)
        self._pending.clear()
        self._pending_bytes = 0
        if self.client.write_paused:
            conn.pause_reading()
        if self._request_ended:
            conn.send_end(self._trailers)
            self._enter(WAITING)
        else:
            self._enter(SENDING)
        if not conn.write_paused:
            self.client.resume_reading_for_backpressure()
        else:
            self.client.pause_reading_for_backpressure()

    # --- timeouts

    def _enter(self, phase: int) -> None:
        self.phase = phase
        timeouts = self.balancer.config.timeouts
        self._deadline.set(timeouts.first_byte if phase == WAITING else timeouts.idle)

    def _on_deadline(self) -> None:
        timeouts = self.balancer.config.timeouts
        if self.phase == QUEUED:
            self._queue_timed_out()
        elif self.phase == BUFFERING:
            self._client_error(408, f"client sent no request body for {timeouts.idle:g}s")
        elif self.phase == FALLBACK:
            self._client_error(408, f"client sent no request body for {timeouts.idle:g}s")
        elif self.phase == BACKOFF:
            self._acquire()
        elif self.phase == CONNECTING:
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

    def _client_error(self, status: int, reason: str) -> None:
        """The client broke the rules mid-request: answer if we still can, drop the backend."""
        self._abandon(status, reason, close=True)

    def _abandon(self, status: int, reason: str, close: bool = False) -> None:
        """Drop the backend connection; answer `status` if nothing was sent yet,
        else end the client's response visibly broken."""
        self.note = reason
        self._drop_upstream()
        if self.response_started:
            self._finish()
            self.client.abort_response()
        else:
            self._answer_error(status, reason, close=close)

    def _answer_error(self, status: int, reason: str, close: bool = False,
                      extra: hdr.Headers = (), code: str | None = None,
                      param: str | None = None) -> None:
        self.status = status
        self.note = reason
        self._finish()
        if self.kind == "openai":   # the caller's own dialect: OpenAI's error object
            self.client.send_whole(status, b"application/json",
                                   error_body(status, reason, code=code, param=param),
                                   self.request_id, close=close, extra=extra)
            return
        self.client.send_error(status, reason, self.request_id, close=close, extra=extra)

    def _drop_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        if self._connect_task is not None:
            self._connect_task.cancel()
            self._connect_task = None

    def _release_slot(self) -> None:
        if self._holding:
            self._holding = False
            self.balancer.scheduler.release(self.backend)

    def _finish(self) -> None:
        """Release the backend slot and account, exactly once."""
        if self.phase == DONE:
            return
        self.phase = DONE
        self._deadline.cancel()
        if self._body_deadline is not None:
            self._body_deadline.cancel()
        self._drop_upstream()
        task = self._fallback_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._quit_queue()
        self._pending.clear()
        self._kept = None
        retry = self.balancer.retry
        retry.active -= 1
        if self._retrying:
            retry.retrying -= 1
            retry.remember(self.request_id, self.status, self.tried, self.why)
        backend = self.backend
        if self._open:   # given up before the backend answered: the client left, say
            self._open = False
            backend.record_abandoned()
        if backend is not None and not self.served_by:   # Cartesia's bytes are not its
            backend.bytes_sent += self.bytes_in
            backend.bytes_received += self.bytes_out
        self._release_slot()
        self.balancer.request_finished(self)
