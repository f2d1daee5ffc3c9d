"""The Cartesia fallback, end to end over loopback sockets.

The balancer (`python -m lb`), the fake Cartesia (`python -m backends.cartesia`), echo
backends and simulated Chatterbox servers all run as subprocesses on 127.0.0.1, as a user
starts them.  The API key only ever travels through the environment; every test that sees
balancer output, a response, /health, /lb-stats or /metrics also looks for the key there.

conftest's lb_config() writes flat `[section] key = value` lines only, so the configuration
here (the nested [fallback.cartesia.voices] table and [[route]] arrays) is written by
`lb_toml()` below, and the balancer is started with the key in its environment.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import re
import secrets
import socket
import ssl
import struct
import threading
import time
import uuid
import wave
import zipfile

import pytest
import trustme

from conftest import (Backend, Balancer, Process, env_without_proxies, error_text, lb_args,
                      wait_until)

KEY = "sk_car_" + secrets.token_hex(16)          # what the balancer is given
OTHER_KEY = "sk_car_" + secrets.token_hex(16)    # a fake configured with another key
KEY_ENV = "TTS_LB_TEST_CARTESIA_KEY"
FAKE_KEY_ENV = "FAKE_CARTESIA_TEST_KEY"
VERSION = "2026-03-01"
VOICE_DEFAULT = "694f9389-aac1-45b6-b726-9d9369183238"
VOICE_ALLOY = "a0e99841-438c-4a64-b679-ae501e7d6091"
VOICES = {"default": VOICE_DEFAULT, "alloy": VOICE_ALLOY}
CPS = 15.0               # the fake's characters per second of audio
RATE = 24000
TIMEOUT = 20.0           # any one client call
ROUTES = [("/synthesize-json", "chatterbox"), ("/synthesize", "chatterbox"),
          ("/v1/audio/speech", "openai"), ("/v1/audio/speech/stream", "openai"),
          ("/generate_voice", "chattts")]

SEEN: list[bytes] = []   # every response head and body a client got in this module


# --- processes

def _port_from(proc: Process, what: str) -> int:
    try:
        return int(proc.wait_for_line(r"listening on 127\.0\.0\.1:(\d+)").group(1))
    except BaseException:
        proc.stop()
        raise AssertionError(f"{what} did not start:\n{proc.output()}")


class FakeCartesia(Process):
    """`python -m backends.cartesia` with its key in the environment."""

    def __init__(self, key: str = KEY, *args: str, ca: trustme.CA | None = None):
        env = env_without_proxies()
        env[FAKE_KEY_ENV] = key
        super().__init__(["-m", "backends.cartesia", "--port", "0", "--api-key-env", FAKE_KEY_ENV,
                          "--chars-per-second", str(CPS), *args], env=env)
        self.port = _port_from(self, "fake Cartesia")
        self.ca = ca
        self.url = f"{'https' if ca else 'http'}://127.0.0.1:{self.port}"

    def get(self, path: str):
        if self.ca is None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        else:
            ctx = ssl.create_default_context()
            self.ca.configure_trust(ctx)
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=5, context=ctx)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            assert resp.status == 200, (path, resp.status)
            return json.loads(resp.read())
        finally:
            conn.close()

    def requests(self) -> list[dict]:
        return self.get("/_requests")

    def stats(self) -> dict:
        return self.get("/_stats")

    def entries_for(self, transcript: str) -> list[dict]:
        return [e for e in self.requests()
                if isinstance(e.get("body"), dict) and e["body"].get("transcript") == transcript]


class LB(Balancer):
    """conftest's Balancer, started with the API key in its environment."""

    def __init__(self, config_path, env: dict, http: str | None = None):
        Process.__init__(self, lb_args(config_path, http), env=env)
        self.port = _port_from(self, "balancer")


class Chatterbox(Process):
    def __init__(self):
        super().__init__(["-m", "backends.chatterbox", "--port", "0", "--load-time", "0",
                          "--rtf", "0.01"])
        self.port = _port_from(self, "simulated Chatterbox")
        self.url = f"http://127.0.0.1:{self.port}"


