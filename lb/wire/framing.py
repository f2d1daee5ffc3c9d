"""The balancer's framing rules, stated once for every HTTP engine (sans-io).

An engine (h11 or httptools) only tokenizes: it hands over a request line
and header pairs as it read them.  Whether that is a request a proxy may
forward, where its body ends and whether the connection lives on is decided
here, so both engines give the same answer to the same bytes -- including
where one parser is more lenient than the other.  A request smuggled past a
proxy is a request whose boundaries the proxy and the backend see
differently; these rules refuse every ambiguous shape instead of guessing.

    check_request(...)   -> Request, or raises Refused(status, reason)
    check_response(...)  -> Response, or raises Refused (the backend's fault)
"""

from __future__ import annotations

import itertools
import os
import re

# RFC 9110 §5.6.2: a header name is a token.
TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A field value may hold any visible byte, space and tab -- never NUL, CR or
# LF (RFC 9110 §5.5).  A CR or LF inside a value is how obs-fold (RFC 9112
# §5.2) and header injection look after a lenient parser has read them.
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# A method is a token too; upper case is not required, but nothing else is.
_METHOD = TOKEN
# The methods the balancer forwards: those llhttp knows (RFC 9110's, PATCH,
# WebDAV's and a few more).  Any other is 501 Not Implemented (RFC 9110
# §9.1), whichever engine reads it.
METHODS = frozenset(b"""DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE
    PROPFIND PROPPATCH SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE
    M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE
    QUERY""".split())
# All of a head's names joined by ":" (which no token holds).
_NAMES = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?::[!#$%&'*+\-.^_`|~0-9A-Za-z]+)*")
# The request fields framing reads; every other one is passed over.
_REQUEST_FIELDS = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection",
                             b"upgrade", b"expect", b"te", b"x-request-id"})
_RESPONSE_FIELDS = frozenset({b"content-length", b"transfer-encoding", b"connection",
                              b"upgrade"})
# Host: uri-host [ ":" port ] (RFC 9110 §7.2): a reg-name, an IPv4 address or
# a bracketed IPv6 literal.  No userinfo, no path, no spaces.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")
_ABSOLUTE = re.compile(rb"(?i)(https?)://([^/?#]*)([^#]*)")
_AUTHORITY = re.compile(rb"[^/?#@\s]+:[0-9]+")
# A client's request id is kept only if it is short, visible ASCII: it goes
# into log lines and other systems' headers.
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")
_DIGITS = re.compile(rb"[0-9]{1,18}")

NO_BODY_STATUSES = frozenset({204, 304})

# A header field's bytes besides its name and value, as an engine counts a
# parsed head's size: for a request the least a field takes (":" and CRLF),
# since HeadScanner counts the raw bytes exactly and the parsed count must
# never say more; for a response as fields are written (": " and CRLF),
# since the parsed count is the limit there when a head comes in one read.
REQUEST_FIELD_BYTES = 3
RESPONSE_FIELD_BYTES = 4
CONNECT_REFUSED = "CONNECT is not supported: the balancer is not a forward proxy"
HTTP2_REFUSED = "an HTTP/2 connection preface: HTTP/2 is not supported (HTTP/1.1 and 1.0 are)"
_NONE: frozenset = frozenset()


class Refused(Exception):
    """The message cannot be forwarded: answer `status` naming `reason`."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


# Generated ids: a random per-process prefix and a counter, 32 hex digits.
# As unique as uuid4 across processes, without a getrandom() call per request.
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(int.from_bytes(os.urandom(4), "big"))


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFFFFFFFFFF:016x}"


class Request:
    """A request head the balancer accepted, with its framing settled."""
    __slots__ = ("method", "target", "version", "headers", "request_id", "content_length",
                 "chunked", "keep_alive", "expect_continue", "host", "head_size",
                 "connection_tokens", "trailers_ok", "path", "upgrade")

    def __init__(self, method: bytes, target: bytes, version: bytes, headers: list):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.request_id = ""
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.expect_continue = False
        self.host: bytes | None = None
        self.head_size = 0
        self.connection_tokens: frozenset = _NONE
        self.trailers_ok = False        # the client sent TE: trailers
        self.path = target
        self.upgrade = b""              # Upgrade's value, when the client asks to switch

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


class Response:
    """A backend's response head, with its framing settled."""
    __slots__ = ("status", "reason", "version", "headers", "content_length", "chunked",
                 "keep_alive", "until_close", "connection_tokens", "upgrade")

    def __init__(self, status: int, reason: bytes, version: bytes, headers: list):
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.until_close = False        # the body ends when the backend closes
        self.connection_tokens: frozenset = _NONE
        self.upgrade = b""              # a 101's Upgrade: the connection is a tunnel now


def _tokens(value: bytes) -> list[bytes]:
    if b"," not in value:       # the usual case: one token
        token = value.strip().lower()
        return [token] if token else []
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


