"""Header rewriting between client and backend (sans-io, pure functions).

h11 hands us headers as (lowercased name, value) byte pairs.  A proxy must not
forward hop-by-hop headers (they describe one connection, RFC 9110 §7.6.1),
must add the X-Forwarded-* trio, and carries one request id end to end.
"""

from __future__ import annotations

import re
import uuid
from typing import Iterable

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authorization", b"proxy-connection",
    # Not hop-by-hop by the RFC, but the balancer answers "100 Continue"
    # itself; forwarding it would make the backend send a second one.
    b"expect",
})

# Headers the balancer sets itself on the way to the backend.
_REPLACED_UPSTREAM = frozenset({
    b"x-request-id", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
})

# A client's request id is kept only if it is short, visible ASCII: it goes
# into log lines and other systems' headers.
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in Connection: they are hop-by-hop too."""
    tokens = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens)


def request_id(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID if usable, else a new one."""
    for name, value in headers:
        if name == b"x-request-id" and _REQUEST_ID.fullmatch(value):
            return value.decode("ascii")
    return uuid.uuid4().hex


def to_backend(headers: Headers, *, client_ip: str, request_id: str,
               chunked: bool) -> Headers:
    """Headers for the request we send upstream."""
    listed = _connection_tokens(headers)
    out: Headers = []
    forwarded_for: list[bytes] = []
    host = None
    for name, value in headers:
        if name in HOP_BY_HOP or name in listed:
            continue
        if name == b"x-forwarded-for":
            forwarded_for.append(value)
            continue
        if name in _REPLACED_UPSTREAM:
            continue
        if name == b"host":
            host = value
        elif chunked and name == b"content-length":
            continue  # cannot happen after the framing check; never forward both
        out.append((name, value))
    forwarded_for.append(client_ip.encode("ascii"))
    out.append((b"x-forwarded-for", b", ".join(forwarded_for)))
    out.append((b"x-forwarded-proto", b"http"))
    if host is not None:
        out.append((b"x-forwarded-host", host))
    out.append((b"x-request-id", request_id.encode("ascii")))
    if chunked:
        out.append((b"transfer-encoding", b"chunked"))
    return out


def to_client(headers: Headers, *, request_id: str) -> Headers:
    """Headers for the response we send to the client.

    Framing is redone by h11 on the client side: if the backend sent a chunked
    body its Content-Length (if any) is meaningless and is dropped, and h11
    chooses chunked again for the client.
    """
    listed = _connection_tokens(headers)
    chunked = any(name == b"transfer-encoding" for name, _ in headers)
    out: Headers = []
    for name, value in headers:
        if name in HOP_BY_HOP or name in listed or name == b"x-request-id":
            continue
        if chunked and name == b"content-length":
            continue
        out.append((name, value))
    out.append((b"x-request-id", request_id.encode("ascii")))
    return out


def framing_problem(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Why a request's body framing is ambiguous, or None if it is clear.

    h11 already rejects conflicting Content-Lengths and unknown transfer
    codings; it lets Transfer-Encoding win over Content-Length, which is the
    classic request-smuggling shape, so a proxy refuses it outright.
    """
    has_length = has_chunked = False
    for name, _ in headers:
        if name == b"content-length":
            has_length = True
        elif name == b"transfer-encoding":
            has_chunked = True
    if has_length and has_chunked:
        return "request has both Content-Length and Transfer-Encoding"
    return None


def content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value)  # h11 validated it
    return None


def is_chunked(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    return any(name == b"transfer-encoding" for name, _ in headers)


def wants_html(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"accept":
            return b"text/html" in value
    return False
