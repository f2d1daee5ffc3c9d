"""The h11 engine: h11's pure-Python parser, used only to read (see engines).

h11 is a whole connection state machine; here it is asked for events only.
Each message gets a fresh h11.Connection (what follows a complete request
waits in its buffer and seeds the next one), so h11 never needs to see what
the balancer sends: heads and chunks are written by `serialize`.
"""

from __future__ import annotations

import h11

from .framing import REQUEST_FIELD_BYTES, RESPONSE_FIELD_BYTES, Refused
from .head_scan import HeadScanner

_Request = h11.Request
_Response = h11.Response
_Data = h11.Data
_EndOfMessage = h11.EndOfMessage
_InformationalResponse = h11.InformationalResponse
_NEED_DATA = h11.NEED_DATA
# The request h11 is told of when a 101 may answer it.
_SWITCH_HEADERS = [(b"host", b"x"), (b"connection", b"upgrade"), (b"upgrade", b"x")]


def _pairs(headers) -> list:
    full = getattr(headers, "_full_items", None)
    if full is not None:
        return [(name, value) for _, name, value in full]
    return list(headers)


def _head_size(first: int, headers: list, field_bytes: int) -> int:
    """The head's size as parsed (see framing.REQUEST_FIELD_BYTES)."""
    return first + sum(len(n) + len(v) for n, v in headers) + field_bytes * len(headers)


class RequestParser:
    __slots__ = ("_sink", "_limit", "_conn", "_held", "_failed", "_scanner", "_running")

    def __init__(self, sink, max_head: int):
        self._sink = sink
        self._limit = max_head
        self._conn = self._new()
        self._held = False      # a complete request was delivered: wait for next_message
        self._failed = False
        self._running = False
        self._scanner = HeadScanner(max_head)

    def _new(self) -> h11.Connection:
        # h11 limits only heads that arrive in pieces; a little over ours, so
        # that our own count (HeadScanner) is the one that answers.
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self._limit + 4096)

    def feed(self, data: bytes) -> None:
        if self._failed:
            return
        if not self._held:
            scanner = self._scanner
            if not scanner.done:
                try:
                    # (without the empty lines before a request line, which
                    # h11 would call a missing request line)
                    data = scanner.feed(data)
                except Refused as exc:
                    self._fail(exc.status, exc.reason)
                    return
                if not data:
                    return
        self._conn.receive_data(data)
        if not self._held and not self._running:
            self._run()

    def buffered(self) -> int:
        return len(self._conn.trailing_data[0])

    def detach(self) -> bytes:
        """The connection switched protocols after the current request: the
        bytes that followed it, unparsed; nothing more is parsed."""
        self._failed = True
        return bytes(self._conn.trailing_data[0])

    def head_pending(self) -> bool:
        """Part of a request head has arrived, not all of it."""
        return self._scanner.started or (self._held and self.buffered() > 0)

    def next_message(self) -> None:
        """The answer to the last request is done: read the next one."""
        self._held = False
        if self._running or self._failed:
            return      # called from inside on_end: the loop below goes on
        if self._start_next():
            self._run()

    def _start_next(self) -> bool:
        leftover = self._conn.trailing_data[0]
        self._conn = self._new()
        self._scanner.reset()
        if not leftover:
            return False
        try:
            leftover = self._scanner.feed(leftover)
        except Refused as exc:
            self._fail(exc.status, exc.reason)
            return False
        if not leftover:
            return False
        self._conn.receive_data(leftover)
        return True

    def _fail(self, status: int, reason: str) -> None:
        self._failed = True
        self._sink.on_error(status, reason)

    def _run(self) -> None:
        self._running = True
        try:
            self._events()
        finally:
            self._running = False

    def _events(self) -> None:
        conn, sink = self._conn, self._sink
        while not self._failed:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = 431 if exc.error_status_hint == 431 else 400
                self._fail(status, f"malformed request: {exc}")
                return
            kind = type(event)
            if kind is _Data:
                sink.on_body(event.data)
            elif event is _NEED_DATA:
                return
            elif kind is _Request:
                headers = _pairs(event.headers)
                sink.on_head(event.method, event.target, event.http_version, headers,
                             _head_size(len(event.method) + len(event.target) + 12, headers,
                                        REQUEST_FIELD_BYTES))
            elif kind is _EndOfMessage:
                self._held = True
                sink.on_end(_pairs(event.headers))
                if self._held or self._failed or not self._start_next():
                    return
                conn = self._conn   # answered at once: go on with the next request
            else:   # PAUSED (cannot happen: one message per Connection)
                return


class ResponseParser:
    __slots__ = ("_sink", "_limit", "_conn", "_done", "_head_seen", "_upgrade")

    def __init__(self, sink, max_head: int):
        self._sink = sink
        self._limit = max_head
        self._conn: h11.Connection | None = None
        self._done = True
        self._head_seen = False
        self._upgrade = False

    def expect(self, method: bytes, upgrade: bool = False) -> None:
        """A request went out: parse its response.  h11 is told the request
        (it needs the method: a HEAD answer has no body; and whether a 101
        may come) without writing it."""
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=self._limit)
        if upgrade:
            conn.send(_Request(method=method, target=b"/", headers=_SWITCH_HEADERS))
            conn.send(h11.EndOfMessage())
        else:
            conn.send(_Request(method=method, target=b"/", headers=[(b"host", b"x")]))
        self._upgrade = upgrade
        self._conn = conn
        self._done = False
        self._head_seen = False

    def feed(self, data: bytes) -> None:
        if self._done:
            return
        self._conn.receive_data(data)
        self._run()

    def leftover(self) -> bool:
        """Bytes after the end of the response (which the next request would
        read as its answer)."""
        return self._conn is not None and bool(self._conn.trailing_data[0])

    def detach(self) -> bytes:
        """After a 101: the bytes that came behind it."""
        return bytes(self._conn.trailing_data[0])

    def _run(self) -> None:
        conn, sink = self._conn, self._sink
        while not self._done:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._done = True
                if exc.error_status_hint == 431 and not self._head_seen:
                    sink.on_error("head too large")
                else:
                    sink.on_error(f"invalid response from backend: {exc}")
                return
            kind = type(event)
            if kind is _Data:
                sink.on_body(event.data)
            elif event is _NEED_DATA:
                return
            elif kind is _Response:
                self._head_seen = True
                headers = _pairs(event.headers)
                sink.on_head(event.status_code, event.reason, event.http_version, headers,
                             _head_size(len(event.reason) + 15, headers, RESPONSE_FIELD_BYTES))
            elif kind is _EndOfMessage:
                self._done = True
                sink.on_end(_pairs(event.headers))
                return
            elif kind is _InformationalResponse:
                if event.status_code == 101 and self._upgrade:
                    self._done = True
                    headers = _pairs(event.headers)
                    sink.on_head(101, event.reason, event.http_version, headers,
                                 _head_size(len(event.reason) + 15, headers,
                                            RESPONSE_FIELD_BYTES))
                    return
                continue    # 100 Continue / 103: the balancer answers Expect itself
            else:           # ConnectionClosed before a response: the sink sees the loss
                self._done = True
                return