def closed_port_url() -> str:
    """A loopback port nobody listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _toml(value) -> str:
    return json.dumps(value)   # strings, numbers, booleans, lists of them: valid TOML too


def lb_toml(backends: list, *, fallback: dict | None = None, voices: dict | None = None,
            routes=ROUTES, **sections: dict) -> str:
    """A balancer on 127.0.0.1:0 in front of `backends` (URLs or dicts), with [[route]]s
    and, when `fallback` is given, [fallback.cartesia] plus its voices table."""
    merged = {"log": {"access": True, "level": "debug"},
              "balancer": {"slow_start": 0},
              "timeouts": {"connect": 1}}
    for name, values in sections.items():
        merged.setdefault(name.replace("__", "."), {}).update(values)
    out = ["[listen]", 'address = "127.0.0.1:0"']
    for name, values in merged.items():
        out.append(f"[{name}]")
        out += [f"{k} = {_toml(v)}" for k, v in values.items()]
    if fallback is not None:
        out.append("[fallback.cartesia]")
        cfg = {"enabled": True, "api_key_env": KEY_ENV, "version": VERSION,
               "model_id": "sonic-3", "language": "en", "timeout": 15} | fallback
        out += [f"{k} = {_toml(v)}" for k, v in cfg.items()]
        out.append("[fallback.cartesia.voices]")
        out += [f"{k} = {_toml(v)}" for k, v in (VOICES if voices is None else voices).items()]
    for i, entry in enumerate(backends):
        entry = {"url": entry} if isinstance(entry, str) else entry
        out += ["[[backend]]", f'name = "b{i}"']
        out += [f"{k} = {_toml(v)}" for k, v in entry.items()]
    for path, kind in routes:
        out += ["[[route]]", f"path = {_toml(path)}", f"kind = {_toml(kind)}"]
    return "\n".join(out) + "\n"


class Stack:
    """Everything one test (or module) started; stopped in reverse at the end."""

    def __init__(self, directory, http: str | None = None):
        self.dir = directory
        self.http = http        # the HTTP engine of every balancer it starts
        self.balancers: list[LB] = []
        self.others: list[Process] = []

    def fake(self, *args: str, key: str = KEY, ca: trustme.CA | None = None) -> FakeCartesia:
        fake = FakeCartesia(key, *args, ca=ca)
        self.others.append(fake)
        return fake

    def chatterbox(self) -> Chatterbox:
        server = Chatterbox()
        self.others.append(server)
        return server

    def echo(self) -> Backend:
        backend = Backend()
        self.others.append(backend)
        return backend

    def lb(self, backends: list, *, key: str | None = KEY, **kwargs) -> LB:
        path = self.dir / f"lb{len(self.balancers)}.toml"
        path.write_text(lb_toml(backends, **kwargs))
        env = env_without_proxies()
        env.pop("CARTESIA_API_KEY", None)
        if key is not None:
            env[KEY_ENV] = key
        balancer = LB(path, env, self.http)
        self.balancers.append(balancer)
        return balancer

    def close(self) -> None:
        problems = []
        for balancer in self.balancers:
            try:
                balancer.stop_cleanly()
            except AssertionError as exc:
                problems.append(str(exc))
            output = balancer.output()
            for secret in (KEY, OTHER_KEY):
                if secret in output:
                    problems.append("the API key appears in the balancer's output:\n" + output)
        for proc in reversed(self.others):
            proc.stop()
        assert not problems, "\n\n".join(problems)


@pytest.fixture
def stack(tmp_path, http_engine):
    s = Stack(tmp_path, http_engine)
    yield s
    s.close()


# --- HTTP


class Reply:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes, elapsed: float):
        self.status, self.headers, self.body, self.elapsed = status, headers, body, elapsed

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name.lower()), None)

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Reply {self.status} {self.headers} {self.body[:300]!r}>"


def call(port: int, method: str, path: str, body=None, headers: dict | None = None,
         timeout: float = TIMEOUT) -> Reply:
    hdrs = dict(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    started = time.monotonic()
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        reply = Reply(resp.status, [(k.lower(), v) for k, v in resp.getheaders()], data,
                      time.monotonic() - started)
    finally:
        conn.close()
    SEEN.append("\n".join(f"{k}: {v}" for k, v in reply.headers).encode() + b"\n\n" + data)
    return reply


def post(port: int, path: str, body, **kw) -> Reply:
    return call(port, "POST", path, body, **kw)


def concurrently(*calls):
    """Run the zero-argument callables at once (a barrier lines them up); their results."""
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def run(i, fn):
        barrier.wait(5)
        try:
            results[i] = fn()
        except BaseException as exc:   # handed to the test below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, fn), daemon=True) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT + 5)
        assert not t.is_alive(), "a concurrent call did not finish"
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def metrics(port: int) -> dict[str, float]:
    """/metrics as {"name{labels}": value}."""
    reply = call(port, "GET", "/metrics")
    assert reply.status == 200
    out = {}
    for line in reply.body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def family_sum(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


_counter = iter(range(1, 10**9))


def text(words: str = "the fallback speaks for the fleet") -> str:
    """A transcript no other call in this module sends (so the fake's log can be searched)."""
    return f"Call {next(_counter)} {uuid.uuid4().hex[:6]}: {words}."


# --- audio


def seconds_for(transcript: str, speed: float | None) -> float:
    """What the fake makes for `transcript` at `speed` (the clamped one it was sent)."""
    return len(transcript) / CPS / (speed or 1.0)


def read_wav(data: bytes) -> tuple[float, bytes]:
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, RATE)
        frames = w.readframes(w.getnframes())
        assert len(frames) == 2 * w.getnframes(), "the WAV's sizes disagree with its data"
        return w.getnframes() / RATE, frames


def assert_tone(pcm: bytes) -> None:
    """Not silence, not garbage: the fake's tone has samples well away from zero."""
    assert len(pcm) >= 2 and len(pcm) % 2 == 0
    samples = struct.unpack(f"<{min(len(pcm), 4800) // 2}h", pcm[:min(len(pcm), 4800)])
    assert max(abs(s) for s in samples) > 1000


