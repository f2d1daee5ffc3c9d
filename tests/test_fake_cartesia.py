"""Loopback tests of the fake Cartesia API in backends/cartesia.py (the cloud fallback's stand-in)."""
import base64
import http.client
import io
import json
import os
import socket
import ssl
import struct
import time
import uuid
import warnings
import wave

import pytest
import trustme

from backends.cartesia import (CartesiaThread, alaw2lin, lin2alaw, lin2ulaw, ulaw2lin)
from conftest import Process

KEY = "sk_car_fake_7Qx2LmN9pR4t"
VOICE = "694f9389-aac1-45b6-b726-9d9369183238"
NEW, BEARER_SINCE, OLD = "2026-03-01", "2025-04-16", "2024-11-13"
CPS = 20.0  # chars per second of audio used by the fixtures
WIDTH = {"pcm_s16le": 2, "pcm_f32le": 4, "pcm_mulaw": 1, "pcm_alaw": 1}
TIMEOUT = 10.0


@pytest.fixture
def fake():
    with CartesiaThread(api_key=KEY, chars_per_second=CPS, rtf=0) as c:
        yield c


def tts_body(transcript="Hello from the fallback path!", container="wav", encoding="pcm_s16le",
             rate=24000, **extra):
    fmt = {"container": container, "sample_rate": rate}
    if encoding is not None:
        fmt["encoding"] = encoding
    body = {"model_id": "sonic-3", "transcript": transcript, "voice": {"mode": "id", "id": VOICE},
            "language": "en", "output_format": fmt}
    body.update(extra)
    return body


def auth(version=NEW, key=KEY, scheme=None):
    """Headers for `version`, with the key in the header that version wants (or `scheme`)."""
    scheme = scheme or ("bearer" if version >= BEARER_SINCE else "x-api-key")
    h = {"Content-Type": "application/json"}
    if version is not None:
        h["Cartesia-Version"] = version
    if key is not None:
        h.update({"Authorization": f"Bearer {key}"} if scheme == "bearer" else {"X-API-Key": key})
    return h


def request(port, method, path, body=None, headers=None, context=None, host="127.0.0.1"):
    if context is None:
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    else:
        conn = http.client.HTTPSConnection(host, port, timeout=TIMEOUT, context=context)
    try:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def post(port, body, headers=None, path="/tts/bytes", **kw):
    return request(port, "POST", path, body, auth() if headers is None else headers, **kw)


def get_json(port, path):
    status, _, data = request(port, "GET", path)
    assert status == 200
    return json.loads(data)


def expected_samples(transcript, rate, speed=1.0):
    return round(len(transcript) / CPS / speed * rate)


def assert_json_error(status, headers, data, want_status, code=None):
    assert status == want_status, data
    assert headers["content-type"] == "application/json"
    err = json.loads(data)
    assert set(err) == {"error_code", "title", "message", "request_id"}
    assert err["title"] and err["message"]
    uuid.UUID(err["request_id"])
    if code is not None:
        assert err["error_code"] == code
    return err


# --- probe and happy paths

def test_root_probe_needs_no_key(fake):
    status, headers, data = request(fake.port, "GET", "/")
    assert status == 200 and json.loads(data) == {"ok": True, "version": NEW}
    assert get_json(fake.port, "/_stats")["probes"] == 1


def test_wav_streams_and_lasts_as_long_as_the_transcript(fake):
    text = "The local fleet is busy, so Cartesia speaks."  # 44 chars: 2.2 s at 20 chars/s
    status, headers, data = post(fake.port, tts_body(text, rate=24000))
    assert status == 200
    assert headers["content-type"] == "audio/wav"
    assert headers["transfer-encoding"] == "chunked"
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
        assert w.getnframes() == expected_samples(text, 24000) == 52800
        assert len(w.readframes(w.getnframes())) == 52800 * 2
    assert len(data) == 44 + 52800 * 2
    stats = get_json(fake.port, "/_stats")
    assert stats["by_status"] == {"200": 1} and stats["characters_billed"] == len(text)