def _strict_tokens(value: bytes) -> list[bytes]:
    """A list where an empty element is an error (Transfer-Encoding: a
    lenient reading of it is how framing is smuggled)."""
    tokens = [t.strip().lower() for t in value.split(b",")]
    if not all(tokens):
        raise Refused(400, "malformed request: an empty element in Transfer-Encoding")
    return tokens


def check_version(version: bytes) -> None:
    if version != b"1.1" and version != b"1.0":
        raise Refused(505, f"HTTP version {version.decode('ascii', 'replace')} is not "
                           "supported (HTTP/1.1 and HTTP/1.0 are)")


def check_request(method: bytes, target: bytes, version: bytes, headers: list,
                  head_size: int, max_head: int) -> Request:
    """The rules a request head must meet before anything is forwarded."""
    if method == b"PRI":
        raise Refused(505, HTTP2_REFUSED)
    check_version(version)
    if head_size > max_head:
        raise Refused(431, head_too_large(max_head))
    if method not in METHODS:
        if not _METHOD.fullmatch(method):
            raise Refused(400, "malformed request: invalid method")
        raise Refused(501, f"method {method.decode('ascii')} is not supported")
    request = Request(method, target, version, headers)
    request.head_size = head_size
    # Names and values are checked all at once (one join, one regex each):
    # this runs for every request.
    if headers:
        names = b":".join([n for n, _ in headers])
        if not _NAMES.fullmatch(names):
            raise Refused(400, "malformed request: invalid header name")
        if _BAD_VALUE.search(b"\t".join([v for _, v in headers])):
            bad = next(n for n, v in headers if _BAD_VALUE.search(v))
            raise Refused(400, f"malformed request: invalid character in the value of "
                               f"{bad.decode('ascii')} (obs-fold, NUL, CR or LF)")
    host = rid = None
    hosts = lengths = 0
    upgrade = None
    codings: list[bytes] | None = None
    tokens: list[bytes] = []
    for name, value in headers:
        if name not in _REQUEST_FIELDS:
            continue
        if name == b"host":
            hosts += 1
            host = value
        elif name == b"content-length":
            lengths += 1
            if not _DIGITS.fullmatch(value):
                raise Refused(400, "malformed request: invalid Content-Length")
            if lengths > 1:
                raise Refused(400, "malformed request: more than one Content-Length")
            request.content_length = int(value)
        elif name == b"transfer-encoding":
            codings = (codings or []) + _strict_tokens(value)
        elif name == b"connection":
            tokens += _tokens(value)
        elif name == b"upgrade":
            value = value.strip()
            if upgrade is None:
                upgrade = value
            elif value:
                upgrade = upgrade + b", " + value if upgrade else value
        elif name == b"expect":
            request.expect_continue = value.strip().lower() == b"100-continue"
        elif name == b"te":
            request.trailers_ok = b"trailers" in _tokens(value)
        elif rid is None and _REQUEST_ID.fullmatch(value):   # x-request-id
            rid = value.decode("ascii")
    if codings is not None:
        # RFC 9112 §6.1: chunked must be the final coding; the balancer takes
        # no other (it would have to decode them to find the body's end).
        if codings != [b"chunked"]:
            raise Refused(400, "malformed request: Transfer-Encoding other than chunked")
        if request.content_length is not None:
            raise Refused(400, "request has both Content-Length and Transfer-Encoding")
        if version == b"1.0":
            raise Refused(400, "malformed request: Transfer-Encoding in an HTTP/1.0 request")
        request.chunked = True
    if tokens:
        request.connection_tokens = frozenset(tokens)
    if version == b"1.0":
        request.keep_alive = False   # as h11: no keep-alive with HTTP/1.0 clients
        request.expect_continue = False
    elif b"close" in tokens:
        request.keep_alive = False
    if upgrade is not None and b"upgrade" in tokens:
        if request.has_body:
            # llhttp reads no body after such a head, and what follows a
            # switch is the new protocol's: refused, so no engine can take
            # a body for the next request.
            raise Refused(400, "malformed request: an Upgrade request with a body")
        if upgrade and version == b"1.1":
            request.upgrade = upgrade   # asks to switch (a WebSocket, say)
    if hosts > 1:
        raise Refused(400, "malformed request: more than one Host header")
    if host is not None and not _HOST.fullmatch(host):
        raise Refused(400, "malformed request: invalid Host header")
    if version == b"1.1" and host is None:
        # RFC 9112 §3.2: even with an absolute-form target.
        raise Refused(400, "malformed request: HTTP/1.1 request without a Host header")
    _settle_target(request, host)
    request.request_id = rid or new_request_id()
    return request


