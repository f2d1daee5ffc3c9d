"""One client connection: an asyncio Protocol driving h11 as a SERVER.

It parses requests, answers the balancer's own endpoints and framing errors
itself, and hands every other request to an `Exchange`.  Pipelined requests
are answered in order for free: h11 reports PAUSED after a complete request
until its response is done, and keeps what follows in its buffer (we stop
reading the socket if that grows past a request head's worth).

Timers: a new connection must deliver a request head within
`timeouts.client_header`; between keep-alive requests the connection may sit
idle for `timeouts.idle`; once a request is under way the exchange's own
deadline takes over.

Writes are coalesced: everything produced while handling one read (response
head, body, end) goes out in one writelines() at the end of the loop
iteration, instead of one system call per h11 event.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from http import HTTPStatus
from typing import TYPE_CHECKING

import h11
import orjson

from . import endpoints
from . import headers as hdr
from .exchange import Exchange
from .timer import Deadline
from .writes import CoalescedWrites

if TYPE_CHECKING:
    from .balancer import Balancer

# Why client reading is paused (bits, so the reasons do not undo each other).
_PIPELINE = 1       # too much arrived behind a request still being answered
_BACKPRESSURE = 2   # the backend side cannot take more request body yet

LINGER = 2.0  # seconds to read and discard after our FIN before closing

_Data = h11.Data
_Request = h11.Request
_EndOfMessage = h11.EndOfMessage
_NEED_DATA = h11.NEED_DATA
_PAUSED = h11.PAUSED
_END = h11.EndOfMessage()
_CONTINUE = h11.InformationalResponse(status_code=100, headers=[])
_REQUEST_COMPLETE = (h11.DONE, h11.MUST_CLOSE, h11.MIGHT_SWITCH_PROTOCOL)
_MUST_CLOSE = h11.MUST_CLOSE


def _reset(transport: asyncio.Transport) -> None:
    """Close with an RST, not a FIN (abort() alone still sends FIN)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


