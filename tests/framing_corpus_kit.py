"""The framing corpus's vocabulary (the cases are in framing_cases*.py), as data: raw client bytes and what must come of them (both engines).

Each Case is the bytes a client sends (one or more pieces, PAUSE seconds apart), the
statuses it must get back in order (100 for an interim 100 Continue), and the requests the
backend must have seen, in order (Seen: method, origin-form target, Host, body, trailers).
The answers are lb/wire/framing.py's stated rules: a shape that could be read two ways is
refused (400, 431, 505, 405 for CONNECT), never guessed at; a refused request is answered
and the connection closed, and nothing of it (or after it) reaches the backend.
test_framing_corpus.py runs every case against a balancer per engine.
"""
from __future__ import annotations

from dataclasses import dataclass

HOST = b"a.example"
BACKEND_HOST = b"<backend>"   # Seen.host: the backend's own host:port (a request without Host)
PAUSE = 0.15                  # seconds between pieces: long enough for the previous to be read
LIMIT = 16384                 # limits.max_header_bytes, the default
# timeouts.client_header and timeouts.idle in the test config: short, for the few cases that
# wait for them, and far enough apart that a 408 on the wrong clock misses its read timeout.
CLIENT_HEADER = 2.0
IDLE = 6.0


@dataclass(frozen=True)
class Seen:
    """One request as the backend must have seen it."""
    method: bytes = b"GET"
    target: bytes = b"/"
    host: bytes = HOST          # the value of its one Host header
    body: bytes = b""
    trailers: tuple = ()        # ((lowercase name, value), ...), exactly these
    headers: tuple = ()         # (lowercase name, value) pairs among its headers
    absent: tuple = ()          # lowercase header names it must not carry
    carried: tuple = ()         # hop-by-hop names it carries all the same (an upgrade's)


@dataclass(frozen=True)
class Case:
    id: str
    pieces: tuple               # bytes, sent in order PAUSE apart
    statuses: tuple             # the answers, in order
    seen: tuple = ()            # the requests the backend saw, in order
    closes: bool | None = None  # the balancer closes after the last answer (None: iff an error)
    head_only: tuple = ()       # indexes of answers to HEAD (a head, no body)
    wait: float = 0.0           # the case waits for a timeout this long
    # Known, documented differences: engine -> why that engine answers
    # otherwise (the test marks the case xfail, strict, for that engine).
    known: tuple = ()

    @property
    def expect_close(self) -> bool:
        return self.closes if self.closes is not None else self.statuses[-1] >= 400


def head(method=b"GET", target=b"/", version=b"HTTP/1.1", *fields, host=HOST) -> bytes:
    lines = [b"%s %s %s" % (method, target, version)]
    if host is not None:
        lines.append(b"Host: " + host)
    return b"\r\n".join([*lines, *fields]) + b"\r\n\r\n"


def get(*fields, target=b"/", host=HOST) -> bytes:
    return head(b"GET", target, b"HTTP/1.1", *fields, host=host)


def post(body: bytes, *fields, target=b"/p") -> bytes:
    return head(b"POST", target, b"HTTP/1.1", b"Content-Length: %d" % len(body), *fields) + body


def chunked(*data: bytes, trailers=()) -> bytes:
    return (b"".join(b"%x\r\n%s\r\n" % (len(d), d) for d in data) + b"0\r\n"
            + b"".join(t + b"\r\n" for t in trailers) + b"\r\n")


def post_head(*fields, version=b"HTTP/1.1") -> bytes:
    """A POST head to /p with these fields (and Host), no body."""
    return head(b"POST", b"/p", version, *fields)


def post_chunked(body: bytes, *fields, target=b"/p") -> bytes:
    """A chunked POST head; `body` is the raw chunked body that follows."""
    return head(b"POST", target, b"HTTP/1.1", b"Transfer-Encoding: chunked", *fields) + body


def payload(n: int) -> bytes:
    return (b"0123456789abcdefghijklmnopqrstuvwxyz\n" * (n // 37 + 1))[:n]


CASES: list[Case] = []


def ok(id: str, data, *seen: Seen, **kw) -> None:
    """Every request forwarded and answered 200 (data: bytes, or a tuple of pieces)."""
    seen = seen or (Seen(),)
    pieces = data if isinstance(data, tuple) else (data,)
    CASES.append(Case(id, pieces, kw.pop("statuses", (200,) * len(seen)), seen, **kw))


def refused(id: str, data, status: int = 400, *, before=(), **kw) -> None:
    """The requests in `before` forwarded and answered 200, then `status` (and close)."""
    pieces = data if isinstance(data, tuple) else (data,)
    CASES.append(Case(id, pieces, (200,) * len(before) + (status,), tuple(before), **kw))


HELLO = b"hello"
POSTED = Seen(b"POST", b"/p", body=HELLO)
CHUNKED_HELLO = chunked(HELLO)
FIRST = Seen(target=b"/1")
GET1 = get(target=b"/1")
