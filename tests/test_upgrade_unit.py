"""Sans-io tests for HTTP Upgrade (a WebSocket, say): the framing rules that
say when a request asks to switch and when a 101 may answer it, both
engines' hand-over of the bytes behind an upgrade head (detach) or their
reading on as the next request, and the access log's `ended=`.

The engines run without sockets (bytes in, the sink's events out), with
the Sink and the splitting of tests/test_framing_unit.py.  Requests
pipelined before and after an upgrade head are part of it, and so are a
request answered at once (inside the engine's on_end, as the built-in
endpoints do) and a status line split in its reason: each found a bug.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lb.control import accesslog
from lb.wire import engines
from lb.wire.framing import Refused, check_response
from test_framing_unit import LIMIT, Sink, _request_bytes, _split, check, refused

UPGRADE = [(b"host", b"h"), (b"connection", b"Upgrade"), (b"upgrade", b"websocket")]


# --- framing: does a request ask to switch?


@pytest.mark.parametrize("version, headers, upgrade", [
    (b"1.1", UPGRADE, b"websocket"),
    (b"1.1", [(b"host", b"h"), (b"connection", b"keep-alive, Upgrade"),
              (b"upgrade", b" websocket ")], b"websocket"),
    (b"1.1", [(b"host", b"h"), (b"connection", b"keep-alive"), (b"upgrade", b"websocket"),
              (b"connection", b"upgrade")], b"websocket"),
    (b"1.1", UPGRADE + [(b"upgrade", b"foo/2")], b"websocket, foo/2"),
    (b"1.1", UPGRADE + [(b"content-length", b"0")], b"websocket"),
    # an ordinary request, however much it looks like one
    (b"1.0", UPGRADE, b""),
    (b"1.1", [(b"host", b"h"), (b"upgrade", b"websocket")], b""),
    (b"1.1", [(b"host", b"h"), (b"connection", b"upgraded"), (b"upgrade", b"websocket")], b""),
    (b"1.1", [(b"host", b"h"), (b"connection", b"upgrade")], b""),
    (b"1.1", [(b"host", b"h"), (b"connection", b"upgrade"), (b"upgrade", b"  ")], b""),
])
def test_only_an_http11_request_listing_upgrade_in_connection_asks_to_switch(version, headers,
                                                                             upgrade):
    request = check(version=version, headers=headers)
    assert request.upgrade == upgrade


@pytest.mark.parametrize("version, body", [
    (b"1.1", (b"content-length", b"5")),
    (b"1.1", (b"transfer-encoding", b"chunked")),
    (b"1.0", (b"content-length", b"1")),
])
def test_an_upgrade_request_with_a_body_is_400(version, body):
    exc = refused(version=version, headers=UPGRADE + [body])
    assert exc.status == 400 and "Upgrade request with a body" in exc.reason


def test_upgrade_headers_without_a_protocol_ask_for_nothing():
    request = check(headers=UPGRADE[:2] + [(b"upgrade", b" "), (b"upgrade", b"")])
    assert request.upgrade == b""


def test_a_body_without_the_connection_token_is_an_ordinary_request():
    request = check(headers=[(b"host", b"h"), (b"upgrade", b"websocket"),
                             (b"content-length", b"5")])
    assert request.upgrade == b"" and request.content_length == 5


def test_an_upgrade_request_may_also_say_close():
    request = check(headers=[(b"host", b"h"), (b"connection", b"Upgrade, close"),
                             (b"upgrade", b"websocket")])
    assert request.upgrade == b"websocket" and not request.keep_alive


_connection_values = st.sampled_from([b"upgrade", b"Upgrade", b"keep-alive", b"close",
                                      b"keep-alive, upgrade", b"upgrade-x", b""])
_fields = st.one_of(
    st.tuples(st.just(b"connection"), _connection_values),
    st.tuples(st.just(b"upgrade"), st.sampled_from([b"websocket", b"h2c", b" websocket "])),
    st.tuples(st.just(b"content-length"), st.sampled_from([b"0", b"3"])),
    st.tuples(st.just(b"transfer-encoding"), st.just(b"chunked")),
    st.tuples(st.just(b"x-other"), st.just(b"upgrade")))


@settings(max_examples=300, deadline=None)
@given(version=st.sampled_from([b"1.1", b"1.0"]), fields=st.lists(_fields, max_size=5))
def test_the_upgrade_rule_as_a_model(version, fields):
    headers = [(b"host", b"h"), *fields]
    tokens = {t.strip().lower() for n, v in fields if n == b"connection" for t in v.split(b",")}
    upgrades = [v.strip() for n, v in fields if n == b"upgrade"]
    lengths = [v for n, v in fields if n == b"content-length"]
    chunked = any(n == b"transfer-encoding" for n, _ in fields)
    try:
        request = check(version=version, headers=headers)
    except Refused as exc:
        assert exc.status == 400
        framing_fault = len(lengths) > 1 or (chunked and (lengths or version == b"1.0")) or (
            sum(1 for n, _ in fields if n == b"transfer-encoding") > 1)
        body = chunked or any(v != b"0" for v in lengths)
        assert framing_fault or (b"upgrade" in tokens and upgrades and body), exc.reason
        return
    asks = version == b"1.1" and b"upgrade" in tokens and bool(upgrades)
    assert bool(request.upgrade) == asks
    if asks:
        assert not request.has_body
        assert request.upgrade == b", ".join(upgrades)


# --- framing: a 101 from the backend


SWITCHED = [(b"upgrade", b"websocket"), (b"connection", b"Upgrade")]


@pytest.mark.parametrize("headers", [
    [],
    [(b"upgrade", b"websocket")],
    [(b"connection", b"upgrade")],
    [(b"upgrade", b"websocket"), (b"connection", b"keep-alive")],
    [(b"upgrade", b""), (b"connection", b"upgrade")],
])
def test_a_101_without_upgrade_and_connection_upgrade_is_502(headers):
    with pytest.raises(Refused) as info:
        check_response(101, b"Switching Protocols", b"1.1", headers, b"GET")
    assert info.value.status == 502 and "101" in info.value.reason


@pytest.mark.parametrize("headers", [
    SWITCHED,
    [(b"connection", b"keep-alive, upgrade"), (b"upgrade", b" websocket ")],
    SWITCHED + [(b"content-length", b"10"), (b"transfer-encoding", b"chunked")],
])
def test_a_101_naming_the_switch_is_a_tunnel_with_no_body(headers):
    response = check_response(101, b"Switching Protocols", b"1.1", headers, b"GET")
    assert response.upgrade == b"websocket"
    assert response.content_length == 0 and not response.chunked and not response.until_close
    assert not response.keep_alive      # never back in the pool


@pytest.mark.parametrize("status", [200, 426, 400])
def test_other_answers_to_an_upgrade_are_no_switch(status):
    response = check_response(status, b"", b"1.1", SWITCHED + [(b"content-length", b"2")],
                              b"GET")
    assert response.upgrade == b"" and response.content_length == 2


# --- the engines: a request head that asks to switch

ENGINES = [e for e in engines.ENGINES if engines.available(e)]
UPGRADE_HEAD = (b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\n"
                b"Upgrade: websocket\r\n\r\n")
UPGRADE_EVENT = ("head", b"GET", b"/ws", b"1.1", UPGRADE)
# A masked WebSocket frame, then bytes that look like a request.
TAIL = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58" + b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"
NEXT = b"POST /next HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nok"


def _request_parser(engine: str, sink: Sink):
    parser = engines.parsers(engine)[0](sink, LIMIT)
    sink.parser = parser
    return parser


def _pieces(data: bytes, bytewise: bool) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))] if bytewise else [data]


def _fed(engine: str, data: bytes, bytewise: bool):
    """A request parser of `engine` fed `data` in one read or byte by byte."""
    sink = Sink()
    parser = _request_parser(engine, sink)
    for piece in _pieces(data, bytewise):
        parser.feed(piece)
    return parser, sink


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("engine", ENGINES)
def test_detach_gives_exactly_the_bytes_behind_an_upgrade_head(engine, bytewise):
    parser, sink = _fed(engine, UPGRADE_HEAD + TAIL, bytewise)
    assert sink.events == [UPGRADE_EVENT, ("end", [])]
    assert parser.buffered() == len(TAIL)
    assert parser.detach() == TAIL
    parser.feed(NEXT)           # the tunnel's now: nothing more is parsed
    parser.next_message()
    assert sink.events == [UPGRADE_EVENT, ("end", [])]


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("engine", ENGINES)
def test_without_a_101_what_follows_is_the_next_request(engine, bytewise):
    parser, sink = _fed(engine, UPGRADE_HEAD + NEXT, bytewise)
    assert sink.events == [UPGRADE_EVENT, ("end", [])]
    parser.next_message()       # answered (a 426, say): read on
    assert sink.events[2:] == [("head", b"POST", b"/next", b"1.1",
                                [(b"host", b"h"), (b"content-length", b"2")]),
                               ("body", b"ok"), ("end", [])]


def _feed_answering_between_reads(parser, sink: Sink, pieces: list[bytes]) -> None:
    """Feed `pieces`; each complete ordinary request is answered after the
    read it ended in (as a backend's answer comes), the upgrade one never."""
    answered = 0
    for piece in pieces:
        parser.feed(piece)
        while True:
            ends = [i for i, e in enumerate(sink.events) if e[0] == "end"]
            plain = [i for i in ends if sink.events[_head_before(sink.events, i)] != UPGRADE_EVENT]
            if len(plain) <= answered:
                break
            answered += 1
            parser.next_message()


def _head_before(events: list, at: int) -> int:
    return max(i for i in range(at) if events[i][0] == "head")


def _detach_behind(engine: str, before: list[bytes], pieces: list[bytes], tail: bytes) -> None:
    sink = Sink()
    parser = _request_parser(engine, sink)
    _feed_answering_between_reads(parser, sink, pieces)
    heads = [e for e in sink.events if e[0] == "head"]
    assert len(heads) == len(before) + 1 and heads[-1] == UPGRADE_EVENT, sink.events
    assert sink.events[-1] == ("end", [])
    assert parser.detach() == tail


@settings(max_examples=150, deadline=None)
@given(before=st.lists(_request_bytes(), max_size=2), tail=st.binary(max_size=80),
       cuts=st.lists(st.integers(0, 300), max_size=6))
@pytest.mark.parametrize("engine", ENGINES)
def test_detach_behind_pipelined_requests_that_came_in_one_read(engine, before, tail, cuts):
    pieces = [b"".join(before)] + _split(UPGRADE_HEAD + tail, cuts)
    _detach_behind(engine, before, [p for p in pieces if p], tail)


@settings(max_examples=150, deadline=None)
@given(before=st.lists(_request_bytes(), max_size=2), tail=st.binary(max_size=80),
       cuts=st.lists(st.integers(0, 700), max_size=6))
@example(before=[b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n",
                 b"GET /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"],
         tail=b"", cuts=[84])   # (found by hypothesis: the second body in a read of its own)
@pytest.mark.parametrize("engine", ENGINES)
def test_detach_behind_pipelined_requests_however_split(engine, before, tail, cuts):
    _detach_behind(engine, before, _split(b"".join(before) + UPGRADE_HEAD + tail, cuts), tail)


@pytest.mark.parametrize("body", [b"\x00\x01abc", b"ab\r\n\r\n"])
@pytest.mark.parametrize("engine", ENGINES)
def test_a_pipelined_body_in_a_later_read_is_read_as_a_body(engine, body):
    sink = Sink()
    parser = _request_parser(engine, sink)
    parser.feed(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"     # a request and the next one's
                b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body))
    parser.next_message()       # the first one is answered
    parser.feed(body)           # the second one's body comes in the next read
    assert [e[0] for e in sink.events] == ["head", "end", "head", "body", "end"], sink.events
    assert sink.events[3] == ("body", body)


