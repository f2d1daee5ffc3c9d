"""lb.tts.redact, sans-io: the masking step every log line passes through.

The oracle here is written independently of lb.redact: a text "holds the
key" when any 8 consecutive characters of it equal 8 consecutive characters
of the key, ASCII letters compared without case (bytes.lower()).
"""
from __future__ import annotations

import io
import logging
import secrets as _random

import pytest
from hypothesis import assume, given, settings, strategies as st

from lb.control import accesslog
from lb.control import logsetup
from lb.tts import redact
from lb.tts.redact import MARKER, Filter, Secrets

KEY_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
keys = st.text(KEY_CHARS, min_size=20, max_size=56).map(lambda tail: "sk_car_" + tail)


def windows(text: str | bytes) -> set[bytes]:
    data = (text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text).lower()
    return {data[i:i + 8] for i in range(len(data) - 7)}


def holds_key(text: str, key: str) -> bool:
    return bool(windows(text) & windows(key))


def masker(*keys: str) -> Secrets:
    s = Secrets()
    for key in keys:
        s.register(key)
    return s


@st.composite
def fragment(draw, key: str) -> str:
    """A run of 8 or more consecutive characters of `key`, letters in any case."""
    start = draw(st.integers(0, len(key) - 8))
    end = draw(st.integers(start + 8, len(key)))
    upper = draw(st.lists(st.booleans(), min_size=end - start, max_size=end - start))
    return "".join(c.upper() if u else c.lower() for c, u in zip(key[start:end], upper))


# --- properties


@settings(max_examples=300)
@given(st.data(), keys, st.text(max_size=80), st.text(max_size=80))
def test_any_piece_of_the_key_in_any_case_never_survives(data, key, before, after):
    pieces = data.draw(st.lists(fragment(key), min_size=1, max_size=3))
    glue = data.draw(st.lists(st.text(max_size=10), min_size=len(pieces), max_size=len(pieces)))
    text = before + "".join(p + g for p, g in zip(pieces, glue)) + after
    masked = masker(key).mask(text)
    assert not holds_key(masked, key), (text, masked)
    assert MARKER in masked


@settings(max_examples=300)
@given(st.data(), keys)
def test_text_without_an_8_character_run_of_the_key_is_unchanged(data, key):
    # Built from the key's own short pieces (up to 7 characters) and random
    # text, so most examples come close to the key without holding it.
    short = st.integers(0, len(key) - 1).flatmap(
        lambda i: st.integers(1, 7).map(lambda n: key[i:i + n]))
    parts = data.draw(st.lists(st.one_of(short, st.text(max_size=12)), max_size=12))
    text = "".join(parts)
    assume(not holds_key(text, key))
    assert masker(key).mask(text) == text


@given(keys, st.text(max_size=60), st.text(max_size=60), st.data())
def test_only_the_secret_is_replaced(key, before, after, data):
    # A space is never part of a key: the text around it is kept as it is.
    piece = data.draw(fragment(key))
    s = masker(key)
    assert s.mask(f"{before} {piece} {after}") == f"{s.mask(before)} {MARKER} {s.mask(after)}"


@given(keys, st.text(max_size=200))
def test_masking_twice_changes_nothing_more(key, text):
    s = masker(key)
    once = s.mask(text)
    assert s.mask(once) == once


@given(st.lists(keys, min_size=2, max_size=3, unique=True), st.data())
def test_every_registered_secret_is_masked(many, data):
    s = masker(*many)
    text = " / ".join(data.draw(fragment(k)) for k in many)
    masked = s.mask(text)
    assert not any(holds_key(masked, k) for k in many), masked


# --- the forms the issue names


KEY = "sk_car_" + _random.token_urlsafe(30)


@pytest.mark.parametrize("form", [
    KEY, f"Bearer {KEY}", f"Authorization: Bearer {KEY}", KEY[:8], KEY[:12], KEY[-8:],
    KEY[10:30], KEY.lower(), KEY.upper(), KEY.swapcase()[5:20],
])
def test_the_key_and_its_pieces(form):
    text = f'illegal status line: bytearray(b"HTTP/1.1 2OO {form}")'
    masked = masker(KEY).mask(text)
    assert not holds_key(masked, KEY), masked
    assert masked.startswith('illegal status line: bytearray(b"HTTP/1.1 2OO ')
    assert masked.endswith(f'{MARKER}")')


