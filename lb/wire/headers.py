"""Header rewriting between client and backend (sans-io, pure functions).

The engines hand us headers as (lowercased name, value) byte pairs.  A proxy must not
forward hop-by-hop headers (they describe one connection, RFC 9110 §7.6.1),
must add the X-Forwarded-* trio, and carries one request id end to end.
"""

from __future__ import annotations

from typing import Iterable

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authorization", b"proxy-connection",
    # Not hop-by-hop by the RFC, but the balancer answers "100 Continue"
    # itself; forwarding it would make the backend send a second one.
    b"expect",
})

# Not passed to the client: hop-by-hop (but Trailer, whose trailers go
# through) and the request id, which the balancer sets.
_TO_CLIENT_DROPPED = (HOP_BY_HOP - {b"trailer"}) | {b"x-request-id"}

# Headers the balancer sets itself on the way to the backend.
_REPLACED_UPSTREAM = frozenset({
    b"x-request-id", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
})

# Never dropped because Connection names them: they frame the message or
# route it, and dropping them would desynchronise the two sides.
_NOT_LISTABLE = frozenset({b"content-length", b"transfer-encoding", b"host"})


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in Connection: they are hop-by-hop too."""
    tokens = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens - _NOT_LISTABLE)


def to_backend(headers: Headers, *, client_ip: str, request_id: str,
               chunked: bool, default_host: bytes = b"", listed: frozenset | None = None,
               trailers: bool = False, upgrade: bytes = b"") -> Headers:
    """Headers for the request we send upstream.

    The client's Host is passed through (as HAProxy does); a request without
    one (HTTP/1.0) gets `default_host`, since HTTP/1.1 requires it.  `listed`
    are the Connection header's tokens, when the framing pass has them;
    `trailers`: the client sent TE: trailers, which the balancer passes on
    (it carries trailers through).  `upgrade`: the client asks to switch
    protocols (a WebSocket): Upgrade and Connection: upgrade go with it.
    """
    listed = _connection_tokens(headers) if listed is None else listed - _NOT_LISTABLE
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
    if host is None and default_host:
        out.insert(0, (b"host", default_host))
    forwarded_for.append(client_ip.encode("ascii"))
    out.append((b"x-forwarded-for", b", ".join(forwarded_for)))
    out.append((b"x-forwarded-proto", b"http"))
    if host is not None:
        out.append((b"x-forwarded-host", host))
    out.append((b"x-request-id", request_id.encode("ascii")))
    if trailers:
        out.append((b"te", b"trailers"))
    if upgrade:
        out.append((b"connection", b"upgrade"))
        out.append((b"upgrade", upgrade))
    if chunked:
        out.append((b"transfer-encoding", b"chunked"))
    return out


def to_client(headers: Headers, *, request_id: str, listed: frozenset | None = None,
              chunked: bool | None = None) -> Headers:
    """Headers for the response we send to the client.

    Framing is redone on the client side (ClientConnection.send_response):
    if the backend sent a chunked body its Content-Length (if any) is
    meaningless and is dropped, and the body goes out chunked again.  The
    Trailer header is kept: the trailers it announces are passed through
    where the client can take them.
    """
    listed = _connection_tokens(headers) if listed is None else listed - _NOT_LISTABLE
    if chunked is None:
        chunked = any(name == b"transfer-encoding" for name, _ in headers)
    out: Headers = []
    dropped = _TO_CLIENT_DROPPED | listed if listed else _TO_CLIENT_DROPPED
    for pair in headers:
        name = pair[0]
        if name in dropped or (chunked and name == b"content-length"):
            continue
        out.append(pair)
    out.append((b"x-request-id", request_id.encode("ascii")))
    return out


def switching(headers: Headers, *, request_id: str, upgrade: bytes) -> Headers:
    """Headers of a 101 to the client: the backend's, with the switch
    itself (Upgrade, Connection: upgrade) said again, as hop-by-hop as ever."""
    out = to_client(headers, request_id=request_id, chunked=False)
    out.append((b"connection", b"upgrade"))
    out.append((b"upgrade", upgrade))
    return out


def wants_html(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"accept":
            return b"text/html" in value
    return False