@pytest.mark.skipif(len(ENGINES) < 2, reason="httptools not installed")
@settings(max_examples=150, deadline=None)
@given(after=st.lists(_request_bytes(), min_size=1, max_size=2),
       cuts=st.lists(st.integers(0, 700), max_size=6))
def test_both_engines_read_on_after_an_upgrade_answered_without_a_switch(after, cuts):
    pieces = _split(UPGRADE_HEAD + b"".join(after), cuts)
    seen = []
    for engine in ENGINES:
        sink = Sink()
        parser = _request_parser(engine, sink)
        for piece in pieces:
            parser.feed(piece)
        for _ in range(len(after) + 1):     # answer each request, the upgrade one first
            parser.next_message()
        seen.append(sink.events)
    assert seen[0] == seen[1]
    assert sum(1 for e in seen[0] if e[0] == "end") == len(after) + 1


class _AnsweringAtOnce(Sink):
    """A connection that answers inside on_end (a built-in endpoint does:
    balancer.local_request -> send_whole -> next_message)."""

    def on_end(self, trailers):
        super().on_end(trailers)
        self.parser.next_message()

    def on_error(self, *args):
        self.events.append(("error", *args))


@pytest.mark.parametrize("engine", ENGINES)
def test_a_request_answered_at_once_then_a_pipelined_head_split_across_reads(engine):
    data = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n" + NEXT
    sink = _AnsweringAtOnce()
    parser = _request_parser(engine, sink)
    parser.feed(data[:40])      # the second head's first bytes come with the first request
    parser.feed(data[40:])
    assert [e[0] for e in sink.events] == ["head", "end", "head", "body", "end"], sink.events


