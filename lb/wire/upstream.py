"""One connection to a backend: an asyncio Protocol around an engine's response parser.

The connection belongs either to the pool (idle, `owner is None`) or to one
exchange, which receives the response as callbacks:

    owner.upstream_response(framing.Response)
    owner.upstream_data(bytes)
    owner.upstream_end(trailers)
    owner.upstream_failed(kind, reason)     # unparsable response
    owner.upstream_lost(exc)                # closed/reset before the end
    owner.upstream_write_paused() / upstream_write_resumed()

The request is written here with `serialize`; the response's framing is
settled by `framing.check_response`, whichever engine parsed it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from . import serialize
from .framing import Refused, check_response, response_head_too_large
from .writes import CoalescedWrites

if TYPE_CHECKING:
    from .pool import UpstreamPool


class UpstreamConnection(CoalescedWrites, asyncio.Protocol):
    __slots__ = ("pool", "parser", "transport", "owner", "usable", "idle_since",
                 "write_paused", "_high", "_reading_paused", "_loop", "_out", "_out_bytes",
                 "_flush_at", "_flush_scheduled", "_method", "_chunked", "_sent", "_response",
                 "_ended", "_head_bytes", "_head_limit", "_upgrade", "_switched")

    def __init__(self, pool: "UpstreamPool", loop: asyncio.AbstractEventLoop, *,
                 parser_class: Any, max_response_header_bytes: int, write_buffer_high: int):
        self.pool = pool
        self._loop = loop
        self._out: list[bytes] = []  # coalesced writes (head, body, end), flushed once per tick
        self._out_bytes = 0
        self._flush_at = write_buffer_high
        self._flush_scheduled = False
        self._head_limit = max_response_header_bytes
        self.parser = parser_class(self, max_response_header_bytes)
        self.transport: asyncio.Transport | None = None
        self.owner: Any = None
        self.usable = False         # open and in a clean state between requests
        self.idle_since = 0.0
        self.write_paused = False
        self._high = write_buffer_high
        self._reading_paused = False
        self._method = b""
        self._chunked = False       # the request body goes out chunked
        self._sent = False          # the whole request went out
        self._response = None       # the current response's head, once read
        self._ended = False         # the current response was read whole
        self._head_bytes = 0        # bytes of a response head so far
        self._upgrade = False       # the request asks to switch protocols
        self._switched = None       # a 101 read, told to the owner once the read is parsed

    # --- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        # uvloop's default low-water mark is tiny; set both explicitly.
        transport.set_write_buffer_limits(high=self._high, low=self._high // 4)
        self.usable = True

    def data_received(self, data: bytes) -> None:
        if self.owner is None:
            # A backend must not speak unprompted; the connection's framing
            # can no longer be trusted.
            self.close()
            return
        self.parser.feed(data)
        if self._switched is not None:
            # Told only now: the parser knows where the 101 ended only once
            # it has returned (detach hands the owner what came after).
            response, self._switched = self._switched, None
            self.owner.upstream_response(response)
            return
        if self._response is None and self.owner is not None:
            # Still no whole head: however it arrives in pieces, it is bounded.
            self._head_bytes += len(data)
            if self._head_bytes > self._head_limit:
                self._fail_head()

    def eof_received(self) -> bool:
        self.usable = False
        owner = self.owner
        if owner is not None:
            response = self._response
            if response is not None and response.until_close and not self._ended:
                # A close-delimited (HTTP/1.0 style) body ends here.
                self._ended = True
                owner.upstream_end([])
            else:
                # A framed body cut short, or no response at all: the
                # backend closing on us, not a malformed response.
                self.owner = None
                owner.upstream_lost(None)
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        owner, self.owner = self.owner, None
        if owner is None:
            self.pool.discard(self)
        else:
            owner.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.owner is not None:
            self.owner.upstream_write_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.owner is not None:
            self.owner.upstream_write_resumed()

    # --- the engine's events

    def on_head(self, status: int, reason: bytes, version: bytes, headers: list,
                size: int) -> None:
        owner = self.owner
        if owner is None:
            return
        if size > self._head_limit:
            self._fail_head()
            return
        try:
            response = check_response(status, reason, version, headers, self._method)
        except Refused as exc:
            self._failed(exc.reason)
            return
        self._response = response
        if status == 101:
            self._switched = response
            return
        owner.upstream_response(response)

    def on_body(self, data: bytes) -> None:
        if self.owner is not None:
            self.owner.upstream_data(data)

    def on_end(self, trailers: list) -> None:
        owner = self.owner
        if owner is not None and not self._ended:
            self._ended = True
            owner.upstream_end(trailers)

    def on_error(self, reason: str) -> None:
        if reason == "head too large":
            self._fail_head()
        else:
            self._failed(reason)

    def _fail_head(self) -> None:
        self._failed(response_head_too_large(self._head_limit))

    def _failed(self, reason: str) -> None:
        owner = self.owner
        self.usable = False
        self.owner = None
        if owner is not None:
            owner.upstream_failed("bad_response", reason)

    # --- used by the exchange

    def start(self, owner: Any, method: bytes, head: bytes, chunked: bool,
              upgrade: bool = False) -> None:
        """Send a request head; the body (if any) follows with send_data/send_end.
        `upgrade`: a 101 may answer it (and hands the connection to a tunnel)."""
        self.owner = owner
        self._method = method
        self._chunked = chunked
        self._sent = False
        self._response = None
        self._ended = False
        self._head_bytes = 0
        self._upgrade = upgrade
        self.parser.expect(method, upgrade)
        self._write([head])

    def send_data(self, data: bytes) -> None:
        if not data:
            return
        if self._chunked:
            self._write(serialize.chunk(data), len(data))
        else:
            self._write([data], len(data))

    def send_end(self, trailers: list = ()) -> None:
        if self._chunked:
            self._write([serialize.last_chunk(trailers)])
        self._sent = True
        self._flush()   # the request is whole: out now (see ClientConnection.send_end)

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = False
            self.transport.resume_reading()

    def finish_for_reuse(self) -> bool:
        """After a complete exchange: may the connection carry the next one?"""
        self.owner = None
        self.resume_reading()
        response = self._response
        # Bytes after the end of the response would be read as the answer
        # to the next request on this connection.
        return (self.usable and self._sent and self._ended and response is not None
                and response.keep_alive and not self.parser.leftover())

    def switch_protocols(self) -> tuple[asyncio.Transport, bytes]:
        """After a 101: the transport, and the bytes that came behind the
        101, for a tunnel; the connection is the tunnel's from here on."""
        self.usable = False
        self.owner = None
        self._flush()
        self._reading_paused = False
        return self.transport, self.parser.detach()

    def close(self) -> None:
        self.usable = False
        self.owner = None
        if self.transport is not None:
            self._flush()
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once (the backend sees it close; a GPU slot frees)."""
        self.usable = False
        self.owner = None
        self._out = []
        if self.transport is not None:
            self.transport.abort()