def check_cartesia_call(fake: FakeCartesia, transcript: str, *, voice: str,
                        speed: float | None) -> dict:
    """The fake received one correct /tts/bytes request for `transcript`, answered 200."""
    entries = wait_until(lambda: [e for e in fake.entries_for(transcript) if e["completed"]],
                         what=f"a completed Cartesia request for {transcript!r}")
    assert len(entries) == 1, entries
    entry = entries[0]
    assert entry["method"] == "POST" and entry["path"] == "/tts/bytes"
    assert entry["status"] == 200 and entry["auth"] == "ok" and entry["version"] == VERSION
    headers = dict(entry["headers"])
    assert headers["cartesia-version"] == VERSION
    assert headers["authorization"] == "Bearer <redacted: key matched>"
    body = entry["body"]
    assert body["model_id"] == "sonic-3"
    assert body["transcript"] == transcript
    assert body["voice"] == {"mode": "id", "id": voice}
    assert body["language"] == "en"
    fmt = body["output_format"]
    assert fmt["encoding"] == "pcm_s16le" and fmt["sample_rate"] == RATE
    assert fmt["container"] in ("raw", "wav")
    if speed is None:
        assert "speed" not in (body.get("generation_config") or {}), body
    else:
        assert body["generation_config"]["speed"] == pytest.approx(speed)
        assert 0.6 <= body["generation_config"]["speed"] <= 1.5
    return entry


def check_fallback_reply(reply: Reply, content_type: str) -> None:
    assert reply.status == 200, reply
    assert reply.header("x-tts-fallback") == "cartesia", reply.headers
    assert reply.header("content-type").split(";")[0] == content_type
    assert reply.header("x-request-id")


def assert_no_key(*texts) -> None:
    for t in texts:
        if isinstance(t, str):
            t = t.encode()
        for secret in (KEY, OTHER_KEY):
            assert secret.encode() not in t, "the API key leaked"
            assert base64.b64encode(secret.encode()) not in t, "the API key leaked (base64)"


# --- 1. the whole fleet down: every kind of call gets its audio from Cartesia


@pytest.fixture(scope="module")
def down(tmp_path_factory, http_engine):
    """Two backends on closed ports behind a balancer with the fallback on."""
    s = Stack(tmp_path_factory.mktemp("down"), http_engine)
    try:
        s.fake_ = s.fake("--rtf", "0.05")
        # Both may be ejected at once (the default cap of 50 % would keep one in).
        s.lb_ = s.lb([closed_port_url(), closed_port_url()], fallback={"url": s.fake_.url},
                     health__passive={"max_ejected_percent": 100})
        yield s
    finally:
        s.close()


def test_openai_speech_whole_wav(down):
    lb, fake = down.lb_, down.fake_
    said = text()
    reply = post(lb.port, "/v1/audio/speech", {"model": "tts-1", "input": said, "voice": "alloy",
                                               "speed": 4.0, "response_format": "wav"})
    check_fallback_reply(reply, "audio/wav")
    duration, pcm = read_wav(reply.body)
    assert duration == pytest.approx(seconds_for(said, 1.5), abs=0.05)
    assert_tone(pcm)
    check_cartesia_call(fake, said, voice=VOICE_ALLOY, speed=1.5)


def test_openai_speech_stream_chunked_wav(down):
    lb, fake = down.lb_, down.fake_
    said = text()
    reply = post(lb.port, "/v1/audio/speech/stream", {"input": said, "voice": "verse",
                                                      "speed": 0.25})
    check_fallback_reply(reply, "audio/wav")
    head, pcm = reply.body[:44], reply.body[44:]
    riff, riff_size, wave_, fmt_id, fmt_size = struct.unpack("<4sI4s4sI", head[:20])
    assert (riff, wave_, fmt_id, fmt_size) == (b"RIFF", b"WAVE", b"fmt ", 16)
    assert riff_size == 0x7FFFFFFF - 36                      # "unknown size"
    tag, channels, rate, byte_rate, align, bits = struct.unpack("<HHIIHH", head[20:36])
    assert (tag, channels, rate, byte_rate, align, bits) == (1, 1, RATE, 2 * RATE, 2, 16)
    assert head[36:40] == b"data" and struct.unpack("<I", head[40:44])[0] == 0xFFFFFFFF
    assert len(pcm) % 2 == 0
    assert len(pcm) / 2 / RATE == pytest.approx(seconds_for(said, 0.6), abs=0.05)
    assert_tone(pcm)
    check_cartesia_call(fake, said, voice=VOICE_DEFAULT, speed=0.6)


def test_openai_speech_sse(down):
    lb, fake = down.lb_, down.fake_
    said = text()
    reply = post(lb.port, "/v1/audio/speech", {"input": said, "voice": "alloy",
                                               "stream_format": "sse", "response_format": "pcm"})
    check_fallback_reply(reply, "text/event-stream")
    events = [json.loads(block[len(b"data: "):])
              for block in reply.body.split(b"\n\n") if block.strip()]
    assert events and all(block.startswith(b"data: ")
                          for block in reply.body.split(b"\n\n") if block.strip())
    *deltas, done = events
    assert done["type"] == "speech.audio.done", events[-1]
    assert done["usage"]["input_characters"] == len(said)
    # OpenAI's events only (the front door frames the fallback's PCM like a backend's)
    assert deltas and all(e["type"] == "speech.audio.delta" for e in deltas)
    pieces = [base64.b64decode(e["audio"], validate=True) for e in deltas]
    assert all(len(p) % 2 == 0 for p in pieces), "an event split a sample"
    pcm = b"".join(pieces)
    assert len(pcm) / 2 / RATE == pytest.approx(seconds_for(said, None), abs=0.05)
    assert_tone(pcm)
    check_cartesia_call(fake, said, voice=VOICE_ALLOY, speed=None)