@pytest.mark.parametrize("engine", ENGINES)
def test_an_upgrade_answered_at_once_then_the_pipelined_request(engine):
    sink = _AnsweringAtOnce()
    parser = _request_parser(engine, sink)
    parser.feed(UPGRADE_HEAD + NEXT)
    assert [e[0] for e in sink.events] == ["head", "end", "head", "body", "end"], sink.events


# --- the engines: a 101 from the backend

SWITCH_HEAD = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\n\r\n")
SWITCH_EVENT = ("head", 101, b"Switching Protocols", b"1.1", SWITCHED,
                len(SWITCH_HEAD) - 2)
FRAMES = b"\x81\x05hello\x82\x03\x00\x01\x02" + b"HTTP/1.1 200 OK\r\n\r\n"


class _ResponseSink(Sink):
    def on_head(self, *args):
        self.events.append(("head", *args))

    def on_error(self, reason):
        self.events.append(("error", reason))


def _response_parser(engine: str, *, upgrade: bool, method: bytes = b"GET"):
    sink = _ResponseSink()
    parser = engines.parsers(engine)[1](sink, 65536)
    parser.expect(method, upgrade=upgrade)
    return parser, sink


@pytest.mark.parametrize("engine", ENGINES)
def test_a_101_is_delivered_and_detach_gives_the_bytes_behind_it(engine):
    parser, sink = _response_parser(engine, upgrade=True)
    parser.feed(SWITCH_HEAD + FRAMES)
    assert sink.events == [SWITCH_EVENT]
    assert parser.detach() == FRAMES


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, len(SWITCH_HEAD + FRAMES)), max_size=5))
@pytest.mark.parametrize("engine", ENGINES)
def test_a_101_in_pieces_detach_gives_the_rest_of_its_read(engine, cuts):
    """As the backend connection does: the read the 101 ended in is parsed,
    then detach(); later reads go to the tunnel, never to the parser."""
    parser, sink = _response_parser(engine, upgrade=True)
    pieces = _split(SWITCH_HEAD + FRAMES, cuts)
    for at, piece in enumerate(pieces):
        parser.feed(piece)
        if sink.events:
            break
    (event,) = sink.events      # (its reason: see the split-reason test below)
    assert event[0:2] == ("head", 101) and event[3:5] == (b"1.1", SWITCHED)
    assert parser.detach() + b"".join(pieces[at + 1:]) == FRAMES


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("status_line", [b"HTTP/1.1 101 Switching Protocols\r\n",
                                         b"HTTP/1.1 200 Very OK\r\n"])