class ClientConnection(CoalescedWrites, asyncio.Protocol):
    __slots__ = ("balancer", "h11", "transport", "peer_ip", "exchange", "write_paused",
                 "_loop", "_read_block", "_deadline", "_processing", "_closed",
                 "_waiting_head", "_head_seen", "_head_request", "_local", "_limits",
                 "_timeouts", "_out", "_out_bytes", "_flush_at", "_flush_scheduled", "_answering")

    def __init__(self, balancer: "Balancer"):
        self.balancer = balancer
        self._loop = balancer.loop
        self._limits = balancer.config.limits
        self._timeouts = balancer.config.timeouts
        self.h11 = self._new_h11()
        self.transport: asyncio.Transport | None = None
        self.peer_ip = "-"
        self.exchange: Exchange | None = None
        self.write_paused = False
        self._read_block = 0
        self._deadline = Deadline(self._loop, self._on_deadline)
        self._processing = False
        self._closed = False
        self._waiting_head = True   # between requests (keep-alive idle or head arriving)
        self._head_seen = True      # bytes of the awaited head have arrived
        self._head_request = False  # the current request is HEAD: answers carry no body
        self._local = None          # (request, id, handler) of a built-in endpoint request
        self._out: list[bytes] = []  # coalesced writes, flushed once per loop iteration
        self._out_bytes = 0
        self._flush_at = self._limits.write_buffer_high
        self._flush_scheduled = False
        self._answering = False     # a complete request awaits its response (h11 PAUSED)

    def _new_h11(self) -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self._limits.max_header_bytes)

    # --- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        high = self._limits.write_buffer_high
        transport.set_write_buffer_limits(high=high, low=high // 4)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_ip = peer[0]
        self._deadline.set(self._timeouts.client_header)
        self.balancer.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        if self._closed or self.h11.their_state is _MUST_CLOSE:
            # Lingering after our FIN, or bytes after the last request an
            # HTTP/1.0 (or Connection: close) client may send: discard.
            return
        if self._waiting_head and not self._head_seen:
            # Some clients send a stray CRLF after a body (RFC 9112 §2.2
            # says to ignore it); h11 would call it a missing request line.
            data = data.lstrip(b"\r\n")
            if not data:
                return
            # First bytes of a new request on an idle keep-alive connection:
            # from now on the head must complete within client_header.
            self._head_seen = True
            self._deadline.set(self._timeouts.client_header)
        self.h11.receive_data(data)
        if self._answering:
            self._limit_pipeline()
            return
        self._process()

    def eof_received(self) -> bool:
        # A client that stops sending has given up on its call, as far as a
        # TTS caller goes (HTTP clients do not half-close to await an answer).
        # Close now, so connection_lost frees the backend and its GPU slot at
        # once, as HAProxy's abortonclose does.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._out = []
        self._deadline.cancel()
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.client_lost()
        self.balancer.connection_closed(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.exchange is not None:
            self.exchange.client_write_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.exchange is not None:
            self.exchange.client_write_resumed()

    # --- request parsing

    def _process(self) -> None:
        if self._processing:
            return  # re-entered from a response completing; the outer loop continues
        self._processing = True
        try:
            h = self.h11
            while not self._closed and h.their_state is not _MUST_CLOSE:
                try:
                    event = h.next_event()
                except h11.RemoteProtocolError as exc:
                    self._bad_request(exc)
                    return
                kind = type(event)
                if kind is _Data:
                    if self.exchange is not None:
                        self.exchange.client_data(event.data)
                elif event is _NEED_DATA:
                    return
                elif kind is _Request:
                    self._on_request(event)
                elif kind is _EndOfMessage:
                    if self.exchange is not None:
                        self.exchange.client_end()
                    elif self._local is not None:
                        local, self._local = self._local, None
                        self.balancer.local_request(self, *local)
                elif event is _PAUSED:
                    self._answering = True
                    self._limit_pipeline()
                    return
                else:  # ConnectionClosed (not fed to h11 today: we close on EOF)
                    self.close()
                    return
        finally:
            self._processing = False

    def _limit_pipeline(self) -> None:
        """Pipelined requests wait in h11's buffer: stop reading past a head's worth."""
        if len(self.h11.trailing_data[0]) > self._limits.max_header_bytes:
            self._block_reading(_PIPELINE)

    def _on_request(self, request: h11.Request) -> None:
        # The keep-alive/head deadline is left to fire and find a request
        # under way, rather than cancelled and re-armed for every request.
        self._waiting_head = False
        self._head_request = request.method == b"HEAD"
        info = hdr.inspect_request(request)
        if info.head_size > self._limits.max_header_bytes:
            # h11 only limits heads that arrive in pieces; one that arrives
            # whole in a single read is measured here.
            self.balancer.reject(self, request, info.request_id, 431, self._head_too_large())
            return
        path = request.target.split(b"?", 1)[0]
        route = endpoints.route(path, self.balancer)
        if route is not None:
            # Answered once the request (and any body, discarded) is complete,
            # so the connection stays usable for the next request.
            self._local = (request, info.request_id, route)
            self._deadline.set(self._timeouts.idle)
            return
        problem = info.problem
        if problem is None and request.method == b"CONNECT":
            problem = "CONNECT is not supported"
        if problem is not None:
            self.balancer.reject(self, request, info.request_id, 400, problem)
            return
        length = info.content_length
        if length is not None and length > self._limits.max_body_bytes:
            self.balancer.reject(self, request, info.request_id, 413,
                                 f"request body of {length} bytes is larger than "
                                 f"limits.max_body_bytes ({self._limits.max_body_bytes})")
            return
        if self.h11.they_are_waiting_for_100_continue:
            self._send(_CONTINUE)
        self.exchange = Exchange(self.balancer, self, request, info)
        self.exchange.start()

    def _bad_request(self, exc: h11.RemoteProtocolError) -> None:
        # h11 hints 501 for transfer codings it does not know or repeated
        # Transfer-Encoding headers: ambiguous framing, a 400 for a proxy.
        status = 431 if exc.error_status_hint == 431 else 400
        reason = self._head_too_large() if status == 431 else f"malformed request: {exc}"
        if self.exchange is not None:
            # Broken framing in the middle of a proxied request body.
            self.exchange.client_bad_body(reason)
            return
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self.balancer.reject(self, None, hdr.new_request_id(), status, reason)
        else:
            self.close()

    def _head_too_large(self) -> str:
        return (f"request head larger than limits.max_header_bytes "
                f"({self._limits.max_header_bytes} bytes)")

    # --- responses (used by the exchange and the balancer)

    def send_response(self, status: int, headers: hdr.Headers, reason: bytes = b"") -> None:
        # Complete: DONE, MUST_CLOSE (HTTP/1.0 or Connection: close), or
        # MIGHT_SWITCH_PROTOCOL (it offered an Upgrade, which this non-101
        # answer declines; h11 then counts it as DONE).
        if self.h11.their_state not in _REQUEST_COMPLETE or self.balancer.draining:
            # The request body is still coming and nobody will read it, or
            # the balancer is shutting down: this connection cannot carry
            # another request.
            headers.append((b"connection", b"close"))
        self._send(hdr.response_event(status, headers, reason or _reason(status)))

    def send_data(self, data: bytes) -> None:
        if not self._closed:
            self._write(self.h11.send_with_data_passthrough(_Data(data=data)), len(data))

    def send_end(self) -> None:
        if self._closed:
            return
        self._send(_END)
        self._response_complete()

    def send_error(self, status: int, reason: str, request_id: str, *,
                   close: bool = False, extra: hdr.Headers = ()) -> None:
        """A complete JSON error answer made by the balancer."""
        body = orjson.dumps({"error": reason, "request_id": request_id})
        self.send_whole(status, b"application/json", body, request_id, close=close, extra=extra)

    def send_whole(self, status: int, content_type: bytes, body: bytes, request_id: str, *,
                   close: bool = False, extra: hdr.Headers = ()) -> None:
        if self._closed:
            return
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self.abort_response()
            return
        headers = [(b"content-type", content_type),
                   (b"content-length", str(len(body)).encode("ascii")),
                   (b"x-request-id", request_id.encode("ascii")), *extra]
        if close:
            headers.append((b"connection", b"close"))
        self.send_response(status, headers)
        if body and not self._head_request:
            self._send(_Data(data=body))
        self.send_end()

    def abort_response(self) -> None:
        """End a response visibly broken: close without finishing the body.

        What was already written is flushed, then FIN; the client sees a
        chunked body without its last chunk, or fewer bytes than Content-Length.
        An HTTP/1.0 client reads a body without Content-Length until the
        connection closes, where FIN would look like a normal end: it gets a
        reset instead.
        """
        self.exchange = None
        if self.h11.their_http_version == b"1.0" and not self._closed:
            self._closed = True
            self._deadline.cancel()
            self._out = []
            _reset(self.transport)
            return
        self.close()

    def drain(self) -> None:
        """The balancer is shutting down: close now if between requests, else
        after the response under way (send_response marks it Connection: close)."""
        if self._waiting_head and not self._head_seen and self.exchange is None \
                and self._local is None:
            self.close()

    def close(self) -> None:
        """Close after what was written is flushed, with a lingering read.

        Closing a socket with unread request bytes in the kernel makes it send
        an RST, which can destroy the error answer we just wrote (say a 413
        to a client still uploading).  So send FIN first, keep reading and
        discarding for up to LINGER seconds, and close when the client does.
        """
        if self._closed:
            return
        self._flush()
        self._closed = True
        self._deadline.cancel()
        transport = self.transport
        if transport.is_closing():
            return
        try:
            transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            transport.close()
            return
        if self._read_block:
            self._read_block = 0
            transport.resume_reading()
        self._loop.call_later(LINGER, self._end_linger, LINGER)

    def _end_linger(self, waited: float) -> None:
        """After LINGER: close.  If what we wrote is still not read, give the
        client up to `timeouts.idle` in all, then drop the connection: a peer
        that never reads must not hold a descriptor and a slot for ever
        (transport.close() alone waits for the write buffer to drain)."""
        transport = self.transport
        if transport.is_closing():
            transport.abort()   # close() is already waiting on an undrained buffer
        elif transport.get_write_buffer_size() == 0:
            transport.close()
        elif waited >= self._timeouts.idle:
            transport.abort()
        else:
            self._loop.call_later(LINGER, self._end_linger, waited + LINGER)

    # --- flow control

    def pause_reading_for_backpressure(self) -> None:
        self._block_reading(_BACKPRESSURE)

    def resume_reading_for_backpressure(self) -> None:
        self._unblock_reading(_BACKPRESSURE)

    def _block_reading(self, reason: int) -> None:
        if not self._read_block and not self._closed:
            self.transport.pause_reading()
        self._read_block |= reason

    def _unblock_reading(self, reason: int) -> None:
        if self._read_block & reason:
            self._read_block &= ~reason
            if not self._read_block and not self._closed:
                self.transport.resume_reading()

    # --- internals

    def _send(self, event) -> None:
        self._write(self.h11.send_with_data_passthrough(event))

    def _can_write(self) -> bool:
        return not self._closed  # after close() has sent FIN (write_eof), nothing more

    def _response_complete(self) -> None:
        self.exchange = None
        h = self.h11
        if (h.our_state is h11.MUST_CLOSE or h.their_state is not h11.DONE
                or self.balancer.draining):
            # (a response whose head went out before the drain began did not
            # say Connection: close; the client sees the close instead)
            self.close()
            return
        h.start_next_cycle()
        self._waiting_head = True
        self._head_request = False
        self._answering = False
        leftover = h.trailing_data[0]
        if leftover[:1] in (b"\r", b"\n"):
            # A stray CRLF after the last body (RFC 9112 §2.2: ignore it).
            # h11 would reject it as a missing request line, so start a
            # fresh parser, as between requests, with the rest.
            leftover = leftover.lstrip(b"\r\n")
            self.h11 = h = self._new_h11()
            if leftover:  # (receive_data(b"") would mean end of stream)
                h.receive_data(leftover)
        # Part of the next head may be here already (pipelining): then it is
        # already on the head's clock, not the keep-alive one.
        self._head_seen = bool(leftover)
        self._deadline.set(self._timeouts.client_header if self._head_seen
                           else self._timeouts.idle)
        self._unblock_reading(_PIPELINE | _BACKPRESSURE)
        self._process()  # a pipelined request may already be buffered

    def _on_deadline(self) -> None:
        if self.exchange is not None or self._closed:
            return  # a request is under way: the exchange keeps time
        if self._local is not None:
            self.close()  # a body for a built-in endpoint that never ended
        elif self.h11.trailing_data[0]:
            # Part of a head arrived but not all of it in time (slowloris).
            self.balancer.reject(self, None, hdr.new_request_id(), 408,
                                 f"request head not received within "
                                 f"timeouts.client_header ({self._timeouts.client_header:g}s)")
        elif self._waiting_head:
            self.close()  # idle keep-alive connection: close quietly