def test_speed_shortens_the_audio(fake):
    text = "x" * 30
    status, _, data = post(fake.port, tts_body(text, container="raw", rate=16000,
                                               generation_config={"speed": 1.5, "volume": 1.0}))
    assert status == 200 and len(data) == expected_samples(text, 16000, 1.5) * 2


def test_duration_caps_the_audio(fake):
    status, _, data = post(fake.port, tts_body("y" * 100, container="raw", rate=8000) | {"duration": 0.5})
    assert status == 200 and len(data) == 4000 * 2


def test_rtf_paces_the_stream():
    text = "z" * 8  # 0.4 s of audio
    with CartesiaThread(api_key=KEY, chars_per_second=CPS, rtf=1.0) as c:
        started = time.monotonic()
        status, _, data = post(c.port, tts_body(text, container="raw"))
        elapsed = time.monotonic() - started
    assert status == 200 and len(data) == expected_samples(text, 24000) * 2
    assert 0.35 <= elapsed < 3.0


def test_oversized_body_is_413(fake):
    status, headers, data = post(fake.port, tts_body("w" * (1 << 20)))
    assert_json_error(status, headers, data, 413)


def _riff_chunks(data):
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    chunks, i = {}, 12
    while i < len(data):
        name, size = data[i:i + 4], struct.unpack("<I", data[i + 4:i + 8])[0]
        if name == b"data":
            chunks[name] = (size, data[i + 8:])
            break
        chunks[name] = data[i + 8:i + 8 + size]
        i += 8 + size + (size & 1)
    return struct.unpack("<I", data[4:8])[0], chunks


@pytest.mark.parametrize("encoding,tag", [("pcm_f32le", 3), ("pcm_mulaw", 7), ("pcm_alaw", 6)])
def test_non_pcm_wav_headers(fake, encoding, tag):
    text = "odd number of chars!!"  # 21 chars at 8 kHz: 8400 samples
    status, _, data = post(fake.port, tts_body(text, encoding=encoding, rate=8000))
    assert status == 200
    riff_size, chunks = _riff_chunks(data)
    n, width = expected_samples(text, 8000), WIDTH[encoding]
    fmt_tag, channels, rate, byte_rate, align, bits, cb = struct.unpack("<HHIIHHH", chunks[b"fmt "])
    assert (fmt_tag, channels, rate, byte_rate, align, bits, cb) == (tag, 1, 8000, 8000 * width,
                                                                    width, 8 * width, 0)
    assert struct.unpack("<I", chunks[b"fact"])[0] == n
    size, payload = chunks[b"data"]
    assert size == n * width and len(payload) == size + (size & 1)
    assert riff_size == len(data) - 8


def test_wav_with_unknown_sizes():
    text = "streamed without a known length"
    with CartesiaThread(api_key=KEY, chars_per_second=CPS, rtf=0, wav_sizes="unknown") as c:
        status, _, data = post(c.port, tts_body(text, rate=22050))
    assert status == 200
    riff_size, chunks = _riff_chunks(data)
    assert riff_size == 0xFFFFFFFF and chunks[b"data"][0] == 0xFFFFFFFF
    assert len(data) == 44 + expected_samples(text, 22050) * 2


@pytest.mark.parametrize("rate", [8000, 22050, 48000])
@pytest.mark.parametrize("encoding", list(WIDTH))
def test_raw_encodings_have_the_right_size(fake, encoding, rate):
    text = "raw samples, please"
    status, headers, data = post(fake.port, tts_body(text, container="raw", encoding=encoding, rate=rate))
    assert status == 200 and headers["content-type"] == "application/octet-stream"
    assert len(data) == expected_samples(text, rate) * WIDTH[encoding]


