"""The httptools engine: llhttp (Node.js's C parser), used only to read.

llhttp parses everything it is fed in one go, pipelined requests included.
What comes after a complete request is held here as events, in order, and
given to the sink at `next_message()`, so the connection sees one request
at a time as with h11.  Its errors are mapped to the balancer's statuses.
"""

from __future__ import annotations

from collections import deque

import httptools

from .framing import REQUEST_FIELD_BYTES, RESPONSE_FIELD_BYTES, Refused
from .head_scan import HeadScanner


_ParserError = httptools.HttpParserError
_CallbackError = httptools.HttpParserCallbackError
_Upgrade = httptools.HttpParserUpgrade


def _reraise_ours(exc: Exception) -> None:
    """llhttp wraps an exception raised in a callback: one of ours (a bug,
    or _HeadOnly) is raised as itself, not taken for the peer's bad bytes."""
    if isinstance(exc, _CallbackError) and exc.__context__ is not None:
        raise exc.__context__


def _status_for(message: str) -> int:
    """llhttp's error, as the status framing gives the same fault."""
    if "Invalid HTTP version" in message or "PRI" in message or "HTTP/2" in message:
        return 505      # HTTP/1.2, an HTTP/2 preface
    return 400          # ("Invalid method": garbage and unknown methods alike; the
                        # head's own check tells them apart where it sees the head)


def _size(call, args: tuple) -> int:
    """Bytes a held event stands for: a head's size, or a body piece's."""
    if len(args) == 5:
        return args[4]          # on_head(method, target, version, headers, size)
    if len(args) == 1 and isinstance(args[0], bytes):
        return len(args[0])     # on_body(data)
    return 0


def _request_parser(sink) -> "httptools.HttpRequestParser":
    parser = httptools.HttpRequestParser(sink)
    # Content-Length with Transfer-Encoding reaches framing.check_request,
    # which refuses it in the balancer's own words, as with h11 (the head is
    # refused before any of the body is read either way).
    parser.set_dangerous_leniencies(lenient_chunked_length=True)
    return parser