def test_a_status_line_split_in_its_reason_keeps_the_reason_and_size(engine, status_line):
    whole = (SWITCH_HEAD if b"101" in status_line else
             status_line + b"Content-Length: 0\r\n\r\n")
    parser, sink = _response_parser(engine, upgrade=True)
    parser.feed(whole)
    expected = sink.events[0]
    cut = len(b"HTTP/1.1 200 Ve")
    parser, sink = _response_parser(engine, upgrade=True)
    parser.feed(whole[:cut])
    parser.feed(whole[cut:])
    assert sink.events[0] == expected


@pytest.mark.parametrize("engine", ENGINES)
def test_a_101_is_skipped_to_after_an_interim_100(engine):
    parser, sink = _response_parser(engine, upgrade=True)
    parser.feed(b"HTTP/1.1 100 Continue\r\n\r\n" + SWITCH_HEAD + FRAMES)
    assert sink.events == [SWITCH_EVENT]
    assert parser.detach() == FRAMES


@pytest.mark.parametrize("status", [200, 426])
@pytest.mark.parametrize("engine", ENGINES)
def test_an_upgrade_answered_without_a_switch_is_an_ordinary_response(engine, status):
    parser, sink = _response_parser(engine, upgrade=True)
    parser.feed(b"HTTP/1.1 %d X\r\nContent-Length: 2\r\n\r\nno" % status)
    assert sink.events == [("head", status, b"X", b"1.1", [(b"content-length", b"2")], 35),
                           ("body", b"no"), ("end", [])]
    assert parser.detach() == b""


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("engine", ENGINES)
def test_a_101_nobody_asked_for_is_an_invalid_response(engine, bytewise):
    parser, sink = _response_parser(engine, upgrade=False)
    for piece in _pieces(SWITCH_HEAD + FRAMES, bytewise):
        parser.feed(piece)
    assert len(sink.events) == 1, sink.events       # no head, nothing after the error
    kind, reason = sink.events[0]
    assert kind == "error" and reason.startswith("invalid response from backend")


# --- the access log


def _line(**kw) -> str:
    fields = dict(request_id="r1", method=b"GET", target=b"/ws", status=101, backend="b0",
                  bytes_in=5, bytes_out=7, ttfb=0.01, total=2.0, note="")
    fields.update(kw)
    return accesslog.line(**fields)


def test_the_access_log_says_why_a_tunnel_ended():
    assert _line(ended="client_closed").endswith(" out=7 ttfb_ms=10.0 total_ms=2000.0"
                                                 " ended=client_closed")
    assert "ended=" not in _line()
    text = _line(ended="idle_timeout", note="bye", why=["b1 refused"], tried=["b1", "b0"])
    assert text.endswith(' why="b1 refused" ended=idle_timeout note="bye"')