def test_raw_encodings_carry_the_same_tone(fake):
    out = {}
    for enc in WIDTH:
        status, _, out[enc] = post(fake.port, tts_body("same tone", container="raw", encoding=enc,
                                                       rate=16000))
        assert status == 200
    s16 = struct.unpack(f"<{len(out['pcm_s16le']) // 2}h", out["pcm_s16le"])
    f32 = struct.unpack(f"<{len(out['pcm_f32le']) // 4}f", out["pcm_f32le"])
    assert max(s16) > 4000 and min(s16) < -4000  # a real signal, not silence
    assert all(abs(f * 32767 - s) <= 1 for f, s in zip(f32, s16))
    for enc, decode in (("pcm_mulaw", ulaw2lin), ("pcm_alaw", alaw2lin)):
        decoded = [decode(b) for b in out[enc]]
        assert all(abs(d - s) <= 16 + abs(s) / 16 for d, s in zip(decoded, s16)), enc


def test_g711_tables():
    assert (lin2ulaw(0), lin2alaw(0)) == (0xFF, 0xD5)
    assert (ulaw2lin(0x80), ulaw2lin(0x00), ulaw2lin(0xFF)) == (32124, -32124, 0)
    assert (alaw2lin(0xAA), alaw2lin(0x2A), alaw2lin(0xD5)) == (32256, -32256, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import audioop  # the reference, while it lasts (removed in Python 3.13)
        except ImportError:
            return
    values = range(-32768, 32768, 3)
    pcm = struct.pack(f"<{len(values)}h", *values)
    assert bytes(map(lin2ulaw, values)) == audioop.lin2ulaw(pcm, 2)
    assert bytes(map(lin2alaw, values)) == audioop.lin2alaw(pcm, 2)
    every = bytes(range(256))
    assert struct.pack("<256h", *map(ulaw2lin, every)) == audioop.ulaw2lin(every, 2)
    assert struct.pack("<256h", *map(alaw2lin, every)) == audioop.alaw2lin(every, 2)


# MPEG audio: version bits -> sample rates; Layer III bitrates (kbit/s) by index
MPEG_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
L3_V1 = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
L3_V2 = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)


def _mp3_frames(data):
    """Walk MPEG Layer III frames; every byte must belong to one.  -> [(rate, samples)]"""
    frames, i = [], 0
    while i < len(data):
        h = struct.unpack(">I", data[i:i + 4])[0]
        assert h >> 21 == 0x7FF, f"no frame sync at {i}"
        version, layer = (h >> 19) & 3, (h >> 17) & 3
        assert version != 1 and layer == 1  # not reserved; Layer III
        rate = MPEG_RATES[version][(h >> 10) & 3]
        kbps = (L3_V1 if version == 3 else L3_V2)[(h >> 12) & 15]
        spf = 1152 if version == 3 else 576
        size = spf // 8 * kbps * 1000 // rate + ((h >> 9) & 1)
        assert kbps and i + size <= len(data)
        frames.append((rate, spf))
        i += size
    return frames


@pytest.mark.parametrize("rate", [8000, 16000, 24000, 44100, 48000])
def test_mp3_is_silent_frames_of_the_right_duration(fake, rate):
    text = "an mp3, if you insist"
    body = tts_body(text)
    body["output_format"] = {"container": "mp3", "sample_rate": rate, "bit_rate": 64000}
    status, headers, data = post(fake.port, body)
    assert status == 200 and headers["content-type"] == "audio/mpeg"
    frames = _mp3_frames(data)
    assert {r for r, _ in frames} == {rate}
    seconds, spf = len(frames) * frames[0][1] / rate, frames[0][1]
    assert len(text) / CPS <= seconds < len(text) / CPS + spf / rate


def test_mp3_needs_a_bit_rate(fake):
    status, headers, data = post(fake.port, tts_body(container="mp3", encoding=None))
    err = assert_json_error(status, headers, data, 400)
    assert "bit_rate" in err["message"]


def test_sse_chunks_decode_to_the_whole_audio(fake):
    text = "server sent events carry base64 audio"
    status, headers, data = post(fake.port, tts_body(text, container="raw", encoding="pcm_f32le",
                                                     rate=44100), path="/tts/sse")
    assert status == 200 and headers["content-type"] == "text/event-stream"
    events = [json.loads(block[len("data: "):]) for block in data.decode().split("\n\n") if block]
    assert len(events) >= 3
    assert all(e["type"] == "chunk" and e["done"] is False for e in events[:-1])
    assert events[-1]["type"] == "done" and events[-1]["done"] is True
    audio = b"".join(base64.b64decode(e["data"]) for e in events[:-1])
    assert len(audio) == expected_samples(text, 44100) * 4