def _check_chatterbox_json(lb: LB, reply: Reply, said: str, speed: float | None) -> None:
    check_fallback_reply(reply, "application/json")
    doc = reply.json()
    assert doc["success"] is True
    assert doc["sample_rate"] == RATE
    assert re.fullmatch(r"/audio/[0-9a-f-]{36}\.wav", doc["audio_url"]), doc
    assert doc["duration"] == pytest.approx(seconds_for(said, speed), abs=0.05)
    for _ in range(2):   # fetched through the balancer, which keeps the fallback's audio
        audio = call(lb.port, "GET", doc["audio_url"])
        assert audio.status == 200, audio
        assert audio.header("content-type") == "audio/wav"
        duration, pcm = read_wav(audio.body)
        assert duration == pytest.approx(doc["duration"], abs=0.001)
        assert_tone(pcm)
    stats = lb.stats()["fallback"]
    assert stats["audio_files"] >= 1


def test_chatterbox_synthesize_json(down):
    lb, fake = down.lb_, down.fake_
    said = text()
    reply = post(lb.port, "/synthesize-json", {"text": said, "exaggeration": 0.7,
                                               "cfg_weight": 0.3, "speech_rate": 1.2})
    _check_chatterbox_json(lb, reply, said, 1.2)
    check_cartesia_call(fake, said, voice=VOICE_DEFAULT, speed=1.2)