def test_seven_characters_are_not_a_secret():
    s = masker(KEY)
    assert s.mask(f"prefix {KEY[:7]} and {KEY[-7:]}") == f"prefix {KEY[:7]} and {KEY[-7:]}"


def test_a_secret_shorter_than_the_window_is_masked_whole():
    s = masker("Sh0rt")
    assert s.mask("x sh0rt y SH0RT z Sh0r") == f"x {MARKER} y {MARKER} z Sh0r"


def test_nothing_registered_masks_nothing():
    s = Secrets()
    assert not s
    assert s.mask(f"Bearer {KEY}") == f"Bearer {KEY}"
    s.register("   ")
    assert not s


def test_non_ascii_text_keeps_its_place():
    # "İ".lower() is two characters: the spans must still fall on the key.
    masked = masker(KEY).mask(f"İİ {KEY.upper()} İ")
    assert masked == f"İİ {MARKER} İ"


# --- the logging filter


def record(msg, *args, exc_info=None, stack_info=None) -> logging.LogRecord:
    return logging.LogRecord("lb", logging.WARNING, __file__, 1, msg, args, exc_info,
                             sinfo=stack_info)


def test_filter_masks_the_message_with_its_arguments():
    f = Filter(masker(KEY))
    r = record("Cartesia said %s (%d bytes)", f"no: {KEY.lower()}", 12)
    assert f.filter(r) is True
    assert r.getMessage() == f"Cartesia said no: {MARKER} (12 bytes)"
    assert r.args == ()


def test_filter_masks_exception_and_stack():
    f = Filter(masker(KEY))
    try:
        raise ValueError(f"bad header: Bearer {KEY}")
    except ValueError:
        import sys
        r = record("failed", exc_info=sys.exc_info(), stack_info=f"Stack:\n  {KEY[3:20]}")
    assert f.filter(r)
    line = logging.Formatter("%(message)s").format(r)
    assert "ValueError: bad header: Bearer " + MARKER in line
    assert not holds_key(line, KEY), line
    assert r.exc_info is None


def test_filter_masks_a_record_whose_format_is_broken():
    # logging would report it with msg and args as they are: masked here first, never raised.
    r = record("%d items for %s", "many", KEY)
    assert Filter(masker(KEY)).filter(r)
    assert not holds_key(r.getMessage(), KEY) and MARKER in r.getMessage()


def test_filter_leaves_records_alone_with_no_secret():
    r = record("value %s", "x")
    assert Filter(Secrets()).filter(r) is True
    assert r.msg == "value %s" and r.args == ("x",)


@pytest.fixture
def logs():
    """logsetup.configure() onto two StringIO streams; the logging state is put back after."""
    root, access = logging.getLogger(), accesslog.logger
    saved = (list(root.handlers), root.level, list(access.handlers), access.level,
             access.propagate)
    diagnostics, lines = io.StringIO(), io.StringIO()
    logsetup.configure("info", diagnostics=diagnostics, access=lines)
    yield diagnostics, lines
    for logger, handlers in ((root, saved[0]), (access, saved[2])):
        for h in list(logger.handlers):
            logger.removeHandler(h)
        for h in handlers:
            logger.addHandler(h)
    root.setLevel(saved[1])
    access.setLevel(saved[3])
    access.propagate = saved[4]


def test_both_streams_are_masked_once_the_key_is_registered(logs):
    diagnostics, lines = logs
    key = "sk_car_" + _random.token_urlsafe(24)   # only this test's: the registry keeps it
    redact.register(key)
    logging.getLogger("lb").warning("Cartesia sent an invalid response: %s",
                                    f"illegal header line: Authorization: Bearer {key}")
    accesslog.logger.info('rid=abc status=503 note="%s"', key.upper()[:12])
    err, out = diagnostics.getvalue(), lines.getvalue()
    assert not holds_key(err, key) and not holds_key(out, key), (err, out)
    assert f"Authorization: Bearer {MARKER}" in err
    assert out.startswith("ts=") and f'note="{MARKER}"' in out   # still pure logfmt
