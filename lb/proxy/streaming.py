"""The bodies' way through an exchange: request body in from the client,
response out from the backend, each side's reading paused while the other
side's write buffer is full (see `exchange` for the phases).  A mixin of
`Exchange`, its streaming half kept in a module of its own.
"""

from __future__ import annotations

import time

from ..wire import headers as hdr
from ..wire.framing import Response, clean_trailers
from ..scheduling.retry import status_reason
from .phases import AFFINITY_PEEK, BUFFERING, DONE, FALLBACK, RECEIVING, REPLAY_WINDOW, \
    SENDING, WAITING


class Streaming:
    """Client and backend callbacks, for `Exchange` (which has every attribute used here)."""
    __slots__ = ()

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
        elif self.phase == BUFFERING:
            self._pending.append(data)
            self._pending_bytes += len(data)
            self._deadline.set(self.balancer.config.timeouts.idle)
            if self._kept is None:
                self._get_backend()     # outgrew retry.replay_max_bytes: stream it
        else:   # queued, connecting, or between attempts
            self._pending.append(data)
            self._pending_bytes += len(data)
            if self._pending_bytes > limits.write_buffer_high:
                self.client.pause_reading_for_backpressure()

    def client_end(self, trailers: list = ()) -> None:
        if self.phase == DONE:
            return
        self._request_ended = True
        self._trailers = clean_trailers(trailers) if trailers else trailers
        if self._body_deadline is not None:
            self._body_deadline.cancel()
        if self.upstream is not None:
            self.upstream.send_end(trailers)
            if self.phase == SENDING:
                self._enter(WAITING)
        elif self.phase == FALLBACK and self._fallback_task is None:
            self._start_fallback()
        elif self.phase == BUFFERING:
            self._get_backend()

    def _body_timed_out(self) -> None:
        if self.phase != DONE and not self._request_ended:
            self._client_error(408, f"request body not received within timeouts.client_body "
                               f"({self.balancer.config.timeouts.client_body:g}s)")

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

    def upstream_response(self, response: Response) -> None:
        backend = self.backend
        status = response.status
        if self.request.upgrade:
            if status == 101:
                self._switch(response)      # a tunnel from here on (see tunnel)
                return
            backend.handshakes_refused += 1   # an ordinary answer, then
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
                                  hdr.to_client(response.headers, request_id=self.request_id,
                                                listed=response.connection_tokens,
                                                # (a Content-Length that does
                                                # not frame the body is dropped)
                                                chunked=response.chunked
                                                or response.until_close),
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

    def upstream_end(self, trailers: list = ()) -> None:
        if self._peek is not None:
            self.balancer.remember_audio_url(bytes(self._peek), self.backend)
            self._peek = None
        conn, self.upstream = self.upstream, None
        if conn.finish_for_reuse():
            self.backend.pool.release(conn)
        else:
            conn.close()
        self._finish()
        self.client.send_end(trailers)

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