def test_sse_takes_only_raw(fake):
    status, headers, data = post(fake.port, tts_body(container="wav"), path="/tts/sse")
    assert_json_error(status, headers, data, 400)


# --- version and key

def test_missing_or_bad_version(fake):
    for version in (None, "2026-3-1", "yesterday", "2026-02-30", "2023-01-01"):
        headers = auth()
        if version is None:
            del headers["Cartesia-Version"]
        else:
            headers["Cartesia-Version"] = version
        status, headers, data = post(fake.port, tts_body(), headers)
        assert status == 400, version
        assert headers["content-type"].startswith("text/plain") and b"Cartesia-Version" in data
    assert get_json(fake.port, "/_stats")["characters_billed"] == 0


def test_bad_key_json_error_on_new_versions(fake):
    status, headers, data = post(fake.port, tts_body(), auth(NEW, key="sk_car_wrong"))
    assert_json_error(status, headers, data, 401)
    status, headers, data = post(fake.port, tts_body(), auth(NEW, key=None))
    assert_json_error(status, headers, data, 401)


def test_bad_key_plain_text_on_old_versions(fake):
    status, headers, data = post(fake.port, tts_body(), auth(OLD, key="sk_car_wrong"))
    assert status == 401
    assert headers["content-type"].startswith("text/plain")
    title, _, message = data.decode().partition(": ")
    assert title == "Unauthorized" and message


@pytest.mark.parametrize("version,scheme,ok", [
    (OLD, "x-api-key", True), (OLD, "bearer", False),
    ("2024-06-10", "x-api-key", True),
    (BEARER_SINCE, "bearer", True), (BEARER_SINCE, "x-api-key", False),
    (NEW, "bearer", True), (NEW, "x-api-key", False),
])
def test_the_version_decides_the_auth_header(fake, version, scheme, ok):
    status, _, data = post(fake.port, tts_body(container="raw"), auth(version, scheme=scheme))
    assert status == (200 if ok else 401), data


# --- body validation

def _without(d, *path):
    d = json.loads(json.dumps(d))
    node = d
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return d


