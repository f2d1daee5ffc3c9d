"""One connection to a backend: an asyncio Protocol driving h11 as a CLIENT.

The connection belongs either to the pool (idle, `owner is None`) or to one
exchange, which receives the response as callbacks:

    owner.upstream_response(h11.Response)
    owner.upstream_data(bytes)
    owner.upstream_end()
    owner.upstream_failed(kind, reason)     # unparsable response
    owner.upstream_lost(exc)                # closed/reset before the end
    owner.upstream_write_paused() / upstream_write_resumed()
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import h11

from .writes import CoalescedWrites

if TYPE_CHECKING:
    from .pool import UpstreamPool

_Data = h11.Data
_Response = h11.Response
_EndOfMessage = h11.EndOfMessage
_NEED_DATA = h11.NEED_DATA


class UpstreamConnection(CoalescedWrites, asyncio.Protocol):
    __slots__ = ("pool", "h11", "transport", "owner", "usable", "idle_since",
                 "write_paused", "_high", "_reading_paused", "_loop", "_out", "_out_bytes", "_flush_at", "_flush_scheduled")

    def __init__(self, pool: "UpstreamPool", loop: asyncio.AbstractEventLoop, *,
                 max_header_bytes: int, write_buffer_high: int):
        self.pool = pool
        self._loop = loop
        self._out: list[bytes] = []  # coalesced writes (head, body, end), flushed once per tick
        self._out_bytes = 0
        self._flush_at = write_buffer_high
        self._flush_scheduled = False
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes)
        self.transport: asyncio.Transport | None = None
        self.owner: Any = None
        self.usable = False         # open and in a clean state between requests
        self.idle_since = 0.0
        self.write_paused = False
        self._high = write_buffer_high
        self._reading_paused = False

    # --- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        # uvloop's default low-water mark is tiny; set both explicitly.
        transport.set_write_buffer_limits(high=self._high, low=self._high // 4)
        self.usable = True

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:
            # A backend must not speak unprompted; the connection's framing
            # can no longer be trusted.
            self.close()
            return
        self.h11.receive_data(data)
        self._deliver(owner)

    def eof_received(self) -> bool:
        self.usable = False
        owner = self.owner
        if owner is not None:
            # A close-delimited (HTTP/1.0 style) body ends here; a framed body
            # cut short, or no response at all, makes h11 raise: that is the
            # backend closing on us, not a malformed response.
            self.h11.receive_data(b"")
            self._deliver(owner, at_eof=True)
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

    # --- used by the exchange

    def send(self, event: Any) -> None:
        self._write(self.h11.send_with_data_passthrough(event))

    def send_data(self, data: bytes) -> None:
        self._write(self.h11.send_with_data_passthrough(_Data(data=data)), len(data))


    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = False
            self.transport.resume_reading()

    def finish_for_reuse(self) -> bool:
        """After a complete exchange: ready the connection for the next one."""
        self.owner = None
        self.resume_reading()
        h = self.h11
        if self.usable and h.our_state is h11.DONE and h.their_state is h11.DONE:
            leftover, closed = h.trailing_data
            if leftover or closed:
                # Bytes after the end of the response would be read as the
                # answer to the next request on this connection.
                return False
            h.start_next_cycle()
            return True
        return False

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

    # --- internals

    def _deliver(self, owner: Any, at_eof: bool = False) -> None:
        h = self.h11
        while self.owner is owner:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                self.usable = False
                self.owner = None
                if at_eof:
                    owner.upstream_lost(None)
                else:
                    owner.upstream_failed("bad_response", f"invalid response from backend: {exc}")
                return
            kind = type(event)
            if kind is _Data:
                owner.upstream_data(event.data)
            elif event is _NEED_DATA:
                return
            elif kind is _Response:
                owner.upstream_response(event)
            elif kind is _EndOfMessage:
                owner.upstream_end()
                return
            elif kind is h11.InformationalResponse:
                continue  # 100 Continue / 103 hints: the balancer handles Expect itself
            else:  # PAUSED or ConnectionClosed: nothing more for this exchange
                return
