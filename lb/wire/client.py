"""One client connection: an asyncio Protocol around an engine's request parser.

It reads requests one at a time (the engine holds a pipelined request until
the answer before it is done), applies the balancer's framing rules
(`framing`), answers framing errors itself and hands every accepted request
to the application (`app.open_request`), which returns its handler: an
exchange that proxies it, or a built-in endpoint.  Responses are written
here with `serialize`, whichever engine parsed the request.

Timers: a new connection must deliver a request head within
`timeouts.client_header`; between keep-alive requests the connection may sit
idle for `timeouts.idle`; once a request is under way its handler keeps time
(`handler.keeps_time`), else the connection allows `timeouts.idle`.

Writes are coalesced (`CoalescedWrites`): everything produced while handling
one read goes out in one writelines() at the end of the loop iteration.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import orjson

from . import serialize
from .framing import Refused, Request, check_request, clean_trailers, new_request_id, \
    skip_empty_lines, trailers_problem
from .ports import App, Handler
from .timer import Deadline
from .writes import CoalescedWrites

# Why client reading is paused (bits, so the reasons do not undo each other).
_PIPELINE = 1       # too much arrived behind a request still being answered
_BACKPRESSURE = 2   # the backend side cannot take more request body yet

LINGER = 2.0  # seconds to read and discard after our FIN before closing

_NO_BODY = frozenset({204, 304})


def _reset(transport: asyncio.Transport) -> None:
    """Close with an RST, not a FIN (abort() alone still sends FIN)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


