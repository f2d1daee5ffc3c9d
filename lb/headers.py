"""Header rewriting between client and backend (sans-io, pure functions).

h11 hands us headers as (lowercased name, value) byte pairs.  A proxy must not
forward hop-by-hop headers (they describe one connection, RFC 9110 §7.6.1),
must add the X-Forwarded-* trio, and carries one request id end to end.
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Iterable, NamedTuple

import h11

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


# Generated ids: a random per-process prefix and a counter, 32 hex digits.
# As unique as uuid4 across processes, without a getrandom() call per request.
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(int.from_bytes(os.urandom(4), "big"))


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFFFFFFFFFF:016x}"


class RequestInfo(NamedTuple):
    """What the balancer needs from a request head, read in one pass."""
    headers: Headers            # (lowercased name, value) pairs, in order
    request_id: str             # the client's X-Request-ID if usable, else a new one
    content_length: int | None
    chunked: bool
    head_size: int              # bytes of the head as sent, give or take whitespace
    problem: str | None         # why the framing is ambiguous, if it is


def inspect_request(request: h11.Request) -> RequestInfo:
    headers = as_list(request.headers)
    rid = None
    length = None
    chunked = False
    size = len(request.method) + len(request.target) + 12  # spaces, version, CRLFs
    for name, value in headers:
        size += len(name) + len(value) + 4
        if name == b"content-length":
            length = int(value)  # h11 validated it
        elif name == b"transfer-encoding":
            chunked = True
        elif name == b"x-request-id" and rid is None and _REQUEST_ID.fullmatch(value):
            rid = value.decode("ascii")
    # h11 rejects conflicting Content-Lengths and unknown transfer codings;
    # it lets Transfer-Encoding win over Content-Length, which is the classic
    # request-smuggling shape, so a proxy refuses it outright.
    problem = ("request has both Content-Length and Transfer-Encoding"
               if chunked and length is not None else None)
    return RequestInfo(headers, rid or new_request_id(), length, chunked, size, problem)


def as_list(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """h11's Headers as a plain list, cheaply.

    h11.Headers is a Sequence whose iteration goes through the ABC's
    __getitem__ per item; its private list is read directly when present.
    """
    full = getattr(headers, "_full_items", None)
    if full is not None:
        return [(name, value) for _, name, value in full]
    return list(headers)


def _trusted(cls, **fields):
    """Build an h11 event without re-validating header bytes.

    Every header we send came out of h11's parser (already validated) or is a
    constant/ASCII value of ours, so h11's per-header regex checks would only
    repeat work; `_parsed` is h11's own flag for that.  Falls back to the
    public constructor if a future h11 drops the flag.
    """
    try:
        return cls(**fields, _parsed=True)
    except TypeError:
        return cls(**fields)


def request_event(method: bytes, target: bytes, headers: Headers) -> h11.Request:
    return _trusted(h11.Request, method=method, target=target, headers=headers,
                    http_version=b"1.1")


def response_event(status: int, headers: Headers, reason: bytes) -> h11.Response:
    return _trusted(h11.Response, status_code=status, headers=headers, reason=reason,
                    http_version=b"1.1")


def to_backend(headers: Headers, *, client_ip: str, request_id: str,
               chunked: bool, default_host: bytes = b"") -> Headers:
    """Headers for the request we send upstream.

    The client's Host is passed through (as HAProxy does); a request without
    one (HTTP/1.0) gets `default_host`, since HTTP/1.1 requires it.
    """
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
    if host is None and default_host:
        out.insert(0, (b"host", default_host))
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


def wants_html(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"accept":
            return b"text/html" in value
    return False
