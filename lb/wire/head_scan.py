"""The raw-byte rules of a request head (sans-io), for both engines.

Part of the balancer's framing rules (`framing` has the rest): the ones that
must be checked on the head's own bytes, before a parser has normalised them.
"""

from __future__ import annotations

import re

from .framing import (CONNECT_REFUSED, HTTP2_REFUSED, METHODS, TOKEN, Refused, check_version,
                      head_too_large, skip_empty_lines)


class HeadScanner:
    """Raw-byte rules for a request head, however it arrives in pieces.

    Some rules cannot be checked after a parser has read the head: h11 joins
    an obs-fold line into the value before, collapses repeated Content-Lengths
    and waits forever on a bare CR; llhttp takes a double space in the
    request line.  So the head's own bytes are checked as they come, up to
    its empty line, the same whichever engine reads them: the request line's
    shape, a bare CR or LF, an obs-fold line, a control byte, Content-Length
    (one, digits) and the head's size.  The engines feed it every head they
    can see the start of (see h11_engine, httptools_engine).
    """
    __slots__ = ("limit", "size", "done", "_buf")

    def __init__(self, limit: int):
        self.limit = limit
        self.reset()

    def reset(self) -> None:
        self.size = 0           # bytes of the head so far (empty lines before it not counted)
        self.done = False
        self._buf = b""         # the head so far, when it comes in pieces

    @property
    def started(self) -> bool:
        return self.size > 0 and not self.done

    def feed(self, data: bytes) -> bytes:
        """Check the next bytes; raises Refused; sets `done` at the head's end.

        Returns what of them a parser should read: empty lines before the
        request line (RFC 9112 §2.2 says to ignore them) are taken out, and
        a lone CR that may start one is kept back until the next piece."""
        if self.done:
            return data
        fresh = not self.size
        head = self._buf + data if self._buf else data
        if fresh:
            head = skip_empty_lines(head)
            if not head or head == b"\r":
                self._buf = head
                return b""
            data = head
        end = head.find(b"\r\n\r\n")
        if end >= 0:            # (usually the whole head is in one piece)
            self.size = end + 2
            self.done = True
            self._buf = b""
            _check_head(head[:end + 2], self.limit, True)
            return data
        self.size = len(head)
        _check_head(head, self.limit, False)
        self._buf = head
        return data


_REQUEST_LINE = re.compile(rb"[^ \r\n]+ [^ \r\n]+ HTTP/[0-9]\.[0-9]\r\n")
# Bytes no head may hold: controls other than CR, LF and (in values) tab.
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_LENGTH_VALUE = re.compile(rb"[ \t]*[0-9]+[ \t]*\r\n")


def _check_head(head: bytes, limit: int, complete: bool) -> None:
    """`head`: up to and with its last header line's CRLF (or what came so far)."""
    if len(head) > limit:
        raise Refused(431, head_too_large(limit))
    # (an unfinished head may end in the CR of a CRLF still coming)
    body = head if complete or head[-1:] != b"\r" else head[:-1]
    crlf = body.count(b"\r\n")
    if body.count(b"\r") != crlf or body.count(b"\n") != crlf:
        raise Refused(400, "malformed request: a bare CR or LF line ending in the request head")
    if b"\n " in body or b"\n\t" in body:
        raise Refused(400, "malformed request: obs-fold (a header line starting with whitespace)")
    if _CONTROL.search(body):
        raise Refused(400, "malformed request: a control character (NUL, ...) in the request head")
    if crlf:
        if not _REQUEST_LINE.match(body):
            raise Refused(400, "malformed request: invalid request line")
        method = body[:body.find(b" ")]
        if method == b"PRI":
            raise Refused(505, HTTP2_REFUSED)
        version = body[body.find(b"\r\n") - 3:body.find(b"\r\n")]
        if version != b"1.1" and version != b"1.0":
            check_version(version)
        if method not in METHODS:
            if not TOKEN.fullmatch(method):
                raise Refused(400, "malformed request: invalid method")
            raise Refused(501, f"method {method.decode('ascii')} is not supported")
        if method == b"CONNECT":
            raise Refused(405, CONNECT_REFUSED)
    lowered = body.lower()
    at = lowered.find(b"\ncontent-length:")
    if at >= 0:
        if lowered.find(b"\ncontent-length:", at + 1) >= 0:
            raise Refused(400, "malformed request: more than one Content-Length")
        start = at + len(b"\ncontent-length:")
        if lowered.find(b"\r\n", start) >= 0 and not _LENGTH_VALUE.match(body, start):
            raise Refused(400, "malformed request: invalid Content-Length")
