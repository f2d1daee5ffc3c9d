"""One proxied request's life: a slot, forward, stream back, recover, account.

A request first gets a slot on a backend from the scheduler, or waits in its
queue (QUEUED).  Then it is forwarded; bodies stream both ways with
backpressure: while no backend connection is ready, request body chunks wait
in `_pending` and the client is paused once that passes the high-water mark;
after that, each side's reading pauses while the other side's write buffer
is above its high-water mark.  The one other copy is `_kept`: the request
body so far, for a resend, held until the response head arrives and dropped
for good once it passes `retry.replay_max_bytes`.

One `Deadline` watches the whole exchange; what it means depends on the phase:

    QUEUED     waiting for a slot            -> `balancer.queue_timeout`, then 503
    SENDING    request body still coming     -> `timeouts.idle` of silence
    WAITING    request sent, no response yet -> `timeouts.first_byte`
    RECEIVING  response body streaming       -> `timeouts.idle` of silence
    BACKOFF    between two attempts          -> the jittered back-off
    FALLBACK   handed to Cartesia            -> `timeouts.idle` while the body
                                                still comes, then the fallback's
                                                own `fallback.cartesia.timeout`

(connecting is bounded by `timeouts.connect` in the pool).

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

import h11

from . import headers as hdr
from . import translate
from .backend import Backend
from .cartesia import CartesiaError
from .latency import FALLBACK_BACKEND
from .retry import DENIED_BODY_TOO_LARGE, DENIED_BUDGET, RETRYABLE_KINDS, status_reason
from .scheduler import NO_BACKEND, QUEUE_FULL, Ticket
from .timer import Deadline

log = logging.getLogger("lb")

if TYPE_CHECKING:
    from .balancer import Balancer
    from .client import ClientConnection
    from .upstream import UpstreamConnection

QUEUED, CONNECTING, SENDING, WAITING, RECEIVING, BACKOFF, FALLBACK, DONE = range(8)

# A backend's JSON answer to a two-step call is read (up to this much) for
# its audio_url, so the follow-up GET goes to the backend that has the file.
AFFINITY_PEEK = 64 * 1024

# The keep-alive race: a backend closes an idle pooled connection just as we
# send a request on it.  Such a request was never processed, so it is sent
# again once, to the same backend on a fresh connection, if its body is still
# kept and the loss came within REPLAY_WINDOW seconds of sending.  That is
# not a retry and not the backend's failure.  A later loss means the backend
# may have worked on it: a failure, which may be retried elsewhere.
REPLAY_WINDOW = 0.25

# While connecting, a backstop beyond timeouts.connect in case the connect
# task dies in a way nobody foresaw: the request must not hang.
CONNECT_BACKSTOP = 1.0

# Why a call went to Cartesia (balancer.fallbacks; /metrics shows each from
# the start), besides status_reason(NNN) for a backend's 5xx answer.
QUEUE_TIMEOUT = "queue_timeout"
FALLBACK_FAILED = "failed"        # the last attempt failed with no response
FALLBACK_REASONS = (NO_BACKEND, QUEUE_FULL, QUEUE_TIMEOUT, FALLBACK_FAILED)

_EndOfMessage = h11.EndOfMessage()


class Exchange:
    __slots__ = ("balancer", "client", "request", "request_id", "started", "phase",
                 "backend", "upstream", "_pending", "_pending_bytes", "_request_ended",
                 "_kept", "_kept_bytes", "info", "_deadline", "_connect_task",
                 "bytes_in", "bytes_out", "status", "ttfb", "note", "response_started",
                 "_upstream_request", "_sent_at", "_replaying", "_race_ok",
                 "ticket", "queued_for", "tried", "why", "_holding",
                 "_retrying", "_replay_failure", "kind", "pinned", "_fallback_task",
                 "fallback_reason", "served_by", "_drained", "_peek", "_fallback", "_open")

    def __init__(self, balancer: "Balancer", client: "ClientConnection",
                 request: h11.Request, info: hdr.RequestInfo):
        self.balancer = balancer
        self.client = client
        self.request = request
        self.info = info
        self.request_id = info.request_id
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
        self._upstream_request: h11.Request | None = None
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
        path = request.target.split(b"?", 1)[0]
        self.kind = balancer.routes.get(path)  # a TTS call of this kind: may fall back
        self.pinned = balancer.affinity_for(path)   # the backend holding this audio file
        self._fallback_task: asyncio.Task | None = None
        self.fallback_reason = ""             # why the fleet could not serve it
        self.served_by = ""                   # "cartesia" when the fallback answered
        self._drained: asyncio.Future | None = None
        self._peek: bytearray | None = None   # a two-step JSON answer, read for audio_url
        self._fallback = None                 # the Fallback this call was handed to

    # --- getting a slot

    def start(self) -> None:
        self.balancer.retry.active += 1
        if self.pinned is not None:
            # The second step of a two-step call: only that backend has the
            # file.  Fetching it is not GPU work, so it takes no slot.
            self._begin(self.pinned, hold=False)
            return
        self._acquire()

    def _acquire(self) -> None:
        scheduler = self.balancer.scheduler
        result = scheduler.acquire(self, frozenset(self.tried), retry=bool(self.tried))
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
        self._answer_error(503, reason, extra=[(b"retry-after", b"1")])

    # --- one attempt

    def _begin(self, backend: Backend, hold: bool = True) -> None:
        self.backend = backend
        self._holding = hold
        backend.attempt_started(took_slot=hold)
        self._open = True
        self.tried.append(backend.name)
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
        conn.send(self._upstream_request)
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
        limits = self.balancer.config.limits
        if self.bytes_in > limits.max_body_bytes:
            self._client_error(413, "request body larger than limits.max_body_bytes "
                               f"({limits.max_body_bytes} bytes)")
            return
        if self._kept is not None:
            self._kept_bytes += len(data)
            if self._kept_bytes <= self.balancer.config.retry.replay_max_bytes:
                self._kept.append(data)
            else:
                self._kept = None    # streamed on; this request cannot be sent again
                if self._replaying:
                    # A resend was waiting for a backend (queued, backing off,
                    # connecting) and the body it must send whole no longer is.
                    self._cannot_replay()
                    return
        if self.upstream is not None:
            self._deadline.set(self.balancer.config.timeouts.idle)
            self.upstream.send_data(data)
        elif self.phase == FALLBACK:
            self._deadline.set(self.balancer.config.timeouts.idle)
        else:   # queued, connecting, or between attempts
            self._pending.append(data)
            self._pending_bytes += len(data)
            if self._pending_bytes > limits.write_buffer_high:
                self.client.pause_reading_for_backpressure()

    def client_end(self) -> None:
        if self.phase == DONE:
            return
        self._request_ended = True
        if self.upstream is not None:
            self.upstream.send(_EndOfMessage)
            if self.phase == SENDING:
                self._enter(WAITING)
        elif self.phase == FALLBACK and self._fallback_task is None:
            self._start_fallback()

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
            self.upstream = None
        self._finish()

    def client_write_paused(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def client_write_resumed(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
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
        status = response.status_code
        self._open = False
        backend.record_response(status)
        config = self.balancer.config
        if status in config.passive.statuses:
            self.balancer.scheduler.failed(backend, local=False,
                                           reason=f"answered {status}")
        else:
            self.balancer.scheduler.succeeded(backend)
        if status in config.retry.statuses and self._may_retry(f"{backend.name} answered {status}"):
            self._drop_upstream()
            self._retry(status, f"backend {backend.name} answered {status}", status_reason(status))
            return
        if status >= 500 and self._fall_back(status, f"backend {backend.name} answered {status}",
                                             status_reason(status)):
            return
        if self.kind == "chatterbox" and status == 200:
            self._peek = bytearray()
        self.status = status
        self.ttfb = time.monotonic() - self.started
        self.response_started = True
        self._kept = None
        self._race_ok = False
        self._enter(RECEIVING)
        self.client.send_response(status,
                                  hdr.to_client(hdr.as_list(response.headers),
                                                request_id=self.request_id),
                                  response.reason)

    def upstream_data(self, data: bytes) -> None:
        if self._peek is not None:
            if len(self._peek) + len(data) <= AFFINITY_PEEK:
                self._peek += data
            else:
                self._peek = None
        self.bytes_out += len(data)
        self._deadline.set(self.balancer.config.timeouts.idle)
        self.client.send_data(data)

    def upstream_end(self) -> None:
        if self._peek is not None:
            self.balancer.remember_audio_url(bytes(self._peek), self.backend)
            self._peek = None
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
        if (not self.response_started and self._race_ok and self._kept is not None
                and time.monotonic() - self._sent_at < REPLAY_WINDOW):
            # The keep-alive race (see REPLAY_WINDOW): send it again on a
            # fresh connection.  Only once: a second loss is the backend's.
            self._race_ok = False
            self._replaying = True
            self._replay_failure = (502, f"backend {self.backend.name} closed a reused "
                                         "connection before answering")
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
        if self.phase == QUEUED:
            self._queue_timed_out()
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

    # --- failures and retries

    def _fail(self, kind: str, status: int, reason: str) -> None:
        """The backend failed us: count it, then retry, answer, or break the response."""
        if self.phase == DONE:
            return
        backend = self.backend
        backend.record_failure(kind, reason, ends_attempt=self._open)
        self._open = False
        self.balancer.scheduler.failed(backend, local=True, reason=reason)
        if (not self.response_started and kind in RETRYABLE_KINDS
                and self._may_retry(reason)):
            self._drop_upstream()
            self._retry(status, reason, kind)
            return
        if not self.response_started and self._fall_back(status, reason, FALLBACK_FAILED):
            return
        self._abandon(status, reason)

    def _may_retry(self, reason: str) -> bool:
        """Is another attempt allowed?  Records why the failed one failed, and
        why there will be no retry when there is none."""
        self.why.append(reason)
        retry = self.balancer.retry
        if len(self.tried) >= retry.cfg.attempts or self.pinned is not None:
            return False
        if self._kept is None:
            retry.denied[DENIED_BODY_TOO_LARGE] += 1
            self.why.append(f"not retried: request body over retry.replay_max_bytes "
                            f"({retry.cfg.replay_max_bytes} bytes)")
            return False
        if not self._retrying and not retry.allows():
            retry.denied[DENIED_BUDGET] += 1
            self.why.append("not retried: retry budget spent (retry.budget_percent)")
            return False
        return True

    def _cannot_replay(self) -> None:
        self.balancer.retry.denied[DENIED_BODY_TOO_LARGE] += 1
        self.why.append(f"resend given up: request body grew over retry.replay_max_bytes "
                        f"({self.balancer.config.retry.replay_max_bytes} bytes)")
        status, reason = self._replay_failure
        self._abandon(status, reason)

    def _retry(self, status: int, reason: str, kind: str) -> None:
        retry = self.balancer.retry
        retry.retries += 1
        retry.by_reason[kind] += 1
        self._replay_failure = (status, reason)
        if not self._retrying:
            self._retrying = True
            retry.retrying += 1
        self._release_slot()
        self._pending.clear()
        self._pending_bytes = 0
        self._replaying = True
        self._race_ok = False
        self.phase = BACKOFF
        self._deadline.set(retry.backoff(len(self.tried)))

    # --- the Cartesia fallback

    def _fall_back(self, status: int, reason: str, why: str) -> bool:
        """Hand the call to Cartesia if it is a TTS call the fallback may take;
        True if this exchange is now answered that way (or refused for it)."""
        fallback = self.balancer.fallback
        if (fallback is None or self.kind is None or self.response_started
                or self.phase == DONE or self.request.method != b"POST"):
            return False
        if self._kept is None:
            self.why.append("no fallback: request body over retry.replay_max_bytes")
            return False
        self._drop_upstream()
        self._release_slot()
        self._quit_queue()
        self._deadline.cancel()
        if not fallback.client.usable:
            self._answer_error(503, f"{reason}; the Cartesia fallback is unusable: "
                               f"{fallback.client.unusable_reason}",
                               extra=[(b"retry-after", b"1")])
            return True
        self.balancer.fallbacks[why] += 1
        self._fallback = fallback   # kept: a reload may replace balancer.fallback meanwhile
        if self._retrying:
            # Its retries are over: it no longer counts against the retry budget.
            self._retrying = False
            self.balancer.retry.retrying -= 1
            self.balancer.retry.remember(self.request_id, 0, self.tried, self.why)
        self.phase = FALLBACK
        self.fallback_reason = reason
        self._replaying = True                 # the whole body is needed, as for a resend
        self._replay_failure = (status, reason)
        self._pending.clear()
        self._pending_bytes = 0
        self.client.resume_reading_for_backpressure()
        if self._request_ended:
            self._start_fallback()
        else:
            self._deadline.set(self.balancer.config.timeouts.idle)   # the rest of the body
        return True

    def _start_fallback(self) -> None:
        self._deadline.cancel()   # fallback.cartesia.timeout bounds it from here
        self._fallback_task = self.balancer.loop.create_task(self._serve_fallback())

    async def _serve_fallback(self) -> None:
        content_type = next((v.decode("latin-1") for k, v in self.request.headers
                             if k == b"content-type"), "")
        try:
            call = translate.read_call(self.kind, self.request.target.split(b"?", 1)[0]
                                       .decode("ascii", "replace"), content_type,
                                       b"".join(self._kept))
        except translate.BadRequest as exc:
            self._answer_error(400, f"{self.fallback_reason}; the call cannot be sent to "
                               f"Cartesia: {exc}")
            return
        self._kept = None
        self.served_by = FALLBACK_BACKEND
        try:
            await self._fallback.answer(call, _ToClient(self))
        except ClientStalled:
            if self.phase != DONE:
                self._abandon(504, f"client read nothing for "
                              f"{self.balancer.config.timeouts.idle:g}s")
            return
        except CartesiaError as exc:
            if self.phase == DONE:
                return
            reason = f"{self.fallback_reason}; fallback to Cartesia failed: {exc.reason}"
            if self.response_started:
                self.note = reason
                self._finish()
                self.client.abort_response()
            else:
                self._answer_error(503, reason, extra=[(b"retry-after", b"1")])
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # a bug must not leave the caller hanging
            # Only the type: a message from deep inside could quote the API key.
            log.error("fallback call %s failed: %s", self.request_id, type(exc).__name__)
            if self.phase != DONE:
                self._abandon(500, f"{self.fallback_reason}; the fallback failed "
                              f"({type(exc).__name__})")
            return
        if self.phase == DONE:
            return
        self.note = f"fallback: {self.fallback_reason}"
        self._finish()
        self.client.send_end()

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
                      extra: hdr.Headers = ()) -> None:
        self.status = status
        self.note = reason
        self._finish()
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


class _ToClient:
    """The fallback's view of the client connection (see fallback.Output)."""
    __slots__ = ("exchange",)

    def __init__(self, exchange: Exchange):
        self.exchange = exchange

    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        ex = self.exchange
        ex.status = status
        ex.ttfb = time.monotonic() - ex.started
        ex.response_started = True
        ex.client.send_response(status, [*headers, (b"x-request-id",
                                                    ex.request_id.encode("ascii"))])

    def data(self, chunk: bytes) -> None:
        ex = self.exchange
        ex.bytes_out += len(chunk)
        ex.client.send_data(chunk)

    async def drained(self) -> None:
        """Wait while the client's write buffer is full, at most timeouts.idle."""
        ex = self.exchange
        if ex.client.write_paused and ex.phase != DONE:
            ex._drained = ex.balancer.loop.create_future()
            try:
                await asyncio.wait_for(ex._drained, ex.balancer.config.timeouts.idle)
            except asyncio.TimeoutError:
                raise ClientStalled() from None
            finally:
                ex._drained = None


class ClientStalled(Exception):
    """The caller stopped reading the fallback's answer."""