class ClientConnection(CoalescedWrites, asyncio.Protocol):
    __slots__ = ("app", "parser", "transport", "peer_ip", "exchange", "write_paused",
                 "_loop", "_read_block", "_deadline", "_closed",
                 "_waiting_head", "_head_seen", "_request", "_request_done", "_limits",
                 "_timeouts", "_out", "_out_bytes", "_flush_at", "_flush_scheduled",
                 "_answering", "_started", "_body_allowed", "_chunked", "_close_after",
                 "_last", "engine")

    def __init__(self, app: App, parser_class: Any, limits: Any, timeouts: Any,
                 engine: str = ""):
        self.app = app
        self.engine = engine
        self._loop = app.loop
        self._limits = limits
        self._timeouts = timeouts
        self.parser = parser_class(self, limits.max_header_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer_ip = "-"
        self.exchange: Handler | None = None    # the current request's handler
        self.write_paused = False
        self._read_block = 0
        self._deadline = Deadline(self._loop, self._on_deadline)
        self._closed = False
        self._waiting_head = True   # between requests (keep-alive idle or head arriving)
        self._head_seen = False     # bytes of the awaited head have arrived
        self._request: Request | None = None
        self._request_done = False  # the current request (and its body) was read whole
        self._last = False          # no request may follow the current one
        self._out: list[bytes] = []  # coalesced writes, flushed once per loop iteration
        self._out_bytes = 0
        self._flush_at = limits.write_buffer_high
        self._flush_scheduled = False
        self._answering = False     # a complete request awaits its response
        self._started = False       # the current response's head is written
        self._body_allowed = True
        self._chunked = False
        self._close_after = False

    # --- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        high = self._limits.write_buffer_high
        transport.set_write_buffer_limits(high=high, low=high // 4)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_ip = peer[0]
        self._deadline.set(self._timeouts.client_header)
        self.app.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        if self._closed or (self._last and self._request_done):
            # Lingering after our FIN, or bytes after the last request an
            # HTTP/1.0 (or Connection: close) client may send: discard.
            return
        if self._waiting_head and not self._head_seen and skip_empty_lines(data):
            # First bytes of a new request on an idle keep-alive connection
            # (empty lines before it do not count, RFC 9112 §2.2): from now
            # on the head must complete within client_header.
            self._head_seen = True
            self._deadline.set(self._timeouts.client_header)
        self.parser.feed(data)
        if self._answering:
            self._limit_pipeline()

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
        self.app.connection_closed(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.exchange is not None:
            self.exchange.client_write_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.exchange is not None:
            self.exchange.client_write_resumed()

    # --- the engine's events (see engines)

    def on_head(self, method: bytes, target: bytes, version: bytes, headers: list,
                size: int) -> None:
        if self._closed:
            return
        # The keep-alive/head deadline is left to fire and find a request
        # under way, rather than cancelled and re-armed for every request.
        self._waiting_head = False
        self._request_done = False
        self._started = False
        limits = self._limits
        try:
            request = check_request(method, target, version, headers, size,
                                    limits.max_header_bytes)
        except Refused as exc:
            self.app.reject(self, None, new_request_id(), exc.status, exc.reason)
            return
        self._request = request
        self._last = not request.keep_alive
        length = request.content_length
        if length is not None and length > limits.max_body_bytes:
            self.app.reject(self, request, request.request_id, 413,
                            f"request body of {length} bytes is larger than "
                            f"limits.max_body_bytes ({limits.max_body_bytes})")
            return
        handler = self.app.open_request(self, request)
        if handler is None:     # answered and closed already
            return
        self.exchange = handler
        if not handler.keeps_time:
            self._deadline.set(self._timeouts.idle)
        elif request.expect_continue:
            self._write([serialize.CONTINUE])

    def on_body(self, data: bytes) -> None:
        if self.exchange is not None and not self._closed:
            self.exchange.client_data(data)

    def on_end(self, trailers: list) -> None:
        if self._closed:
            return
        if trailers:
            problem = trailers_problem(trailers)
            if problem is not None:
                self.on_error(400, problem)
                return
        self._request_done = True
        self._answering = True
        if self.exchange is not None:
            self.exchange.client_end(trailers)
        else:
            self._limit_pipeline()

    def on_error(self, status: int, reason: str) -> None:
        if self._closed:
            return
        if self.exchange is not None:
            # Broken framing in the middle of a request body.
            self.exchange.client_bad_body(reason)
        elif not self._started:
            self.app.reject(self, None, new_request_id(), status, reason)
        else:
            self.close()

    def _limit_pipeline(self) -> None:
        """Pipelined requests wait in the engine: stop reading past a head's worth."""
        if self.parser.buffered() > self._limits.max_header_bytes:
            self._block_reading(_PIPELINE)

    # --- responses (used by the exchange and the balancer)

    @property
    def http_version(self) -> bytes:
        request = self._request
        return request.version if request is not None else b"1.1"

    def send_response(self, status: int, headers: list, reason: bytes = b"",
                      close: bool = False) -> None:
        """Write a response head; its framing is settled here: the backend's
        Content-Length is kept, any other body goes out chunked to an
        HTTP/1.1 client and until close to an HTTP/1.0 one."""
        if self._closed:
            return
        request = self._request
        version11 = request is None or request.version == b"1.1"
        body = status >= 200 and status not in _NO_BODY and \
            (request is None or request.method != b"HEAD")
        out = []
        framed = False
        for pair in headers:
            name = pair[0]
            if name == b"content-length":
                framed = True
            elif name == b"transfer-encoding":
                continue
            elif name == b"trailer" and not (version11 and body):
                continue
            out.append(pair)
        chunked = body and not framed and version11
        if chunked:
            out.append((b"transfer-encoding", b"chunked"))
        elif body and not framed:
            close = True    # an HTTP/1.0 client reads the body until the close
        if (close or self._last or not self._request_done or self.app.draining
                or request is None):
            # The request body is still coming and nobody will read it, the
            # client asked to close, or the balancer is shutting down.
            close = True
            out.append((b"connection", b"close"))
        self._close_after = close
        self._body_allowed = body
        self._chunked = chunked
        self._started = True
        self._write([serialize.response_head(status, reason, out)])

    def send_data(self, data: bytes) -> None:
        if self._closed or not self._body_allowed or not data:
            return
        if self._chunked:
            self._write(serialize.chunk(data), len(data))
        else:
            self._write([data], len(data))

    def send_end(self, trailers: list = ()) -> None:
        if self._closed:
            return
        if self._chunked:
            self._write([serialize.last_chunk(clean_trailers(trailers) if trailers else ())])
        # The response is whole: out now, in one write, rather than at the
        # end of the loop pass (a call_soon less, and the caller has it sooner).
        self._flush()
        self._response_complete()

    def send_error(self, status: int, reason: str, request_id: str, *,
                   close: bool = False, extra: list = ()) -> None:
        """A complete JSON error answer made by the balancer."""
        body = orjson.dumps({"error": reason, "request_id": request_id})
        self.send_whole(status, b"application/json", body, request_id, close=close, extra=extra)

    def send_whole(self, status: int, content_type: bytes, body: bytes, request_id: str, *,
                   close: bool = False, extra: list = ()) -> None:
        if self._closed:
            return
        if self._started:
            self.abort_response()
            return
        headers = [(b"content-type", content_type),
                   (b"content-length", str(len(body)).encode("ascii")),
                   (b"x-request-id", request_id.encode("ascii")), *extra]
        self.send_response(status, headers, close=close)
        self.send_data(body)
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
        if self.http_version == b"1.0" and not self._closed:
            self._closed = True
            self._deadline.cancel()
            self._out = []
            _reset(self.transport)
            return
        self.close()

    def switch_protocols(self, headers: list) -> tuple[asyncio.Transport, bytes]:
        """Write a 101; the transport and the bytes behind the request are
        a tunnel's from here on (which reports its end: tunnel_closed)."""
        self._write([serialize.response_head(101, b"Switching Protocols", headers)])
        self._flush()
        self._closed = True
        self._deadline.cancel()
        self.exchange = None
        self._read_block = 0
        return self.transport, self.parser.detach()

    def tunnel_closed(self) -> None:
        """The tunnel this connection became is closed for good."""
        self.app.connection_closed(self)

    def drain(self) -> None:
        """The balancer is shutting down: close now if between requests, else
        after the response under way (send_response marks it Connection: close)."""
        if self._waiting_head and not self._head_seen and self.exchange is None:
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

    def _can_write(self) -> bool:
        return not self._closed  # after close() has sent FIN (write_eof), nothing more

    def _response_complete(self) -> None:
        self.exchange = None
        if self._close_after or not self._request_done or self.app.draining:
            # (a response whose head went out before the drain began did not
            # say Connection: close; the client sees the close instead)
            self.close()
            return
        self._waiting_head = True
        self._answering = False
        self._started = False
        self._request = None
        # Part of the next head may be here already (pipelining): then it is
        # already on the head's clock, not the keep-alive one.
        self._head_seen = self.parser.buffered() > 0
        self._deadline.set(self._timeouts.client_header if self._head_seen
                           else self._timeouts.idle)
        self._unblock_reading(_BACKPRESSURE)
        parser = self.parser
        parser.next_message()  # a pipelined request may already be buffered
        if parser.buffered() <= self._limits.max_header_bytes:
            self._unblock_reading(_PIPELINE)

    def _on_deadline(self) -> None:
        if self._closed:
            return
        exchange = self.exchange
        if exchange is not None:
            if not exchange.keeps_time:
                self.close()    # a body for a built-in endpoint that never ended
            return              # a request under way keeps its own time
        if self._waiting_head and self.parser.head_pending():
            # Part of a head arrived but not all of it in time (slowloris).
            self.app.reject(self, None, new_request_id(), 408,
                            f"request head not received within "
                            f"timeouts.client_header ({self._timeouts.client_header:g}s)")
        elif self._waiting_head:
            self.close()  # idle keep-alive connection: close quietly