BAD_BODIES = {
    "not json": b"{model_id: sonic-3",
    "not an object": [1, 2],
    "no model": _without(tts_body(), "model_id"),
    "unknown model": tts_body() | {"model_id": "sonic-9"},
    "empty transcript": tts_body(""),
    "blank transcript": tts_body("   "),
    "transcript not a string": tts_body() | {"transcript": 42},
    "no voice": _without(tts_body(), "voice"),
    "embedding voice": tts_body() | {"voice": {"mode": "embedding", "embedding": [0.1] * 4}},
    "voice id not a uuid": tts_body() | {"voice": {"mode": "id", "id": "Emily.wav"}},
    "bad language": tts_body() | {"language": 7},
    "no output_format": _without(tts_body(), "output_format"),
    "null output_format": tts_body() | {"output_format": None},
    "bad container": tts_body(container="ogg"),
    "bad encoding": tts_body(encoding="pcm_s24le"),
    "no encoding": tts_body(encoding=None),
    "bad sample rate": tts_body(rate=11025),
    "rate as a string": tts_body(rate="24000"),
    "speed too fast": tts_body(generation_config={"speed": 2.0}),
    "speed too slow": tts_body(generation_config={"speed": 0.5}),
    "speed not a number": tts_body(generation_config={"speed": "fast"}),
    "volume out of range": tts_body(generation_config={"volume": 9}),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_bodies_are_400(fake, name):
    status, headers, data = post(fake.port, BAD_BODIES[name])
    assert_json_error(status, headers, data, 400)
    assert get_json(fake.port, "/_stats")["characters_billed"] == 0


@pytest.mark.parametrize("model", ["sonic", "sonic-english", "sonic-2", "sonic-2-2025-03-07", "sonic-turbo"])
def test_retired_models(fake, model):
    status, headers, data = post(fake.port, tts_body() | {"model_id": model})
    err = assert_json_error(status, headers, data, 400, code="model_sunsetted")
    assert "sunset" in err["message"]


@pytest.mark.parametrize("model", ["sonic-3", "sonic-3.5", "sonic-latest", "sonic-3-2026-01-12"])
def test_current_models(fake, model):
    assert post(fake.port, tts_body(container="raw") | {"model_id": model})[0] == 200


def test_wrong_method_and_unknown_path(fake):
    status, headers, data = request(fake.port, "GET", "/tts/bytes", headers=auth())
    assert_json_error(status, headers, data, 405)
    status, headers, data = request(fake.port, "POST", "/tts/websocket", b"{}", auth())
    assert_json_error(status, headers, data, 404)


# --- concurrency

def _open_stream(port, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    conn.request("POST", "/tts/bytes", body=json.dumps(body).encode(), headers=auth())
    resp = conn.getresponse()  # returns once the head is in: the request is in flight
    return conn, resp


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_concurrency_limit_gives_429_and_frees_slots():
    long_text = "a" * 400  # 20 s of audio at rtf 1: it stays in flight until we hang up
    with CartesiaThread(api_key=KEY, chars_per_second=CPS, rtf=1.0, concurrency=2) as c:
        streams = [_open_stream(c.port, tts_body(long_text, container="raw")) for _ in range(2)]
        try:
            assert [r.status for _, r in streams] == [200, 200]
            stats = get_json(c.port, "/_stats")
            assert stats["in_flight"] == 2 and stats["concurrency"] == 2
            status, headers, data = post(c.port, tts_body("one more", container="raw"))
            err = assert_json_error(status, headers, data, 429, code="concurrency_limited")
            assert "concurrency" in err["message"]
        finally:
            for conn, resp in streams:
                resp.close()
                conn.close()
        wait_for(lambda: get_json(c.port, "/_stats")["in_flight"] == 0)
        status, _, data = post(c.port, tts_body("Hi", container="raw"))
        assert status == 200 and len(data) == expected_samples("Hi", 24000) * 2
        stats = get_json(c.port, "/_stats")
        assert stats["max_in_flight"] == 2
        assert stats["by_status"] == {"200": 3, "429": 1}
        log = get_json(c.port, "/_requests")
        assert [e["completed"] for e in log] == [False, False, False, True]
        assert [e["status"] for e in log] == [200, 200, 429, 200]


# --- introspection

def test_requests_log_never_shows_the_key(fake):
    post(fake.port, tts_body("first", container="raw"))
    post(fake.port, tts_body("second", container="raw"), auth(NEW, key="sk_car_wrong"))
    post(fake.port, tts_body("third", container="raw"), auth(OLD))
    post(fake.port, tts_body("fourth", container="raw"), auth(NEW, scheme="x-api-key"))
    post(fake.port, tts_body(f"my key is {KEY}", container="raw"), auth(NEW))
    request(fake.port, "POST", f"/tts/bytes?key={KEY}", json.dumps(tts_body()).encode(), auth())
    status, _, text = request(fake.port, "GET", "/_requests")
    assert status == 200
    assert KEY.encode() not in text
    log = json.loads(text)
    assert len(log) == 6
    first = log[0]
    assert first["method"] == "POST" and first["path"] == "/tts/bytes" and first["status"] == 200
    assert first["body"]["transcript"] == "first" and first["body"]["output_format"]["container"] == "raw"
    headers = dict(first["headers"])
    assert headers["authorization"] == "Bearer <redacted: key matched>"
    assert headers["cartesia-version"] == NEW
    assert dict(log[1]["headers"])["authorization"] == "Bearer <redacted: key did not match>"
    assert (log[1]["auth"], log[1]["status"]) == ("wrong_key", 401)
    assert dict(log[2]["headers"])["x-api-key"] == "<redacted: key matched>"
    assert (log[2]["auth"], log[2]["status"]) == ("ok", 200)
    assert (log[3]["auth"], log[3]["status"]) == ("wrong_scheme", 401)
    assert "<redacted>" in log[4]["body"]["transcript"] and "<redacted>" in log[5]["path"]

    stats = get_json(fake.port, "/_stats")
    assert stats["requests"] == 6 and stats["by_status"] == {"200": 4, "401": 2}
    assert stats["characters_billed"] == len("first") + len("third") + len(f"my key is {KEY}") + len(
        tts_body()["transcript"])
    assert get_json(fake.port, "/_reset")["requests"] == 0
    assert get_json(fake.port, "/_requests") == []


def test_keep_alive_serves_several_requests(fake):
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=TIMEOUT)
    try:
        for i, body in enumerate([tts_body("one", container="raw"), b"nope", tts_body("three")]):
            conn.request("POST", "/tts/bytes", body=body if isinstance(body, bytes) else
                         json.dumps(body).encode(), headers=auth())
            r = conn.getresponse()
            r.read()
            assert r.status == (400 if i == 1 else 200)
    finally:
        conn.close()


# --- HTTPS

@pytest.fixture(scope="module")
def tls():
    ca = trustme.CA()
    return ca, ca.issue_cert("127.0.0.1", "localhost")


def _trusting(ca):
    ctx = ssl.create_default_context()  # verification on, hostname checked
    ca.configure_trust(ctx)
    return ctx


def test_https_with_a_trusted_ca(tls):
    ca, cert = tls
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    with CartesiaThread(api_key=KEY, chars_per_second=CPS, rtf=0, ssl=server_ctx) as c:
        for host in ("127.0.0.1", "localhost"):
            status, _, data = post(c.port, tts_body("over TLS"), context=_trusting(ca), host=host)
            assert status == 200 and data[:4] == b"RIFF"
        with pytest.raises(ssl.SSLCertVerificationError):
            request(c.port, "GET", "/", context=ssl.create_default_context())
        with pytest.raises(ssl.SSLCertVerificationError):
            request(c.port, "GET", "/", context=_trusting(trustme.CA()))  # some other CA
        # a plain-HTTP client gets no answer from the TLS port
        with socket.create_connection(("127.0.0.1", c.port), timeout=TIMEOUT) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert not s.recv(100).startswith(b"HTTP/")
        assert get_json_tls(c.port, ca)["requests"] == 2


def get_json_tls(port, ca):
    status, _, data = request(port, "GET", "/_stats", context=_trusting(ca))
    assert status == 200
    return json.loads(data)


def test_cli_serves_https_and_exits_cleanly(tls, tmp_path):
    ca, cert = tls
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    env = dict(os.environ, FAKE_CARTESIA_KEY=KEY)
    proc = Process(["-m", "backends.cartesia", "--port", "0", "--api-key-env", "FAKE_CARTESIA_KEY",
                    "--tls-cert", str(cert_file), "--tls-key", str(key_file), "--concurrency", "3",
                    "--chars-per-second", str(CPS), "--rtf", "0"], env=env)
    try:
        port = int(proc.wait_for_line(r"listening on 127\.0\.0\.1:(\d+) \(https\)").group(1))
        status, _, data = post(port, tts_body("from the command line", container="raw"),
                               context=_trusting(ca))
        assert status == 200 and len(data) == expected_samples("from the command line", 24000) * 2
        with pytest.raises(ssl.SSLCertVerificationError):
            request(port, "GET", "/", context=ssl.create_default_context())
        assert get_json_tls(port, ca)["concurrency"] == 3
    finally:
        code = proc.stop()
    assert code == 0 and "Traceback" not in proc.output(), proc.output()
    assert KEY not in proc.output()


# --- misbehaving on purpose (the balancer's tests that nothing Cartesia says leaks)

def _raw_tts(port, headers: dict) -> bytes:
    """POST /tts/bytes over a raw socket; every byte the fake sends until it closes."""
    body = json.dumps(tts_body(container="raw")).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(f"POST /tts/bytes HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(body)}"
                  f"\r\n\r\n".encode() + body)
        out = b""
        while data := s.recv(65536):
            out += data
    return out


def set_mode(port, query):
    status, _, data = request(port, "GET", f"/_mode?{query}")
    return status, json.loads(data)


@pytest.mark.parametrize("version, sent", [(NEW, f"Bearer {KEY}"), (OLD, KEY)])
def test_bad_status_line_quotes_the_credential_then_closes(fake, version, sent):
    assert set_mode(fake.port, "misbehave=bad-status-line") == (200, {"misbehave": "bad-status-line"})
    out = _raw_tts(fake.port, auth(version))
    assert out == f"HTTP/1.1 2OO Authorization: {sent}\r\n\r\n".encode()
    (entry,) = get_json(fake.port, "/_requests")
    assert entry["misbehaved"] == "bad-status-line" and entry["auth"] == "ok"
    assert KEY not in json.dumps(entry)


def test_bad_header_line_quotes_the_credential_then_closes(fake):
    set_mode(fake.port, "misbehave=bad-header-line")
    out = _raw_tts(fake.port, auth())
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\n")
    assert f"\r\nYour Authorization: Bearer {KEY}\r\n".encode() in out


def test_quote_key_error_quotes_it_in_pieces(fake):
    set_mode(fake.port, "misbehave=quote-key-400")
    out = _raw_tts(fake.port, {**auth(), "Connection": "close"})
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == f"HTTP/1.1 400 Bad Request Bearer {KEY}"
    assert f"x-echo-authorization: Bearer {KEY}" in lines
    message = json.loads(body)["message"]
    for piece in (f"Bearer {KEY}", KEY[:8], KEY[-8:], KEY.lower(), KEY.upper()):
        assert piece in message, (piece, message)
    assert get_json(fake.port, "/_stats")["by_status"] == {"400": 1}


def test_quote_key_200_still_streams_the_audio(fake):
    set_mode(fake.port, "misbehave=quote-key-200")
    status, headers, data = post(fake.port, tts_body(container="raw"))
    assert status == 200 and headers["x-echo-authorization"] == f"Bearer {KEY}"
    assert len(data) == expected_samples("Hello from the fallback path!", 24000) * 2


def test_misbehaving_needs_the_right_key_first(fake):
    set_mode(fake.port, "misbehave=bad-status-line")
    status, headers, data = post(fake.port, tts_body(), headers=auth(key="sk_car_wrong"))
    assert_json_error(status, headers, data, 401)


def test_mode_rejects_what_it_does_not_know_and_survives_reset(fake):
    assert set_mode(fake.port, "misbehave=quote-key-503") == (200, {"misbehave": "quote-key-503"})
    for query in ("misbehave=quote-key-99", "misbehave=", "misbehave=sometimes", "status=500"):
        status, body = set_mode(fake.port, query)
        assert status == 400 and body["error"], (query, body)
    get_json(fake.port, "/_reset")
    assert set_mode(fake.port, "") == (200, {"misbehave": "quote-key-503"})
    assert set_mode(fake.port, "misbehave=off") == (200, {"misbehave": "off"})
    assert post(fake.port, tts_body(container="raw"))[0] == 200


def test_cli_misbehave_flag():
    env = dict(os.environ, FAKE_CARTESIA_KEY=KEY)
    bad = Process(["-m", "backends.cartesia", "--port", "0", "--api-key-env", "FAKE_CARTESIA_KEY",
                   "--misbehave", "now-and-then"], env=env)
    assert bad.proc.wait(10) == 2
    bad.stop()   # collects the output
    assert "--misbehave" in bad.output() and "now-and-then" in bad.output()
    assert "Traceback" not in bad.output()
    proc = Process(["-m", "backends.cartesia", "--port", "0", "--api-key-env", "FAKE_CARTESIA_KEY",
                    "--misbehave", "bad-header-line"], env=env)
    try:
        port = int(proc.wait_for_line(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        assert set_mode(port, "") == (200, {"misbehave": "bad-header-line"})
    finally:
        assert proc.stop() == 0
    assert KEY not in proc.output()