def test_chatterbox_synthesize_form(down):
    lb, fake = down.lb_, down.fake_
    said = text()
    boundary = "----tts-lb-" + uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="text"\r\n\r\n{said}\r\n',
        f'--{boundary}\r\nContent-Disposition: form-data; name="speech_rate"\r\n\r\n0.5\r\n',
        f'--{boundary}\r\nContent-Disposition: form-data; name="audio_prompt"; '
        f'filename="me.wav"\r\nContent-Type: audio/wav\r\n\r\n',
    ]
    body = "".join(parts).encode() + b"RIFF\x00\x00fake" + f"\r\n--{boundary}--\r\n".encode()
    reply = post(lb.port, "/synthesize", body,
                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    _check_chatterbox_json(lb, reply, said, 0.6)
    check_cartesia_call(fake, said, voice=VOICE_DEFAULT, speed=0.6)


def test_chattts_generate_voice_zip(down):
    lb, fake = down.lb_, down.fake_
    said = [text("first item"), text("a second, longer item of speech"), text("third")]
    reply = post(lb.port, "/generate_voice", {
        "text": said, "stream": False, "lang": "en", "skip_refine_text": True,
        "params_infer_code": {"prompt": "[speed_2]", "temperature": 0.3, "manual_seed": 42}})
    check_fallback_reply(reply, "application/zip")
    with zipfile.ZipFile(io.BytesIO(reply.body)) as archive:
        names = archive.namelist()
        assert len(names) == len(said), names
        for name, item in zip(names, said):
            assert name.endswith(".wav")
            duration, pcm = read_wav(archive.read(name))
            assert duration == pytest.approx(seconds_for(item, 0.6), abs=0.05), (name, item)
            assert_tone(pcm)
    for item in said:
        check_cartesia_call(fake, item, voice=VOICE_DEFAULT, speed=0.6)


def test_fallback_counted_in_stats(down):
    lb = down.lb_
    post(lb.port, "/v1/audio/speech", {"input": text()})
    stats = lb.stats()["fallback"]
    assert stats["enabled"] is True and stats["usable"] is True and stats["reason"] == ""
    assert stats["outcomes"].get("ok", 0) >= 1
    assert stats["characters"] > 0
    assert sum(stats["by_reason"].values()) >= 1
    health = call(lb.port, "GET", "/health")
    assert health.json()["fallback"] == {"enabled": True, "usable": True, "reason": ""}
    # Once no backend is in the rotation, calls still get a voice: healthy, in fallback.
    eject_every_backend(lb)
    health = call(lb.port, "GET", "/health")
    assert health.status == 200 and health.json()["status"] == "fallback", health


def eject_every_backend(lb) -> None:
    """Send plain (non-TTS) calls until the dead backends are all ejected."""
    for _ in range(20):
        if all(b["state"] == "ejected" for b in lb.stats()["backends"]):
            return
        call(lb.port, "GET", "/not-a-tts-route")
    raise AssertionError(f"backends not ejected: {lb.stats()['backends']}")


# --- 9. /metrics counts calls and the characters Cartesia bills


def test_metrics_count_calls_and_characters(down):
    lb, fake = down.lb_, down.fake_
    before = metrics(lb.port)
    billed_before = fake.stats()["characters_billed"]
    a, b, c, d = text(), text("one"), text("two items"), text("for the json call")
    assert post(lb.port, "/v1/audio/speech", {"input": a}).status == 200
    assert post(lb.port, "/generate_voice", {"text": [b, c]}).status == 200
    assert post(lb.port, "/synthesize-json", {"text": d}).status == 200
    after = metrics(lb.port)
    sent = len(a) + len(b) + len(c) + len(d)
    assert (family_sum(after, "tts_lb_fallback_total")
            - family_sum(before, "tts_lb_fallback_total")) == 3
    assert (after["tts_lb_fallback_characters_total"]
            - before["tts_lb_fallback_characters_total"]) == sent
    assert fake.stats()["characters_billed"] - billed_before == sent
    # and over this balancer's whole life: exactly what the fake billed
    assert after["tts_lb_fallback_characters_total"] == fake.stats()["characters_billed"]
    assert after["tts_lb_fallback_usable"] == 1
    assert any(k.startswith("tts_lb_fallback_outcomes_total{") for k in after)


# --- 6a. the key is nowhere a client or an operator can see


def test_key_never_shown(down):
    lb = down.lb_
    for kind_call in (lambda: post(lb.port, "/v1/audio/speech", {"input": text()}),
                      lambda: post(lb.port, "/generate_voice", {"text": [text()]})):
        assert kind_call().status == 200
    for path, headers in (("/lb-stats", None), ("/lb-stats", {"Accept": "text/html"}),
                          ("/metrics", None), ("/health", None)):
        call(lb.port, "GET", path, headers=headers)
    assert SEEN
    assert_no_key(*SEEN, lb.output())
    assert KEY not in json.dumps(down.fake_.requests())


# --- 2. a backend fails once: the call is retried on the other, Cartesia untouched


@pytest.mark.parametrize("failure", ["status_503", "dead"])
def test_failure_retried_on_other_backend(stack, failure):
    fake = stack.fake("--rtf", "0")
    good = stack.echo()
    if failure == "dead":
        bad_url = closed_port_url()
    else:
        bad = stack.echo()
        assert call(bad.port, "GET", "/_mode?status=503").status == 200
        bad_url = bad.url
    # Round robin sends the first call to b0, the failing one (least_conn's
    # random tie-break could spare it all four times).
    lb = stack.lb([bad_url, good.url], fallback={"url": fake.url},
                  balancer={"policy": "round_robin"})
    for _ in range(4):
        reply = post(lb.port, "/v1/audio/speech", {"input": text(), "voice": "alloy"})
        assert reply.status == 200, reply
        assert reply.body == b"ok\n"
        assert reply.header("x-backend-port") == str(good.port)
        assert reply.header("x-tts-fallback") is None
    stats = lb.stats()
    assert stats["retry"]["retries"] >= 1, stats["retry"]
    assert stats["backends"][0]["requests"] >= 1
    assert fake.requests() == [] and fake.stats()["requests"] == 0
    assert sum(stats["fallback"]["by_reason"].values()) == 0


# --- 3. the caller's errors (4xx) pass through unchanged, never fall back


@pytest.mark.parametrize("status", [400, 422])
def test_client_error_passed_through(stack, status):
    fake = stack.fake("--rtf", "0")
    backend = stack.echo()
    assert call(backend.port, "GET", f"/_mode?status={status}").status == 200
    lb = stack.lb([backend.url], fallback={"url": fake.url})
    body = {"input": text(), "voice": "alloy"}
    direct = post(backend.port, "/v1/audio/speech", body)
    assert direct.status == status
    reply = post(lb.port, "/v1/audio/speech", body)
    assert reply.status == status
    assert reply.body == direct.body
    assert reply.header("content-type") == direct.header("content-type")
    assert reply.header("x-tts-fallback") is None
    assert fake.stats()["requests"] == 0
    assert lb.stats()["retry"]["retries"] == 0


# --- 5. two-step Chatterbox calls: the audio_url GET goes to the server that made it


@pytest.fixture
def chatterboxes(stack):
    fake = stack.fake("--rtf", "0")
    servers = [stack.chatterbox(), stack.chatterbox()]
    lb = stack.lb([s.url for s in servers], fallback={"url": fake.url})
    return lb, servers, fake


def test_chatterbox_validation_error_passed_through(chatterboxes):
    lb, servers, fake = chatterboxes
    body = {"text": text(), "exaggeration": 9.0}
    direct = post(servers[0].port, "/synthesize-json", body)
    assert direct.status == 422
    reply = post(lb.port, "/synthesize-json", body)
    assert reply.status == 422, reply
    assert reply.json() == direct.json()
    assert reply.header("x-tts-fallback") is None
    assert fake.stats()["requests"] == 0


def test_audio_url_follows_its_server(chatterboxes):
    lb, servers, fake = chatterboxes
    made = []   # (audio_url, duration, index of the server holding it)
    for _ in range(2):   # two at once: least_conn spreads them over both servers
        replies = concurrently(*[lambda: post(lb.port, "/synthesize-json", {"text": text()})
                                 for _ in range(2)])
        for reply in replies:
            assert reply.status == 200, reply
            assert reply.header("x-tts-fallback") is None
            doc = reply.json()
            url = doc["audio_url"]
            direct = [call(s.port, "GET", url).status for s in servers]
            assert sorted(direct) == [200, 404], (url, direct)
            made.append((url, doc["duration"], direct.index(200)))
    assert {holder for _, _, holder in made} == {0, 1}, "both servers should have made files"
    for url, duration, holder in made:
        for _ in range(3):
            reply = call(lb.port, "GET", url)
            assert reply.status == 200, (url, holder, reply)
            assert reply.header("content-type") == "audio/wav"
            assert read_wav(reply.body)[0] == pytest.approx(duration, abs=0.001)
        other = servers[1 - holder]
        assert call(other.port, "GET", url).status == 404
    assert fake.stats()["requests"] == 0


# --- 4. spillover: a full fleet past queue_timeout


@pytest.mark.parametrize("spillover", [False, True])
def test_spillover(stack, spillover):
    fake = stack.fake("--rtf", "0")
    backend = stack.echo()
    lb = stack.lb([{"url": backend.url, "max_concurrency": 1}],
                  fallback={"url": fake.url, "spillover": spillover},
                  balancer={"queue_timeout": 0.5, "slow_start": 0})
    slow: list = []
    holder = threading.Thread(target=lambda: slow.append(call(lb.port, "GET", "/slow?delay=2.5")),
                              daemon=True)
    holder.start()
    wait_until(lambda: lb.stats()["backends"][0]["in_flight"] == 1, what="the slot to be taken")
    said = text()
    reply = post(lb.port, "/v1/audio/speech", {"input": said, "voice": "alloy"})
    assert 0.4 <= reply.elapsed < 2.0, reply.elapsed   # it waited queue_timeout, not the slot
    if spillover:
        check_fallback_reply(reply, "audio/wav")
        read_wav(reply.body)
        check_cartesia_call(fake, said, voice=VOICE_ALLOY, speed=None)
        assert lb.stats()["fallback"]["by_reason"].get("queue_timeout") == 1
    else:
        assert reply.status == 503, reply
        assert reply.header("retry-after") is not None
        assert reply.header("x-tts-fallback") is None
        assert "queue_timeout" in error_text(reply.json())
        assert fake.stats()["requests"] == 0
    holder.join(5)
    assert slow and slow[0].status == 200 and slow[0].body == b"ok\n"


# --- 6b. a wrong key: 401 makes the fallback unusable, and says so


def test_wrong_key_makes_fallback_unusable(stack):
    fake = stack.fake("--rtf", "0", key=OTHER_KEY)
    lb = stack.lb([closed_port_url()], fallback={"url": fake.url})
    first = post(lb.port, "/v1/audio/speech", {"input": text()})
    assert first.status == 503, first
    error = error_text(first.json())
    assert "Cartesia answered 401" in error and "unusable" in error, error
    assert first.header("x-tts-fallback") is None
    health = call(lb.port, "GET", "/health").json()["fallback"]
    assert health["enabled"] is True and health["usable"] is False
    assert "401" in health["reason"], health
    stats = lb.stats()["fallback"]
    assert stats["usable"] is False and "401" in stats["reason"]
    assert stats["outcomes"].get("http_401") == 1
    later = [post(lb.port, "/v1/audio/speech", {"input": text()}),
             post(lb.port, "/synthesize-json", {"text": text()}),
             post(lb.port, "/generate_voice", {"text": [text()]})]
    for reply in later:
        assert reply.status == 503, reply
        assert "unusable" in error_text(reply.json()) and "Cartesia" in error_text(reply.json())
        assert reply.header("retry-after") == "1"
    entries = fake.requests()
    assert len(entries) == 1, entries   # later calls never reached Cartesia
    eject_every_backend(lb)
    assert call(lb.port, "GET", "/health").status == 503   # no backend, no usable fallback
    assert entries[0]["auth"] == "wrong_key" and entries[0]["status"] == 401
    assert dict(entries[0]["headers"])["authorization"] == "Bearer <redacted: key did not match>"
    assert metrics(lb.port)["tts_lb_fallback_usable"] == 0
    for path, headers in (("/lb-stats", None), ("/lb-stats", {"Accept": "text/html"}),
                          ("/metrics", None), ("/health", None)):
        call(lb.port, "GET", path, headers=headers)
    assert_no_key(*SEEN, lb.output())
    assert re.search(r"Cartesia.*unusable", lb.output()), lb.output()


def test_no_key_in_environment(stack):
    fake = stack.fake("--rtf", "0")
    lb = stack.lb([closed_port_url()], fallback={"url": fake.url}, key=None)
    reply = post(lb.port, "/v1/audio/speech", {"input": text()})
    assert reply.status == 503
    assert "unusable" in error_text(reply.json()) and KEY_ENV in error_text(reply.json())
    health = call(lb.port, "GET", "/health").json()["fallback"]
    assert health["usable"] is False and KEY_ENV in health["reason"]
    assert fake.stats()["requests"] == 0


# --- 7. HTTPS to Cartesia, verified


@pytest.fixture
def tls_files(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(paths["cert"]), append=i > 0)
    cert.private_key_pem.write_to_path(str(paths["key"]))
    return ca, paths


def test_https_with_ca_file(stack, tls_files):
    ca, paths = tls_files
    fake = stack.fake("--rtf", "0", "--tls-cert", str(paths["cert"]), "--tls-key",
                      str(paths["key"]), ca=ca)
    assert fake.url.startswith("https://")
    lb = stack.lb([closed_port_url()], fallback={"url": fake.url, "ca_file": str(paths["ca"])})
    said = text()
    reply = post(lb.port, "/v1/audio/speech", {"input": said, "voice": "alloy"})
    check_fallback_reply(reply, "audio/wav")
    read_wav(reply.body)
    check_cartesia_call(fake, said, voice=VOICE_ALLOY, speed=None)


def test_https_unverifiable_certificate_fails_fast(stack, tls_files):
    ca, paths = tls_files
    fake = stack.fake("--rtf", "0", "--tls-cert", str(paths["cert"]), "--tls-key",
                      str(paths["key"]), ca=ca)
    lb = stack.lb([closed_port_url()], fallback={"url": fake.url, "ca_file": "", "timeout": 10})
    for _ in range(2):
        reply = post(lb.port, "/v1/audio/speech", {"input": text()}, timeout=8)
        assert reply.status == 503, reply
        assert "TLS" in error_text(reply.json()), reply
        assert reply.elapsed < 5, reply.elapsed
        assert reply.header("x-tts-fallback") is None
    assert fake.stats()["requests"] == 0   # nothing was sent over an unverified connection
    stats = lb.stats()["fallback"]
    assert stats["outcomes"].get("tls") == 2
    assert stats["usable"] is True   # a TLS failure is not the key's fault


# --- 8. Cartesia's 429: the plan is full


def test_cartesia_429_is_waited_out(stack):
    fake = stack.fake("--rtf", "0.3", "--concurrency", "1")
    lb = stack.lb([closed_port_url()], fallback={"url": fake.url, "max_concurrency": 2})
    said = [text("the first of two calls at the same time"),
            text("the second of two calls at the same time")]
    replies = concurrently(*[lambda t=t: post(lb.port, "/v1/audio/speech", {"input": t})
                             for t in said])
    for reply, t in zip(replies, said):
        check_fallback_reply(reply, "audio/wav")
        assert read_wav(reply.body)[0] == pytest.approx(seconds_for(t, None), abs=0.05)
    stats = lb.stats()["fallback"]
    assert stats["outcomes"].get("throttled", 0) >= 1, stats
    assert stats["outcomes"].get("ok") == 2
    fake_stats = fake.stats()
    assert fake_stats["by_status"].get("429", 0) >= 1
    assert fake_stats["by_status"].get("200") == 2
    assert fake_stats["max_in_flight"] == 1
    assert metrics(lb.port)['tts_lb_fallback_outcomes_total{outcome="throttled"}'] >= 1


def test_balancer_holds_calls_to_plan_concurrency(stack):
    fake = stack.fake("--rtf", "0.3", "--concurrency", "1")
    lb = stack.lb([closed_port_url()], fallback={"url": fake.url, "max_concurrency": 1})
    said = [text("the first of two calls at the same time"),
            text("the second of two calls at the same time")]
    replies = concurrently(*[lambda t=t: post(lb.port, "/v1/audio/speech", {"input": t})
                             for t in said])
    for reply in replies:
        check_fallback_reply(reply, "audio/wav")
        read_wav(reply.body)
    fake_stats = fake.stats()
    assert fake_stats["max_in_flight"] == 1
    assert fake_stats["by_status"] == {"200": 2}, fake_stats
    assert "throttled" not in lb.stats()["fallback"]["outcomes"]


# --- more ways the fleet fails, and calls that end early


def test_5xx_left_after_retries_falls_back(stack):
    fake = stack.fake("--rtf", "0")
    backends = [stack.echo(), stack.echo()]
    for b in backends:
        assert call(b.port, "GET", "/_mode?status=503").status == 200
    lb = stack.lb([b.url for b in backends], fallback={"url": fake.url})
    said = text()
    reply = post(lb.port, "/v1/audio/speech", {"input": said, "voice": "alloy"})
    check_fallback_reply(reply, "audio/wav")
    read_wav(reply.body)
    check_cartesia_call(fake, said, voice=VOICE_ALLOY, speed=None)
    assert lb.stats()["fallback"]["by_reason"] == {"status_503": 1}
    assert sum(b.stats()["requests_total"] for b in backends) == 2   # tried both first


def test_non_tts_path_never_falls_back(stack):
    fake = stack.fake("--rtf", "0")
    lb = stack.lb([closed_port_url()], fallback={"url": fake.url})
    reply = post(lb.port, "/v1/audio/other", {"input": text()})
    assert reply.status in (502, 503), reply
    assert reply.header("x-tts-fallback") is None
    assert fake.stats()["requests"] == 0


def test_keep_alive_connection_serves_several_fallback_calls(stack):
    fake = stack.fake("--rtf", "0")
    lb = stack.lb([closed_port_url()], fallback={"url": fake.url})
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=TIMEOUT)
    try:
        for path, body in (("/v1/audio/speech", {"input": text()}),
                           ("/synthesize-json", {"text": text()}),
                           ("/v1/audio/speech/stream", {"input": text()}),
                           ("/generate_voice", {"text": [text()]})):
            conn.request("POST", path, body=json.dumps(body),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            assert resp.status == 200, (path, data)
            assert resp.getheader("x-tts-fallback") == "cartesia"
    finally:
        conn.close()
    assert lb.stats()["connections"]["accepted"] <= 2   # ours (+ at most a stats poll)


def test_chunked_request_body_arriving_slowly(stack):
    from conftest import RawReader, connect
    fake = stack.fake("--rtf", "0")
    lb = stack.lb([closed_port_url()], fallback={"url": fake.url})
    said = text()
    body = json.dumps({"input": said, "voice": "alloy"}).encode()
    with connect(lb.port, timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (body[:10], body[10:]):
            time.sleep(0.3)   # the fleet has failed by now; the rest of the body still comes
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        sock.sendall(b"0\r\n\r\n")
        resp = RawReader(sock).response()
    assert resp.status == 200 and resp.complete, (resp.status, resp.body[:300])
    assert resp.header("x-tts-fallback") == "cartesia"
    read_wav(resp.body)
    check_cartesia_call(fake, said, voice=VOICE_ALLOY, speed=None)


def test_cartesia_unreachable(stack):
    lb = stack.lb([closed_port_url()], fallback={"url": closed_port_url()})
    for path, body in (("/v1/audio/speech", {"input": text()}),
                       ("/synthesize-json", {"text": text()})):
        reply = post(lb.port, path, body)
        assert reply.status == 503, reply
        assert "Cartesia" in error_text(reply.json())
        assert reply.header("retry-after") is not None
        assert reply.elapsed < 5
    stats = lb.stats()["fallback"]
    assert stats["outcomes"].get("unreachable") == 2
    assert stats["usable"] is True and stats["in_flight"] == 0


def test_fallback_timeout_bounds_the_call(stack):
    fake = stack.fake("--rtf", "1")       # real time: 3 s of audio takes 3 s
    lb = stack.lb([closed_port_url()], fallback={"url": fake.url, "timeout": 1})
    words = "forty five characters of text, or close to it"
    # A whole file cannot be answered in time: 503, after about the timeout.
    reply = post(lb.port, "/synthesize-json", {"text": text(words)})
    assert reply.status == 503, reply
    assert "Cartesia" in error_text(reply.json())
    assert 0.8 < reply.elapsed < 3, reply.elapsed
    # A stream has started by then: it is cut, visibly (never a short body that looks whole).
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=TIMEOUT)
    started = time.monotonic()
    try:
        conn.request("POST", "/v1/audio/speech/stream", body=json.dumps({"input": text(words)}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("x-tts-fallback") == "cartesia"
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
    finally:
        conn.close()
    assert time.monotonic() - started < 3
    wait_until(lambda: lb.stats()["fallback"]["in_flight"] == 0, what="the fallback slot back")
    assert lb.stats()["fallback"]["outcomes"].get("timeout", 0) >= 2


def test_client_leaving_frees_the_cartesia_slot(stack):
    from conftest import connect
    fake = stack.fake("--rtf", "1")
    lb = stack.lb([closed_port_url()], fallback={"url": fake.url, "max_concurrency": 1})
    gone = text("forty five characters of text, or close to it")
    body = json.dumps({"text": gone}).encode()
    with connect(lb.port) as sock:
        sock.sendall(b"POST /synthesize-json HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: fake.stats()["in_flight"] == 1, what="the call to reach Cartesia")
    # the client left; Cartesia's only slot must come back well before its 3 s of audio
    wait_until(lambda: lb.stats()["fallback"]["in_flight"] == 0, timeout=1.5,
               what="the balancer to drop the abandoned Cartesia call")
    wait_until(lambda: fake.stats()["in_flight"] == 0, timeout=1.5,
               what="the fake to see the abandoned call end")
    said = text("short")
    reply = post(lb.port, "/v1/audio/speech", {"input": said})
    check_fallback_reply(reply, "audio/wav")
    assert reply.elapsed < 2.5
    assert [e["completed"] for e in fake.entries_for(gone)] == [False]
    assert "throttled" not in lb.stats()["fallback"]["outcomes"]


# --- review regressions


def test_head_or_get_on_a_tts_route_does_not_fall_back_or_hang(stack):
    # Only a POST carries a call to translate: a HEAD or GET to a TTS path
    # with the fleet down gets the fleet's own error at once, not a stuck
    # fallback.
    fake = stack.fake("--rtf", "0")
    lb = stack.lb([closed_port_url()], fallback={"url": fake.url},
                  retry={"attempts": 1})
    for method in ("HEAD", "GET"):
        reply = call(lb.port, method, "/v1/audio/speech", timeout=5)
        assert reply.status == 502, reply
        assert reply.header("x-tts-fallback") is None
    assert fake.requests() == []


def test_key_with_trailing_newline_works_and_one_with_a_space_is_unusable(stack):
    fake = stack.fake("--rtf", "0")
    lb = stack.lb([closed_port_url()], fallback={"url": fake.url}, key=KEY + "\n")
    reply = post(lb.port, "/v1/audio/speech", {"input": text()})
    assert reply.status == 200 and reply.header("x-tts-fallback") == "cartesia", reply
    bad = stack.lb([closed_port_url()], fallback={"url": fake.url}, key=KEY[:10] + " " + KEY[10:])
    reply = post(bad.port, "/v1/audio/speech", {"input": text()}, timeout=5)
    assert reply.status == 503, reply
    assert "not allowed in an HTTP header" in error_text(reply.json())
    assert_no_key(reply.body, bad.output())


def test_a_client_that_stops_reading_a_fallback_stream_is_cut_and_frees_the_slot(stack):
    fake = stack.fake("--rtf", "0")
    lb = stack.lb([closed_port_url()], fallback={"url": fake.url, "max_concurrency": 1},
                  timeouts={"idle": 1})
    # A long text and a client that never reads: the balancer's write buffer
    # fills, and after timeouts.idle the call is cut and its Cartesia slot freed.
    sock = socket.create_connection(("127.0.0.1", lb.port), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    body = json.dumps({"input": "word " * 590}).encode()   # about 200 s of audio
    sock.sendall(b"POST /v1/audio/speech/stream HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
    try:
        lb.wait_for_line(r"status=200 backend=cartesia .*note=\"client read nothing", timeout=15)
        wait_until(lambda: lb.stats()["fallback"]["in_flight"] == 0, timeout=5,
                   what="the Cartesia slot freed")
        reply = post(lb.port, "/v1/audio/speech", {"input": text()})
        assert reply.status == 200 and reply.header("x-tts-fallback") == "cartesia", reply
    finally:
        sock.close()


def test_fallback_audio_is_not_counted_as_the_backends(stack):
    fake = stack.fake("--rtf", "0")
    lb = stack.lb([closed_port_url()], fallback={"url": fake.url})
    reply = post(lb.port, "/v1/audio/speech", {"input": text()})
    assert reply.status == 200
    (backend,) = lb.stats()["backends"]
    assert backend["bytes_received"] == 0 and backend["bytes_sent"] == 0
