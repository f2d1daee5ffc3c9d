"""Message heads and chunked framing as bytes (sans-io, shared by both engines).

The engines only parse; everything the balancer sends is written here, so
what goes out on the wire does not depend on which parser read it.  Header
names and values are ones a parser accepted and `framing` checked, or our
own constants: they are joined, not re-validated.
"""

from __future__ import annotations

from http import HTTPStatus

CRLF = b"\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"

_REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}


def reason_for(status: int) -> bytes:
    return _REASONS.get(status, b"")


def _status_line(status: int, reason: bytes) -> bytes:
    key = (status, reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        if len(_STATUS_LINES) < 1024:    # backends' reason phrases are few
            _STATUS_LINES[key] = line
    return line


def response_head(status: int, reason: bytes, headers: list) -> bytes:
    parts = [_status_line(status, reason or reason_for(status))]
    for name, value in headers:
        parts += (name, b": ", value, CRLF)
    parts.append(CRLF)
    return b"".join(parts)


def request_head(method: bytes, target: bytes, headers: list) -> bytes:
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, CRLF)
    parts.append(CRLF)
    return b"".join(parts)


def chunk(data: bytes) -> list[bytes]:
    """One chunk of a chunked body (never empty: that would end the body)."""
    return [b"%x\r\n" % len(data), data, CRLF]


def last_chunk(trailers: list = ()) -> bytes:
    if not trailers:
        return LAST_CHUNK
    parts = [b"0\r\n"]
    for name, value in trailers:
        parts += (name, b": ", value, CRLF)
    parts.append(CRLF)
    return b"".join(parts)
