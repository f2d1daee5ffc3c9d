"""No secret anywhere, whatever the other side sends (issue 9, item 3).

Real processes on 127.0.0.1: the balancer with the Cartesia fallback on, its key in the
environment, in front of a backend that is down (so every TTS call falls back), and the fake
Cartesia (`python -m backends.cartesia`) switched by /_mode into answering badly: a status
line or a header line that h11 cannot parse and that quotes the request's Authorization
header, or an error whose reason phrase, headers and body quote the key in pieces.

For each, what a caller gets (status, headers, body), /health, /lb-stats, /metrics and the
balancer's whole output (stderr and stdout) must hold no 8 consecutive characters of the key,
in any letter case; the caller still gets a prompt 503 with a JSON body naming the problem.
"""
from __future__ import annotations

import io
import secrets
import wave

import pytest

from conftest import error_text, wait_until
from test_fallback import Stack, call, closed_port_url, post, text

# Mixed case, "-" and "_": a lower- or upper-case copy differs from the key itself.
KEY = "sk_car_" + secrets.token_urlsafe(30)
CALL_TIMEOUT = 10.0     # far above what a refused fallback takes: only a hang reaches it
ROUTES = [("/v1/audio/speech", lambda: {"input": text(), "voice": "alloy"}),       # WAV stream
          ("/v1/audio/speech", lambda: {"input": text(), "stream_format": "sse"}),
          ("/synthesize-json", lambda: {"text": text()}),                          # whole file
          ("/generate_voice", lambda: {"text": [text(), text("two")]})]            # zip