class _Fields:
    """The header lines of a head, or of the trailers after a chunked body,
    as both parsers collect them (llhttp calls on_header for both)."""
    __slots__ = ("_headers", "_trailers", "_size", "_in_head")
    FIELD_BYTES = REQUEST_FIELD_BYTES

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp leaves trailing whitespace on a value; h11 strips it (RFC
        # 9110 §5.5: it is not part of the value).
        value = value.rstrip(b" \t")
        if self._in_head:
            self._headers.append((name.lower(), value))
            self._size += len(name) + len(value) + self.FIELD_BYTES
        else:
            self._trailers.append((name.lower(), value))


class RequestParser(_Fields):
    __slots__ = ("_sink", "_parser", "_url", "_held", "_queue", "_queued_bytes", "_failed",
                 "_replaying", "_scanner", "_switch", "_raw", "_in_message")

    def __init__(self, sink, max_head: int):
        self._sink = sink
        self._scanner = HeadScanner(max_head)
        self._parser = _request_parser(self)
        self._url = b""
        self._headers: list = []
        self._trailers: list = []
        self._size = 0
        self._in_head = False
        self._held = False          # after a complete request: events wait in _queue
        self._queue: deque = deque()    # (call, args, holds) after a complete request
        self._queued_bytes = 0
        self._failed = False
        self._replaying = False
        self._switch = False        # llhttp stopped after an upgrade head: what
        self._raw = bytearray()     # follows waits here, unparsed, for the answer
        self._in_message = False    # llhttp is inside a request (head or body)

    # --- fed by the connection

    def feed(self, data: bytes) -> None:
        if self._switch:
            self._raw += data
            return
        if not self._held and not self._failed:
            # A head that starts here is checked raw, as with h11.  (Pipelined
            # heads behind a request still being answered are llhttp's alone:
            # it parses them in one go; it is strict on every rule HeadScanner
            # checks, which tests/test_framing_corpus.py holds it to.)
            scanner = self._scanner
            if scanner.done and not self._in_message:
                # llhttp is between requests: a new head starts in this read.
                # (Decided here, not when the last answer went out: that may
                # happen inside llhttp's callbacks, in the middle of a read
                # whose rest is already the next head, or a body.)
                scanner.reset()
            if not scanner.done:
                try:
                    scanner.feed(data)
                except Refused as exc:
                    self._fail(exc.status, exc.reason)
                    return
        while data and not self._failed:
            try:
                self._parser.feed_data(data)
                return
            except _Upgrade as exc:
                # Connection: upgrade: llhttp stops after the head.  What
                # follows is the new protocol's if the backend switches
                # (detach), else the next request (next_message).
                at = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
                if not self._held:
                    # Answered already, inside on_end (a built-in endpoint):
                    # no switch, so what follows is the next request.
                    self._restart()
                    data = data[at:]
                    continue
                self._switch = True
                self._raw += data[at:]
                return
            except _ParserError as exc:
                _reraise_ours(exc)
                message = str(exc)
                self._fail(_status_for(message), f"malformed request: {message}")

    def buffered(self) -> int:
        # (a head llhttp is still reading counts too: it is held in its state)
        return (self._queued_bytes + len(self._raw)
                + (self._size if self._in_head and self._held else 0))

    def detach(self) -> bytes:
        """The connection switched protocols after the current request: the
        bytes that followed it, unparsed; nothing more is parsed."""
        self._failed = True
        self._queue.clear()
        rest, self._raw = bytes(self._raw), bytearray()
        return rest

    def head_pending(self) -> bool:
        """Part of a request head has arrived, not all of it."""
        return self._in_head or self._scanner.started

    def next_message(self) -> None:
        self._held = False
        if self._switch and not self._queue:
            # The upgrade was answered without a switch: what followed it
            # is read as the next request, as h11 does.
            self._switch = False
            rest, self._raw = bytes(self._raw), bytearray()
            self._restart()
            if rest:
                self.feed(rest)
            return
        if self._replaying:
            return      # called from inside a replayed on_end: the loop goes on
        self._replaying = True
        queue = self._queue
        try:
            while queue and not self._held:
                call, args, holds = queue.popleft()
                self._queued_bytes -= _size(call, args)
                if holds:
                    self._held = True   # set first: on_end may answer at once
                call(*args)
        finally:
            self._replaying = False
        # (what is not replayed yet, or is inside llhttp, llhttp has read
        # already; the scanner takes the next head that starts in a read: feed)
        self._scanner.done = True

    def _restart(self) -> None:
        """A fresh llhttp after an upgrade head (it parses nothing after one)."""
        self._parser = _request_parser(self)
        self._in_message = False
        self._scanner.done = True       # (the next read that starts a head is scanned)

    def _fail(self, status: int, reason: str) -> None:
        self._failed = True
        self._emit(self._sink.on_error, status, reason)

    def _emit(self, call, *args) -> None:
        if self._held:
            self._queue.append((call, args, False))
            self._queued_bytes += _size(call, args)
            return
        call(*args)

    # --- llhttp's callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._trailers = []
        self._size = 12                 # the request line's spaces, version and CRLF
        self._in_head = True
        self._in_message = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._size += len(url)

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        method = parser.get_method()
        self._emit(self._sink.on_head, method, self._url, parser.get_http_version().encode(),
                   self._headers, self._size + len(method))

    def on_body(self, body: bytes) -> None:
        self._emit(self._sink.on_body, body)

    def on_message_complete(self) -> None:
        self._in_message = False
        if self._held:
            self._queue.append((self._sink.on_end, (self._trailers,), True))
        else:
            self._held = True       # set first: on_end may answer at once
            self._sink.on_end(self._trailers)


class ResponseParser(_Fields):
    __slots__ = ("_sink", "_parser", "_done", "_head_only", "_after", "_limit", "_reason",
                 "_upgrade", "_rest")
    FIELD_BYTES = RESPONSE_FIELD_BYTES

    def __init__(self, sink, max_head: int):
        self._sink = sink
        self._limit = max_head
        self._parser = None
        self._headers: list = []
        self._trailers: list = []
        self._size = 0
        self._in_head = False
        self._done = True
        self._head_only = False
        self._after = False
        self._reason = b""
        self._upgrade = False
        self._rest = b""

    def expect(self, method: bytes, upgrade: bool = False) -> None:
        # A fresh parser per response: llhttp cannot be told that a HEAD
        # answer's Content-Length describes no body, so that one ends at its
        # head here (and framing keeps such a connection out of the pool).
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = method == b"HEAD"
        self._done = False
        self._after = False
        self._upgrade = upgrade
        self._rest = b""

    def feed(self, data: bytes) -> None:
        if self._done:
            if self._parser is not None:
                self._after = True
            return
        try:
            self._parser.feed_data(data)
        except _Upgrade as exc:
            # After a 101 (delivered as the head): the new protocol's bytes.
            at = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self._rest = data[at:]
            if not self._done:      # a switch nobody asked for
                self._done = True
                self._sink.on_error("invalid response from backend: an unrequested 101")
        except _ParserError as exc:
            try:
                _reraise_ours(exc)
            except _HeadOnly:
                return
            if not self._done:
                self._done = True
                self._sink.on_error(f"invalid response from backend: {exc}")

    def leftover(self) -> bool:
        return self._after

    def detach(self) -> bytes:
        """After a 101: the bytes that came behind it."""
        rest, self._rest = self._rest, b""
        return rest

    def on_message_begin(self) -> None:
        if self._done:
            self._after = True
            raise _HeadOnly()
        self._headers = []
        self._trailers = []
        self._size = 15                 # the status line's version, code, spaces and CRLF
        self._reason = b""
        self._in_head = True

    def on_status(self, reason: bytes) -> None:
        # (called once per read the reason phrase spans)
        self._reason += reason
        self._size += len(reason)

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101 and self._upgrade:
                self._done = True
                self._sink.on_head(status, self._reason, parser.get_http_version().encode(),
                                   self._headers, self._size)
            return      # 100 Continue / 103: the balancer answers Expect itself
        self._sink.on_head(status, self._reason, parser.get_http_version().encode(), self._headers,
                           self._size)
        if self._head_only and not self._done:
            self._done = True
            self._sink.on_end([])
            raise _HeadOnly()

    def on_body(self, body: bytes) -> None:
        if not self._done:
            self._sink.on_body(body)

    def on_message_complete(self) -> None:
        if self._parser.get_status_code() < 200 or self._done:
            return
        self._done = True
        self._sink.on_end(self._trailers)


class _HeadOnly(Exception):
    """Stops llhttp after a head that ends its message (a HEAD answer)."""


