"""Sans-io tests for lb.headers: hop-by-hop stripping, X-Forwarded-*, request ids."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import h11

from lb.wire.framing import Refused, check_request, new_request_id
from lb.wire.headers import switching, to_backend, to_client, wants_html

# Written out here (not imported) so a change to lb.headers.HOP_BY_HOP shows up.
HOP = {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
       b"proxy-authorization", b"proxy-connection", b"expect"}
# Trailer is kept toward the client: the trailers it announces go through.
HOP_TO_CLIENT = HOP - {b"trailer"}
SET_UPSTREAM = {b"x-request-id", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"}
HEX32 = re.compile(r"[0-9a-f]{32}")

RID = "req-1"


def request_id(headers) -> str:
    """The request id the framing pass settles on for these headers.  A value
    with NUL, CR, LF or DEL refuses the whole request (400): it never gets
    as far as an id, and the answer carries a fresh one."""
    try:
        return check_request(b"GET", b"/", b"1.0", headers, 100, 16384).request_id
    except Refused as exc:
        assert exc.status == 400 and "x-request-id" in exc.reason
        return new_request_id()


def names(headers) -> list[bytes]:
    return [n for n, _ in headers]


def values(headers, name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


def backend(headers, *, ip="10.0.0.9", rid=RID, chunked=False):
    return to_backend(headers, client_ip=ip, request_id=rid, chunked=chunked)


# --- to_backend


@pytest.mark.parametrize("hop", sorted(HOP))
def test_to_backend_strips_each_hop_by_hop_header(hop):
    out = backend([(b"host", b"tts"), (hop, b"x"), (b"accept", b"*/*")])
    assert hop not in names(out)
    assert out[:2] == [(b"host", b"tts"), (b"accept", b"*/*")]


def test_to_backend_strips_connection_listed_headers():
    headers = [(b"host", b"tts"), (b"connection", b"keep-alive, X-Secret ,  x-other"),
               (b"x-secret", b"1"), (b"x-other", b"2"), (b"x-keep", b"3"), (b"keep-alive", b"t=5")]
    out = backend(headers)
    assert b"x-secret" not in names(out)
    assert b"x-other" not in names(out)
    assert b"connection" not in names(out)
    assert b"keep-alive" not in names(out)
    assert (b"x-keep", b"3") in out


def test_to_backend_connection_listed_across_several_connection_headers():
    headers = [(b"connection", b"x-a"), (b"connection", b"X-B"), (b"x-a", b"1"), (b"x-b", b"2"),
               (b"x-c", b"3")]
    out = backend(headers)
    assert [h for h in out if h[0].startswith(b"x-") and not h[0].startswith(b"x-forwarded")
            and h[0] != b"x-request-id"] == [(b"x-c", b"3")]


def test_to_backend_forwarded_headers():
    out = backend([(b"host", b"tts.example:6095"), (b"accept", b"audio/wav")], ip="192.0.2.7")
    assert out == [
        (b"host", b"tts.example:6095"),
        (b"accept", b"audio/wav"),
        (b"x-forwarded-for", b"192.0.2.7"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"tts.example:6095"),
        (b"x-request-id", b"req-1"),
    ]


def test_to_backend_appends_to_existing_x_forwarded_for():
    headers = [(b"x-forwarded-for", b"203.0.113.1"), (b"host", b"h"),
               (b"x-forwarded-for", b"198.51.100.2, 198.51.100.3")]
    out = backend(headers, ip="::1")
    assert values(out, b"x-forwarded-for") == [b"203.0.113.1, 198.51.100.2, 198.51.100.3, ::1"]


def test_to_backend_replaces_client_forwarded_proto_host_and_request_id():
    headers = [(b"host", b"real"), (b"x-forwarded-proto", b"https"),
               (b"x-forwarded-host", b"spoofed"), (b"x-request-id", b"client-id")]
    out = backend(headers, rid="chosen")
    assert values(out, b"x-forwarded-proto") == [b"http"]
    assert values(out, b"x-forwarded-host") == [b"real"]
    assert values(out, b"x-request-id") == [b"chosen"]


def test_to_backend_without_host_has_no_forwarded_host():
    out = backend([(b"accept", b"*/*")])
    assert b"x-forwarded-host" not in names(out)


def test_to_backend_chunked_adds_transfer_encoding_once():
    headers = [(b"host", b"h"), (b"transfer-encoding", b"chunked"), (b"content-type", b"text/plain")]
    out = backend(headers, chunked=True)
    assert values(out, b"transfer-encoding") == [b"chunked"]
    assert out[-1] == (b"transfer-encoding", b"chunked")


def test_to_backend_chunked_never_forwards_content_length():
    out = backend([(b"content-length", b"5"), (b"transfer-encoding", b"chunked")], chunked=True)
    assert b"content-length" not in names(out)
    assert values(out, b"transfer-encoding") == [b"chunked"]


def test_to_backend_not_chunked_has_no_transfer_encoding():
    out = backend([(b"host", b"h"), (b"content-length", b"5"), (b"transfer-encoding", b"chunked")])
    assert b"transfer-encoding" not in names(out)
    assert values(out, b"content-length") == [b"5"]


def test_to_backend_does_not_mutate_input():
    headers = [(b"connection", b"x-a"), (b"x-a", b"1"), (b"host", b"h")]
    before = list(headers)
    backend(headers, chunked=True)
    assert headers == before


# --- to_client


@pytest.mark.parametrize("hop", sorted(HOP_TO_CLIENT))
def test_to_client_strips_each_hop_by_hop_header(hop):
    out = to_client([(b"content-type", b"audio/wav"), (hop, b"x"), (b"server", b"gpu")],
                    request_id=RID)
    assert hop not in names(out)
    assert out[:2] == [(b"content-type", b"audio/wav"), (b"server", b"gpu")]

def test_to_client_keeps_trailer():
    out = to_client([(b"trailer", b"x-sum"), (b"transfer-encoding", b"chunked")],
                    request_id=RID)
    assert (b"trailer", b"x-sum") in out


def test_to_client_strips_connection_listed_and_sets_request_id():
    headers = [(b"connection", b"close, X-Internal"), (b"x-internal", b"secret"),
               (b"x-request-id", b"from-backend"), (b"content-length", b"3")]
    out = to_client(headers, request_id="ours")
    assert out == [(b"content-length", b"3"), (b"x-request-id", b"ours")]


def test_to_client_drops_content_length_when_backend_was_chunked():
    headers = [(b"content-type", b"audio/wav"), (b"content-length", b"100"),
               (b"transfer-encoding", b"chunked")]
    out = to_client(headers, request_id=RID)
    assert out == [(b"content-type", b"audio/wav"), (b"x-request-id", b"req-1")]


def test_to_client_keeps_content_length_when_not_chunked():
    out = to_client([(b"content-length", b"100")], request_id=RID)
    assert out == [(b"content-length", b"100"), (b"x-request-id", b"req-1")]


# --- request_id


@pytest.mark.parametrize("incoming", [b"abc", b"0" * 128, b"A-b_c.d:e/f=g+h~!", b"\x21\x7e"])
def test_request_id_keeps_valid(incoming):
    assert request_id([(b"host", b"h"), (b"x-request-id", incoming)]) == incoming.decode()


@pytest.mark.parametrize("incoming", [
    b"", b"0" * 129, b"has space", b"tab\there", b"nul\x00", b"del\x7f", b"caf\xc3\xa9",
    b"\xff", b"line\nbreak", b"trailing\n",
])
def test_request_id_replaces_invalid(incoming):
    rid = request_id([(b"x-request-id", incoming)])
    assert HEX32.fullmatch(rid), rid
    assert rid != incoming.decode("latin-1")


def test_request_id_fresh_when_absent_and_unique():
    ids = {request_id([]) for _ in range(50)}
    assert len(ids) == 50
    assert all(HEX32.fullmatch(i) for i in ids)


def test_request_id_other_header_names_ignored():
    assert HEX32.fullmatch(request_id([(b"x-request-ids", b"abc"), (b"request-id", b"abc")]))


# --- framing and small helpers


def test_to_backend_adds_host_when_client_sent_none():
    out = to_backend([(b"accept", b"*/*")], client_ip="127.0.0.1", request_id="r",
                     chunked=False, default_host=b"127.0.0.1:6093")
    assert out[0] == (b"host", b"127.0.0.1:6093")
    assert b"x-forwarded-host" not in [n for n, _ in out]


def test_small_helpers():
    assert wants_html([(b"accept", b"text/html,application/xhtml+xml")])
    assert not wants_html([(b"accept", b"application/json")])
    assert not wants_html([])


# --- property: hop-by-hop never leaks, everything else survives in order

POOL = sorted(HOP | SET_UPSTREAM | {
    b"host", b"content-length", b"content-type", b"accept", b"user-agent", b"x-custom",
    b"x-secret", b"cookie", b"authorization", b"server", b"date", b"x-a", b"x-b"})

token_names = st.sampled_from(POOL) | st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8).map(str.encode)
header_values = st.text(alphabet="abcXYZ019 ,;=/-", max_size=8).map(str.encode)


@st.composite
def connection_value(draw):
    tokens = draw(st.lists(token_names, max_size=4))
    spelled = [draw(st.sampled_from([t, t.upper(), t.title()])) for t in tokens]
    pads = [draw(st.sampled_from([b"", b" ", b"  "])) for _ in spelled]
    return b",".join(p + t + p for p, t in zip(pads, spelled))


header_lists = st.lists(
    st.one_of(st.tuples(token_names, header_values),
              st.tuples(st.just(b"connection"), connection_value())),
    max_size=14)


def listed_in_connection(headers) -> set[bytes]:
    """Names Connection makes hop-by-hop; framing and routing headers never are."""
    out = set()
    for name, value in headers:
        if name == b"connection":
            out.update(t.strip().lower() for t in value.split(b","))
    return out - {b"content-length", b"transfer-encoding", b"host"}


def test_connection_cannot_make_framing_or_host_hop_by_hop():
    headers = [(b"host", b"h"), (b"connection", b"content-length, host"),
               (b"content-length", b"5")]
    out = to_backend(headers, client_ip="127.0.0.1", request_id="r", chunked=False)
    assert (b"content-length", b"5") in out and (b"host", b"h") in out
    assert (b"content-length", b"5") in to_client(headers, request_id="r")


@settings(max_examples=150, deadline=None)
@given(headers=header_lists, chunked=st.booleans(),
       ip=st.sampled_from(["10.1.2.3", "::1", "2001:db8::7"]))
def test_to_backend_property(headers, chunked, ip):
    out = to_backend(headers, client_ip=ip, request_id="rid-7", chunked=chunked)
    dropped = HOP | listed_in_connection(headers)
    own = SET_UPSTREAM | ({b"transfer-encoding"} if chunked else set())

    # No hop-by-hop or Connection-listed name leaks, except those the balancer sets itself.
    for name in names(out):
        assert name not in dropped or name in own, name

    # Every other header survives, in order, as a prefix of the output.
    kept = [(n, v) for n, v in headers if n not in dropped and n not in SET_UPSTREAM
            and not (chunked and n == b"content-length")]
    assert out[:len(kept)] == kept

    # Then exactly the balancer's own headers.
    tail = out[len(kept):]
    incoming = [] if b"x-forwarded-for" in dropped else values(headers, b"x-forwarded-for")
    forwarded = incoming + [ip.encode()]
    expected_tail = [(b"x-forwarded-for", b", ".join(forwarded)), (b"x-forwarded-proto", b"http")]
    hosts = [v for n, v in kept if n == b"host"]
    if hosts:
        expected_tail.append((b"x-forwarded-host", hosts[-1]))
    expected_tail.append((b"x-request-id", b"rid-7"))
    if chunked:
        expected_tail.append((b"transfer-encoding", b"chunked"))
    assert tail == expected_tail
    assert len(values(out, b"x-request-id")) == 1
    assert len(values(out, b"transfer-encoding")) == (1 if chunked else 0)
    if chunked:
        assert b"content-length" not in names(out)


@settings(max_examples=150, deadline=None)
@given(headers=header_lists)
def test_to_client_property(headers):
    out = to_client(headers, request_id="rid-9")
    dropped = HOP_TO_CLIENT | listed_in_connection(headers)
    for name in names(out):
        assert name not in dropped or name == b"x-request-id", name
    was_chunked = any(n == b"transfer-encoding" for n, _ in headers)
    kept = [(n, v) for n, v in headers if n not in dropped and n != b"x-request-id"
            and not (was_chunked and n == b"content-length")]
    assert out == kept + [(b"x-request-id", b"rid-9")]


@settings(max_examples=200, deadline=None)
@given(value=st.binary(max_size=140))
def test_request_id_property(value):
    rid = request_id([(b"x-request-id", value)])
    if 1 <= len(value) <= 128 and all(0x21 <= c <= 0x7e for c in value):
        assert rid == value.decode("ascii")
    else:
        assert HEX32.fullmatch(rid)
    rid.encode("ascii")  # always safe to put in a header and a log line


# --- an upgrade (a WebSocket): the switch is said again, hop by hop

WS_REQUEST = [(b"host", b"tts"), (b"connection", b"keep-alive, Upgrade, X-Secret"),
              (b"upgrade", b"websocket"), (b"x-secret", b"s"), (b"keep-alive", b"300"),
              (b"proxy-connection", b"keep-alive"), (b"sec-websocket-key", b"dGhlIHNhbXBsZQ=="),
              (b"sec-websocket-version", b"13"), (b"origin", b"http://o")]


@pytest.mark.parametrize("listed", [None, frozenset({b"keep-alive", b"upgrade", b"x-secret"})])
def test_to_backend_with_upgrade_says_the_switch_once_and_drops_the_rest(listed):
    out = to_backend(WS_REQUEST, client_ip="10.0.0.9", request_id=RID, chunked=False,
                     listed=listed, upgrade=b"websocket")
    assert values(out, b"connection") == [b"upgrade"]
    assert values(out, b"upgrade") == [b"websocket"]
    assert not set(names(out)) & (HOP - {b"connection", b"upgrade"} | {b"x-secret"})
    assert out[:4] == [(b"host", b"tts"), (b"sec-websocket-key", b"dGhlIHNhbXBsZQ=="),
                       (b"sec-websocket-version", b"13"), (b"origin", b"http://o")]


def test_to_backend_without_upgrade_drops_the_clients_upgrade():
    out = backend(WS_REQUEST)
    assert b"upgrade" not in names(out) and b"connection" not in names(out)


@settings(max_examples=150, deadline=None)
@given(headers=header_lists, chunked=st.booleans(),
       upgrade=st.sampled_from([b"websocket", b"h2c", b"websocket, foo/2"]))
def test_to_backend_upgrade_adds_only_the_switch(headers, chunked, upgrade):
    plain = to_backend(headers, client_ip="10.1.2.3", request_id="r", chunked=chunked)
    out = to_backend(headers, client_ip="10.1.2.3", request_id="r", chunked=chunked,
                     upgrade=upgrade)
    switch = [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
    assert [pair for pair in out if pair not in switch] == plain
    assert [pair for pair in out if pair in switch] == switch
    if chunked:     # still framed last
        assert out[-1] == (b"transfer-encoding", b"chunked")


def test_switching_is_the_backends_101_headers_with_the_switch_said_again():
    backend_101 = [(b"upgrade", b"WebSocket"), (b"connection", b"Upgrade, X-Hop"),
                   (b"x-hop", b"1"), (b"sec-websocket-accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
                   (b"x-request-id", b"theirs"), (b"keep-alive", b"5"), (b"server", b"gpu")]
    out = switching(backend_101, request_id=RID, upgrade=b"WebSocket")
    assert out == [(b"sec-websocket-accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), (b"server", b"gpu"),
                   (b"x-request-id", RID.encode()),
                   (b"connection", b"upgrade"), (b"upgrade", b"WebSocket")]


@settings(max_examples=100, deadline=None)
@given(headers=header_lists)
def test_switching_property(headers):
    out = switching(headers, request_id="rid-9", upgrade=b"websocket")
    assert out[-2:] == [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]
    assert out[:-2] == to_client(headers, request_id="rid-9", chunked=False)