def key_runs(data: str | bytes, key: str = KEY) -> set[bytes]:
    """Every 8 consecutive characters of `key` found in `data`, letters in any case."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    low, k = data.lower(), key.encode().lower()
    found = {low[i:i + 8] for i in range(len(low) - 7)}
    return found & {k[i:i + 8] for i in range(len(k) - 7)}


def everything(reply) -> bytes:
    return repr(reply.status).encode() + repr(reply.headers).encode() + reply.body


def set_mode(fake, mode: str) -> None:
    assert fake.get(f"/_mode?misbehave={mode}") == {"misbehave": mode}


def entries_misbehaved(fake, mode: str) -> int:
    return sum(1 for e in fake.requests() if e.get("misbehaved") == mode)


def check_operator_pages(lb) -> None:
    for path, headers in (("/health", None), ("/lb-stats", None),
                          ("/lb-stats", {"Accept": "text/html"}), ("/metrics", None)):
        page = call(lb.port, "GET", path, headers=headers)
        assert not key_runs(everything(page)), (path, key_runs(everything(page)))


def check_output(lb) -> None:
    out = lb.output()
    assert not key_runs(out), f"the key leaked into the balancer's output: {key_runs(out)}"


@pytest.fixture(scope="module")
def world(tmp_path_factory, http_engine):
    s = Stack(tmp_path_factory.mktemp("secrets"), http_engine)
    try:
        s.fake_ = s.fake("--rtf", "0", key=KEY)
        s.lb_ = s.lb([closed_port_url()], fallback={"url": s.fake_.url}, key=KEY,
                     health__passive={"max_ejected_percent": 100})
        yield s
    finally:
        s.close()
        for balancer in s.balancers:   # its last lines too, written while stopping
            check_output(balancer)


MALFORMED = [("bad-status-line", "Cartesia sent an invalid response", "illegal status line"),
             ("bad-header-line", "Cartesia sent an invalid response", "illegal header line"),
             ("quote-key-400", "Cartesia answered 400", "Cartesia fallback call refused"),
             ("quote-key-503", "Cartesia answered 503", "Cartesia fallback call refused")]


@pytest.mark.parametrize("mode, reason, logged", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_what_cartesia_says_never_reaches_the_caller_or_the_log(world, mode, reason, logged):
    lb, fake = world.lb_, world.fake_
    set_mode(fake, mode)
    seen_before = entries_misbehaved(fake, mode)
    first_line = len(lb.lines)
    for path, body in ROUTES:
        reply = post(lb.port, path, body(), timeout=CALL_TIMEOUT)
        assert reply.status == 503, reply
        assert reply.header("content-type") == "application/json", reply
        assert reply.header("retry-after") == "1"
        assert reply.header("x-tts-fallback") is None
        error = reply.json()
        # the balancer's own shape, or OpenAI's on the openai route (no request_id
        # in it: the X-Request-Id header carries it)
        assert set(error) in ({"error", "request_id"}, {"error"}), error
        assert error.get("request_id", reply.header("x-request-id")) == reply.header("x-request-id")
        assert f"fallback to Cartesia failed: {reason}" in error_text(error), error
        assert not key_runs(everything(reply)), (mode, key_runs(everything(reply)))
        lb.wait_for_line(rf'rid={reply.header("x-request-id")} .*status=503 .*note=".*{reason}',
                         start=first_line)
    # The fake did misbehave, once a call (a zip of two texts stops at the first).
    assert entries_misbehaved(fake, mode) - seen_before == len(ROUTES)
    # What it said is in the diagnostics, for the operator -- masked.
    lb.wait_for_line(rf"WARNING lb: .*{logged}.*\[redacted\]", start=first_line)
    check_operator_pages(lb)
    check_output(lb)


def test_invalid_responses_are_counted(world):
    lb, fake = world.lb_, world.fake_
    set_mode(fake, "bad-status-line")
    before = lb.stats()["fallback"]["outcomes"].get("invalid_response", 0)
    assert post(lb.port, "/v1/audio/speech", {"input": text()}).status == 503
    stats = lb.stats()["fallback"]
    assert stats["outcomes"]["invalid_response"] == before + 1
    assert stats["usable"] is True and stats["reason"] == ""   # not the key's fault
    assert stats["in_flight"] == 0


def test_a_200_whose_head_quotes_the_key_gives_audio_and_none_of_its_head(world):
    lb, fake = world.lb_, world.fake_
    set_mode(fake, "quote-key-200")
    reply = post(lb.port, "/v1/audio/speech", {"input": text(), "response_format": "wav"})
    assert reply.status == 200 and reply.header("x-tts-fallback") == "cartesia", reply
    assert reply.header("x-echo-authorization") is None
    with wave.open(io.BytesIO(reply.body)) as w:
        assert w.getnframes() > 0
    assert not key_runs(repr(reply.headers))
    assert entries_misbehaved(fake, "quote-key-200") >= 1
    check_operator_pages(lb)
    check_output(lb)


def test_after_misbehaving_the_fallback_still_serves(world):
    lb, fake = world.lb_, world.fake_
    set_mode(fake, "off")
    reply = post(lb.port, "/synthesize-json", {"text": text()})
    assert reply.status == 200 and reply.json()["success"] is True, reply


def test_unauthorized_quoting_the_key_makes_the_fallback_unusable_and_says_only_that(
        tmp_path, http_engine):
    s = Stack(tmp_path, http_engine)
    try:
        fake = s.fake("--rtf", "0", "--misbehave", "quote-key-401", key=KEY)
        lb = s.lb([closed_port_url()], fallback={"url": fake.url}, key=KEY)
        first = post(lb.port, "/v1/audio/speech", {"input": text()}, timeout=CALL_TIMEOUT)
        assert first.status == 503, first
        assert "fallback to Cartesia failed: Cartesia answered 401" in error_text(first.json())
        assert not key_runs(everything(first))
        health = call(lb.port, "GET", "/health").json()["fallback"]
        assert health["usable"] is False and health["reason"] == "Cartesia answered 401"
        later = post(lb.port, "/synthesize-json", {"text": text()}, timeout=CALL_TIMEOUT)
        assert later.status == 503 and "unusable" in error_text(later.json()), later
        assert not key_runs(everything(later))
        lb.wait_for_line(r"ERROR lb: Cartesia fallback is unusable .*401: .*\[redacted\]")
        check_operator_pages(lb)
    finally:
        s.close()
    check_output(lb)


@pytest.mark.parametrize("mode", ["bad-status-line", "bad-header-line"])
def test_an_x_api_key_version_quoted_back_is_masked_too(tmp_path, mode, http_engine):
    # Versions before 2025-04-16 send the bare key in X-API-Key: quoted back, no "Bearer".
    s = Stack(tmp_path, http_engine)
    try:
        fake = s.fake("--rtf", "0", "--misbehave", mode, key=KEY)
        lb = s.lb([closed_port_url()], fallback={"url": fake.url, "version": "2024-11-13"},
                  key=KEY)
        reply = post(lb.port, "/generate_voice", {"text": [text()]}, timeout=CALL_TIMEOUT)
        assert reply.status == 503, reply
        assert "Cartesia sent an invalid response" in error_text(reply.json())
        assert not key_runs(everything(reply))
        wait_until(lambda: entries_misbehaved(fake, mode) == 1, what="the fake to misbehave")
        lb.wait_for_line(r"WARNING lb: Cartesia sent an invalid response: .*\[redacted\]")
    finally:
        s.close()
    check_output(lb)