def _settle_target(request: Request, host: bytes | None) -> None:
    """RFC 9112 §3.2: the four forms of request-target, as a proxy takes them."""
    target = request.target
    request.host = host
    if request.method == b"CONNECT":
        raise Refused(405, CONNECT_REFUSED)
    if target[:1] == b"/":
        request.path = target.split(b"?", 1)[0]
        return
    if target == b"*":
        if request.method != b"OPTIONS":
            raise Refused(400, "malformed request: the * target is only for OPTIONS")
        request.path = target
        return
    absolute = _ABSOLUTE.fullmatch(target)
    if absolute is not None:
        authority, rest = absolute.group(2), absolute.group(3) or b"/"
        if not authority or b"@" in authority or not _HOST.fullmatch(authority):
            raise Refused(400, "malformed request: invalid authority in the target")
        if rest[:1] != b"/":
            rest = b"/" + rest
        if host is not None and host.lower() != authority.lower():
            raise Refused(400, "malformed request: Host header differs from the target's "
                               "authority")
        # Forwarded in origin-form, with Host from the target (§3.2.2).
        request.target = rest
        request.path = rest.split(b"?", 1)[0]
        request.host = authority
        request.headers = [(n, authority if n == b"host" else v) for n, v in request.headers]
        if host is None:
            request.headers.insert(0, (b"host", authority))
        return
    if _AUTHORITY.fullmatch(target):
        raise Refused(400, "malformed request: an authority-form target is only for CONNECT")
    raise Refused(400, "malformed request: invalid request target")


def head_too_large(limit: int) -> str:
    return f"request head larger than limits.max_header_bytes ({limit} bytes)"


def response_head_too_large(limit: int) -> str:
    return (f"backend response head larger than limits.max_response_header_bytes "
            f"({limit} bytes)")


def check_response(status: int, reason: bytes, version: bytes, headers: list,
                   request_method: bytes) -> Response:
    """A backend's response head: where its body ends, and may the
    connection carry another request afterwards.  (Runs for every response:
    one pass, no regex; both parsers have refused bad bytes in values.)"""
    if version != b"1.1" and version != b"1.0":
        raise Refused(502, f"backend answered in HTTP/{version.decode('ascii', 'replace')}")
    response = Response(status, reason, version, headers)
    length = codings = tokens = None
    for name, value in headers:
        if name not in _RESPONSE_FIELDS:
            continue
        if name == b"upgrade":
            response.upgrade = value.strip()
        elif name == b"content-length":
            value = value.strip()
            if length is not None and value != length:
                raise Refused(502, "backend sent differing Content-Lengths")
            length = value
        elif name == b"transfer-encoding":
            codings = (codings or []) + _tokens(value)
        else:   # connection
            tokens = (tokens or []) + _tokens(value)
    keep_alive = version == b"1.1"
    if tokens is not None:
        response.connection_tokens = frozenset(tokens)
        if b"close" in tokens:
            keep_alive = False
        elif b"keep-alive" in tokens and version == b"1.0":
            keep_alive = True
    response.keep_alive = keep_alive
    if status == 101:
        # RFC 9110 §15.2.2, §7.8: a switch names the protocol and lists
        # upgrade in Connection; without them where the tunnel starts is
        # anyone's guess.
        if not response.upgrade or b"upgrade" not in (tokens or ()):
            raise Refused(502, "backend answered 101 without Upgrade and Connection: upgrade")
        response.content_length = 0
        response.keep_alive = False
        return response
    response.upgrade = b""
    if request_method == b"HEAD" or status in NO_BODY_STATUSES or status < 200:
        response.content_length = 0
        # HEAD answers are not kept: one engine cannot be told that a
        # Content-Length there describes no body.
        response.keep_alive = keep_alive and request_method != b"HEAD"
        return response
    if codings is not None:
        if not codings or codings[-1] != b"chunked":
            response.until_close = True     # RFC 9112 §6.3 rule 4
            response.keep_alive = False
            return response
        response.chunked = True
        if length is not None:
            response.keep_alive = False     # §6.3 rule 3: close after this one
        return response
    if length is not None:
        if not length.isdigit() or len(length) > 18:
            raise Refused(502, "backend sent an invalid Content-Length")
        response.content_length = int(length)
        return response
    response.until_close = True
    response.keep_alive = False
    return response


# RFC 9112 §2.2: a server should ignore at least one empty line before a
# request line (some clients send a CRLF after a POST body).
_LEADING_EMPTY = re.compile(rb"(?:\r?\n)+")


def skip_empty_lines(data: bytes) -> bytes:
    match = _LEADING_EMPTY.match(data)
    return data[match.end():] if match else data


TRAILER_FORBIDDEN = frozenset({b"content-length", b"transfer-encoding", b"host",
                               b"trailer", b"te", b"connection", b"keep-alive", b"upgrade",
                               b"proxy-authorization", b"proxy-connection"})


_FRAMING_FIELDS = frozenset({b"content-length", b"transfer-encoding"})


def trailers_problem(trailers: list) -> str | None:
    """Trailers may not frame (RFC 9110 §6.5.1): llhttp refuses them, and so
    does the balancer with either engine."""
    if any(name in _FRAMING_FIELDS for name, _ in trailers):
        return "malformed request: Content-Length or Transfer-Encoding in the trailers"
    return None


def clean_trailers(trailers: list) -> list:
    """Trailer fields that may be passed on (none that frame or route)."""
    return [(n, v) for n, v in trailers
            if n not in TRAILER_FORBIDDEN and TOKEN.fullmatch(n) and not _BAD_VALUE.search(v)]
