"""Sans-io tests for lb.wire.framing, lb.wire.serialize and the two engines.

The engines are run without sockets: bytes in, the sink's events out.  The
properties say that both engines hand over the same events for the same
bytes however they are split, and that what `serialize` writes, both parse
back to what was written.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.wire import engines, serialize
from lb.wire.framing import (Refused, check_request, check_response, clean_trailers,
                             skip_empty_lines)
from lb.wire.head_scan import HeadScanner

LIMIT = 16384


def check(target=b"/", method=b"GET", version=b"1.1", headers=((b"host", b"h"),)):
    return check_request(method, target, version, list(headers), 100, LIMIT)


def refused(**kwargs) -> Refused:
    with pytest.raises(Refused) as info:
        check(**kwargs)
    return info.value


# --- request heads


def test_a_plain_request_keeps_alive_and_has_no_body():
    request = check()
    assert request.keep_alive and not request.has_body and request.host == b"h"
    assert request.path == b"/" and request.request_id


@pytest.mark.parametrize("headers, status", [
    ([(b"content-length", b"3"), (b"transfer-encoding", b"chunked")], 400),
    ([(b"transfer-encoding", b"chunked"), (b"content-length", b"3")], 400),
    ([(b"transfer-encoding", b"gzip")], 400),
    ([(b"transfer-encoding", b"gzip, chunked")], 400),
    ([(b"transfer-encoding", b"chunked, gzip")], 400),
    ([(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")], 400),
    ([(b"content-length", b"1"), (b"content-length", b"2")], 400),
    ([(b"content-length", b"1"), (b"content-length", b"1")], 400),
    ([(b"content-length", b"-1")], 400),
    ([(b"content-length", b"+1")], 400),
    ([(b"content-length", b"0x10")], 400),
    ([(b"x", b"a\r\n b")], 400),
    ([(b"x", b"a\x00b")], 400),
    ([(b"bad name", b"v")], 400),
    ([(b"host", b"a b")], 400),
    ([(b"host", b"user@evil.example")], 400),
    ([(b"host", b"a"), (b"host", b"b")], 400),
])
def test_ambiguous_framing_is_refused(headers, status):
    assert refused(headers=[(b"host", b"h"), *headers] if not any(
        n == b"host" for n, _ in headers) else headers).status == status


def test_chunked_and_length_are_read():
    assert check(headers=[(b"host", b"h"), (b"transfer-encoding", b"Chunked")]).chunked
    assert check(headers=[(b"host", b"h"), (b"content-length", b"12")]).content_length == 12


@pytest.mark.parametrize("version", [b"2.0", b"1.2", b"0.9", b"3.0"])
def test_other_versions_get_505(version):
    assert refused(version=version).status == 505


def test_http10_closes_and_needs_no_host():
    request = check(version=b"1.0", headers=[])
    assert not request.keep_alive and request.host is None
    assert refused(version=b"1.0", headers=[(b"transfer-encoding", b"chunked")]).status == 400


def test_http11_needs_a_host():
    assert "without a Host" in refused(headers=[]).reason


def test_connection_close_and_expect_and_te():
    request = check(headers=[(b"host", b"h"), (b"connection", b"Close"),
                             (b"expect", b"100-Continue"), (b"te", b"trailers")])
    assert not request.keep_alive and request.expect_continue and request.trailers_ok


def test_absolute_form_becomes_origin_form_with_the_targets_host():
    request = check(target=b"http://a.example:81/x?y=1", headers=[(b"host", b"a.example:81")])
    assert request.target == b"/x?y=1" and request.path == b"/x"
    assert request.headers[0] == (b"host", b"a.example:81")
    same = check(target=b"http://A.example/", headers=[(b"host", b"a.example")])
    assert same.target == b"/" and same.headers == [(b"host", b"A.example")]
    # HTTP/1.0 may leave Host out: it comes from the target.
    old = check(target=b"http://a.example", version=b"1.0", headers=[])
    assert old.target == b"/" and old.headers == [(b"host", b"a.example")]
    # HTTP/1.1 must send it, absolute-form or not (RFC 9112 §3.2).
    assert refused(target=b"http://a.example/", headers=[]).status == 400


def test_absolute_form_disagreeing_with_host_is_refused():
    assert "differs" in refused(target=b"http://a.example/", headers=[(b"host", b"b")]).reason
    assert refused(target=b"http://u@a.example/", headers=[(b"host", b"a.example")]).status == 400


@pytest.mark.parametrize("method, target, status", [
    (b"CONNECT", b"a.example:443", 405),
    (b"CONNECT", b"/", 405),           # CONNECT in any form: not an open proxy
    (b"GET", b"a.example:443", 400),
    (b"GET", b"*", 400),
    (b"GET", b"x", 400),
    (b"GET", b"", 400),
    (b"G@T", b"/", 400),
    (b"FOO", b"/", 501),
    (b"get", b"/", 501),
    (b"PRI", b"*", 505),
])
def test_target_forms_and_methods(method, target, status):
    assert refused(method=method, target=target).status == status


def test_an_upgrade_request_with_a_body_is_refused():
    upgrade = [(b"host", b"h"), (b"connection", b"Upgrade"), (b"upgrade", b"websocket")]
    assert refused(headers=upgrade + [(b"content-length", b"5")]).status == 400
    assert check(headers=upgrade).keep_alive    # (without a body: an ordinary request)


@pytest.mark.parametrize("value", [b", chunked", b"chunked,", b"chunked, , gzip"])
def test_an_empty_transfer_coding_is_refused(value):
    assert refused(headers=[(b"host", b"h"), (b"transfer-encoding", value)]).status == 400


def test_options_star_is_forwarded():
    assert check(method=b"OPTIONS", target=b"*").target == b"*"


def test_head_size_over_the_limit_is_431():
    with pytest.raises(Refused) as info:
        check_request(b"GET", b"/", b"1.1", [(b"host", b"h")], LIMIT + 1, LIMIT)
    assert info.value.status == 431


# --- raw head bytes, however they arrive


BAD_HEADS = [
    b"GET / HTTP/1.1\rHost: h\r\n\r\n",
    b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.1 \r\nHost: h\r\n\r\n",
    b"GET /\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\n\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\x01\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00\r\n\r\n",
    b"GET / HTTP/1.1\nHost: h\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\ncontent-length: 1\r\n\r\n",
]
GOOD_HEADS = [
    b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length:\t5 \r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc",
    b"GET / HTTP/1.1\r\nHost: h\r\nX: a\tb\r\n\r\nbinary\r\x00\n after the head",
]


def _scan(pieces: list[bytes]) -> str | None:
    scanner = HeadScanner(LIMIT)
    try:
        for piece in pieces:
            scanner.feed(piece)
    except Refused as exc:
        return exc.reason
    return None


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return [p for p in out if p]


@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, len(BAD_HEADS) + len(GOOD_HEADS) - 1),
       cuts=st.lists(st.integers(0, 200), max_size=6))
def test_the_scanner_gives_one_verdict_however_a_head_is_split(which, cuts):
    heads = BAD_HEADS + GOOD_HEADS
    head = heads[which]
    verdict = _scan(_split(head, cuts))
    assert (verdict is not None) == (which < len(BAD_HEADS)), (head, verdict)


def test_the_scanner_counts_a_head_arriving_in_pieces():
    scanner = HeadScanner(100)
    scanner.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(Refused) as info:
        for _ in range(10):
            scanner.feed(b"X-Pad: " + b"p" * 10 + b"\r\n")
    assert info.value.status == 431


def test_leading_empty_lines_are_skipped():
    assert skip_empty_lines(b"\r\n\n\r\nGET") == b"GET"
    assert skip_empty_lines(b"GET") == b"GET"


# --- responses


@pytest.mark.parametrize("status, method, headers, length, chunked, close, keep", [
    (200, b"GET", [(b"content-length", b"3")], 3, False, False, True),
    (200, b"GET", [(b"transfer-encoding", b"chunked")], None, True, False, True),
    (200, b"GET", [], None, False, True, False),
    (204, b"GET", [(b"content-length", b"9")], 0, False, False, True),
    (304, b"GET", [], 0, False, False, True),
    (200, b"HEAD", [(b"content-length", b"9")], 0, False, False, False),
    (200, b"GET", [(b"transfer-encoding", b"chunked"), (b"content-length", b"3")],
     None, True, False, False),
    (200, b"GET", [(b"transfer-encoding", b"gzip")], None, False, True, False),
    (200, b"GET", [(b"content-length", b"3"), (b"connection", b"close")], 3, False, False,
     False),
])
def test_response_framing(status, method, headers, length, chunked, close, keep):
    response = check_response(status, b"OK", b"1.1", headers, method)
    assert (response.content_length, response.chunked, response.until_close,
            response.keep_alive) == (length, chunked, close, keep)


def test_bad_response_lengths_are_the_backends_fault():
    with pytest.raises(Refused) as info:
        check_response(200, b"", b"1.1", [(b"content-length", b"1"), (b"content-length", b"2")],
                       b"GET")
    assert info.value.status == 502
    assert not check_response(200, b"", b"1.0", [(b"content-length", b"1")], b"GET").keep_alive


def test_trailers_that_frame_or_route_are_not_passed_on():
    assert clean_trailers([(b"x-sum", b"1"), (b"content-length", b"3"), (b"host", b"h"),
                           (b"bad name", b"v"), (b"x-ok", b"a\r\nb")]) == [(b"x-sum", b"1")]


# --- the two engines, side by side


class Sink:
    def __init__(self):
        self.events: list = []
        self.parser = None

    def on_head(self, *args):
        self.events.append(("head", *args[:4]))

    def on_body(self, data):
        if self.events and self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + data)
        else:
            self.events.append(("body", data))

    def on_end(self, trailers):
        self.events.append(("end", trailers))

    def on_error(self, *args):
        self.events.append(("error",))


def _requests_through(engine: str, pieces: list[bytes]) -> list:
    request_parser, _ = engines.parsers(engine)
    sink = Sink()
    parser = request_parser(sink, LIMIT)
    for piece in pieces:
        parser.feed(piece)
    while True:     # answer each request at once: the next one is read
        before = len(sink.events)
        parser.next_message()
        if len(sink.events) == before:
            return sink.events


_names = st.sampled_from([b"X-A", b"x-b", b"Accept", b"X-Request-ID"])
_values = st.binary(min_size=0, max_size=12).map(
    lambda b: bytes(c for c in b if 0x21 <= c <= 0x7e))
_bodies = st.binary(max_size=40)


@st.composite
def _request_bytes(draw) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT"]))
    headers = draw(st.lists(st.tuples(_names, _values), max_size=4))
    head = [method + b" /p" + draw(st.sampled_from([b"", b"?q=1"])) + b" HTTP/1.1",
            b"Host: h"] + [n + b": " + v for n, v in headers]
    body = draw(_bodies)
    if draw(st.booleans()):
        head.append(b"Content-Length: " + str(len(body)).encode())
        framed = body
    else:
        head.append(b"Transfer-Encoding: chunked")
        framed = b"".join(b"".join(serialize.chunk(body[i:i + 7]))
                          for i in range(0, len(body), 7))
        framed += serialize.last_chunk(draw(st.sampled_from([[], [(b"x-sum", b"1")]])))
    return b"\r\n".join(head) + b"\r\n\r\n" + framed


@pytest.mark.skipif(not engines.available("httptools"), reason="httptools not installed")
@settings(max_examples=200, deadline=None)
@given(requests=st.lists(_request_bytes(), min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 400), max_size=5))
def test_both_engines_hand_over_the_same_requests_however_split(requests, cuts):
    data = b"".join(requests)
    pieces = _split(data, cuts)
    h11_events = _requests_through("h11", pieces)
    llhttp_events = _requests_through("httptools", pieces)
    assert h11_events == llhttp_events
    assert sum(1 for e in h11_events if e[0] == "end") == len(requests)


@pytest.mark.parametrize("engine", engines.ENGINES)
def test_what_serialize_writes_parses_back(engine):
    if not engines.available(engine):
        pytest.skip(f"{engine} not installed")
    head = serialize.request_head(b"POST", b"/x", [(b"host", b"h"),
                                                   (b"transfer-encoding", b"chunked")])
    body = b"".join(serialize.chunk(b"abc")) + serialize.last_chunk([(b"x-sum", b"9")])
    events = _requests_through(engine, [head + body])
    assert events == [("head", b"POST", b"/x", b"1.1", [(b"host", b"h"),
                                                        (b"transfer-encoding", b"chunked")]),
                      ("body", b"abc"), ("end", [(b"x-sum", b"9")])]


def test_response_heads_are_written_with_the_reason():
    assert serialize.response_head(200, b"", [(b"a", b"1")]) == b"HTTP/1.1 200 OK\r\na: 1\r\n\r\n"
    assert serialize.response_head(299, b"", []) == b"HTTP/1.1 299 \r\n\r\n"


def test_auto_takes_httptools_when_installed():
    assert engines.resolve("auto") == ("httptools" if engines.available("httptools") else "h11")
    assert engines.resolve("h11") == "h11"


@pytest.mark.parametrize("which", range(len(BAD_HEADS) + len(GOOD_HEADS)))
def test_the_scanner_verdict_for_every_single_and_byte_by_byte_split(which):
    head = (BAD_HEADS + GOOD_HEADS)[which]
    bad = which < len(BAD_HEADS)
    for cut in range(1, len(head)):
        assert (_scan([head[:cut], head[cut:]]) is not None) == bad, (head, cut)
    assert (_scan([head[i:i + 1] for i in range(len(head))]) is not None) == bad


def _response_through(engine: str, data: bytes) -> list:
    _, response_parser = engines.parsers(engine)
    sink = Sink()
    events = sink.events
    sink.on_head = lambda *args: events.append(("head", *args))
    parser = response_parser(sink, 65536)
    parser.expect(b"GET")
    parser.feed(data)
    return events


@pytest.mark.skipif(not engines.available("httptools"), reason="httptools not installed")
def test_both_engines_hand_over_the_same_response_head_and_size():
    data = (b"HTTP/1.1 200 OK\r\nServer: gpu \t\r\nContent-Length: 2\r\n\r\nok")
    h11_events = _response_through("h11", data)
    assert h11_events == _response_through("httptools", data)
    assert h11_events[0] == ("head", 200, b"OK", b"1.1",
                             [(b"server", b"gpu"), (b"content-length", b"2")],
                             len(b"HTTP/1.1 200 OK\r\nServer: gpu\r\nContent-Length: 2\r\n"))
