"""The OpenAI front door (POST /v1/audio/speech, kind = "openai") over each
backend API, end to end with the official `openai` SDK and raw sockets.

A simulated server per API (openai_tts, chatterbox, chattts; `--tone`, so
every answer is compared sample for sample with backends.audio's tone, which
lasts len(text) / 15 s) behind a balancer, one per module, API and engine;
its /_stats `requests_total` says whether a call reached it.  For what the
balancer *sent*, backends.recorder stands in for the server (its 200
{"n": N} is no audio, so those calls fail; only the recorded body counts).
"""
from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import threading
import wave

import av
import openai
import pytest

from backends.audio import SAMPLE_RATE, pcm, samples_for_text
from conftest import Balancer, Server, get_json, lb_config, wait_until

SPEECH = "/v1/audio/speech"
ROUTES = [(SPEECH, "openai")]
SIMULATORS = {"openai": "backends.openai_tts", "chatterbox": "backends.chatterbox",
              "chattts": "backends.chattts"}
FAST = ("--load-time", "0", "--tone", "--rtf", "0.05")
TIMEOUT = 20.0
TEXT = "Hello from the front door, speaking through the balancer."
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx",
                 "sage", "shimmer", "verse")
ERROR_KEYS = {"message", "type", "param", "code"}


def tone_for(text: str) -> bytes:
    """The PCM a --tone simulator makes for `text`: what every answer must carry."""
    return pcm(samples_for_text(text))


class Door:
    """A simulated server of one API behind a balancer with the front door."""

    def __init__(self, api: str, server: Server, balancer: Balancer):
        self.api, self.server, self.balancer = api, server, balancer
        self.base_url = f"http://127.0.0.1:{balancer.port}/v1"
        self.client = openai.OpenAI(base_url=self.base_url, api_key="sk-test",
                                    max_retries=0, timeout=TIMEOUT)

    def backend_requests(self) -> int:
        return get_json(self.server.port, "/_stats")["requests_total"]

    def close(self) -> None:
        self.client.close()
        try:
            self.balancer.stop_cleanly()
        finally:
            self.server.stop()

    def get(self, path: str) -> tuple[int, str, dict]:
        """GET from the balancer: (status, content type, JSON)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.balancer.port, timeout=TIMEOUT)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.getheader("content-type", ""), json.loads(resp.read())
        finally:
            conn.close()

    def post(self, body: bytes | dict) -> tuple[int, dict, bytes]:
        """A raw POST to the door: (status, headers lowercased, body)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.balancer.port, timeout=TIMEOUT)
        try:
            conn.request("POST", SPEECH, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()


def start_door(api: str, path, http_engine: str, *server_args: str, **backend) -> Door:
    server = Server(SIMULATORS[api], 0, *FAST, *server_args)
    try:
        path.write_text(lb_config([{"url": server.url, "api": api, **backend}], routes=ROUTES))
        return Door(api, server, Balancer(path, http=http_engine))
    except BaseException:
        server.stop()
        raise


@pytest.fixture(scope="module", params=list(SIMULATORS))
def door(request, http_engine, tmp_path_factory):
    path = tmp_path_factory.mktemp("door") / f"{request.param}-{http_engine}.toml"
    d = start_door(request.param, path, http_engine)
    yield d
    d.close()


def decoded_seconds(data: bytes, fmt: str) -> float:
    """How long encoded audio lasts, decoded by FFmpeg (PyAV)."""
    with av.open(io.BytesIO(data), format=fmt) as container:
        samples = rate = 0
        for frame in container.decode(audio=0):
            samples += frame.samples
            rate = frame.sample_rate
    assert rate, f"no audio frames decoded from {len(data)} bytes of {fmt}"
    return samples / rate


def sse_events(lines) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]


# --- formats, through the SDK


def test_pcm_is_the_raw_samples_and_nothing_else(door):
    audio = door.client.audio.speech.create(model="tts-1", voice="alloy", input=TEXT,
                                            response_format="pcm")
    assert audio.response.headers["content-type"] == "audio/pcm"
    body = audio.content
    assert not body.startswith(b"RIFF") and len(body) % 2 == 0
    assert body == tone_for(TEXT)   # its length is the text's: len / 15 seconds


def test_wav_is_24khz_mono_16bit_holding_the_samples(door):
    audio = door.client.audio.speech.create(model="tts-1", voice="alloy", input=TEXT,
                                            response_format="wav")
    assert audio.response.headers["content-type"] == "audio/wav"
    with wave.open(io.BytesIO(audio.content)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, SAMPLE_RATE)
        # A streamed WAV says "unknown size"; what counts is what is there.
        frames = w.readframes(len(audio.content))
    assert frames == tone_for(TEXT)


@pytest.mark.parametrize("streamed", [False, True], ids=["create", "streaming_response"])
def test_mp3_decodes_to_the_texts_duration(door, streamed):
    args = dict(model="tts-1", voice="alloy", input=TEXT, response_format="mp3")
    if streamed:
        with door.client.audio.speech.with_streaming_response.create(**args) as resp:
            content_type = resp.headers["content-type"]
            data = b"".join(resp.iter_bytes())
    else:
        audio = door.client.audio.speech.create(**args)
        content_type, data = audio.response.headers["content-type"], audio.content
    assert content_type == "audio/mpeg"
    assert decoded_seconds(data, "mp3") == pytest.approx(len(TEXT) / 15, abs=0.15)


def test_async_client_streams_pcm(door):
    async def fetch() -> tuple[str, list[bytes]]:
        async with openai.AsyncOpenAI(base_url=door.base_url, api_key="sk-test",
                                      max_retries=0, timeout=TIMEOUT) as client:
            async with client.audio.speech.with_streaming_response.create(
                    model="tts-1", voice="nova", input=TEXT, response_format="pcm") as resp:
                return resp.headers["content-type"], [c async for c in resp.iter_bytes()]

    content_type, chunks = asyncio.run(fetch())
    assert content_type == "audio/pcm"
    assert b"".join(chunks) == tone_for(TEXT)


# --- SSE


@pytest.mark.parametrize("fmt", ["pcm", "wav"])
def test_sse_deltas_carry_the_audio_and_done_comes_last(door, fmt):
    with door.client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=TEXT, response_format=fmt,
            stream_format="sse") as resp:
        headers = resp.headers
        events = sse_events(resp.iter_lines())
    assert headers["content-type"] == "text/event-stream"
    assert headers["cache-control"] == "no-cache" and headers["x-accel-buffering"] == "no"
    *deltas, done = events
    assert deltas and all(e["type"] == "speech.audio.delta" for e in deltas), events[:3]
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    if fmt == "wav":
        assert audio[:4] == b"RIFF" and audio[8:12] == b"WAVE"
        audio = audio[44:]
    assert audio == tone_for(TEXT)
    assert done["type"] == "speech.audio.done"
    usage = done["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0


# --- speed

# What each API is asked for, on OpenAI's scale: Chatterbox's speech_rate stops
# at 2.0; ChatTTS has [speed_0]..[speed_9], 5 its normal pace.
SPEED_APPLIED = {"openai": "3", "chatterbox": "2", "chattts": "1.8"}


def test_speed_header_says_what_the_backend_was_asked(door):
    resp = door.client.audio.speech.with_raw_response.create(
        model="tts-1", voice="alloy", input=TEXT, response_format="pcm", speed=3.0)
    assert resp.status_code == 200
    assert resp.headers["x-tts-speed-applied"] == SPEED_APPLIED[door.api]
    assert len(resp.content) % 2 == 0 and not resp.content.startswith(b"RIFF")


# --- refusals: 400 in OpenAI's shape, and the backend never hears of them

MISSING = object()
GOOD = {"model": "tts-1", "input": TEXT, "voice": "alloy", "response_format": "pcm"}
BAD_CALLS = {
    "unknown voice": ({"voice": "bob"}, "voice"),
    "voice a list": ({"voice": ["alloy"]}, "voice"),
    "unknown response_format": ({"response_format": "ogg"}, "response_format"),
    "unknown stream_format": ({"stream_format": "websocket"}, "stream_format"),
    "empty input": ({"input": ""}, "input"),
    "blank input": ({"input": "  \n "}, "input"),
    "missing input": ({"input": MISSING}, "input"),
    "input a number": ({"input": 42}, "input"),
    "input over 4096 characters": ({"input": "word " * 820}, "input"),
    "speed a string": ({"speed": "fast"}, "speed"),
    "speed above 4": ({"speed": 4.5}, "speed"),
    "speed below 0.25": ({"speed": 0.1}, "speed"),
}


def assert_openai_error(status: int, headers: dict, body: bytes, param) -> dict:
    assert status == 400, (status, body[:300])
    assert headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert set(error) == ERROR_KEYS, error
    assert error["type"] == "invalid_request_error" and error["message"], error
    assert error["param"] == param, error
    return error


@pytest.mark.parametrize("change", list(BAD_CALLS))
def test_a_bad_call_is_refused_before_any_backend(door, change):
    fields, param = BAD_CALLS[change]
    body = {**GOOD, **fields}
    body = {k: v for k, v in body.items() if v is not MISSING}
    before = door.backend_requests()
    error = assert_openai_error(*door.post(body), param)
    if change == "unknown voice":
        assert all(name in error["message"] for name in OPENAI_VOICES), error
    assert door.backend_requests() == before


@pytest.mark.parametrize("raw", [b'{"model": "tts-1", "input": "Hi', b"[1, 2]", b""],
                         ids=["truncated", "not an object", "empty"])
def test_a_body_that_is_not_a_json_object_is_refused(door, raw):
    before = door.backend_requests()
    assert_openai_error(*door.post(raw), None)
    assert door.backend_requests() == before


def test_the_sdk_raises_bad_request_with_the_message(door):
    before = door.backend_requests()
    with pytest.raises(openai.BadRequestError) as caught:
        door.client.audio.speech.create(model="tts-1", voice="bob", input=TEXT)
    assert caught.value.status_code == 400 and caught.value.param == "voice"
    assert "bob" in caught.value.message and "alloy" in caught.value.message
    assert door.backend_requests() == before


# --- what OpenAI clients probe, answered by the balancer itself


def test_root_answers_while_the_backend_is_busy_without_touching_it(door):
    long_text = "A sentence that takes the simulated GPU a while to say. " * 5   # ~1 s of GPU
    answers = []
    caller = threading.Thread(target=lambda: answers.append(door.post({**GOOD,
                                                                      "input": long_text})))
    caller.start()
    try:
        wait_until(lambda: get_json(door.server.port, "/_stats")["synth_in_flight"] >= 1,
                   what="the synthesis to start")
        before = door.backend_requests()
        status, content_type, root = door.get("/")
        stats = get_json(door.server.port, "/_stats")
        assert stats["synth_in_flight"] >= 1     # answered before the synthesis ended ...
        assert stats["requests_total"] == before  # ... and not by the backend
        assert (status, content_type) == (200, "application/json") and isinstance(root, dict)
    finally:
        caller.join(TIMEOUT)
    assert answers and answers[0][0] == 200


def test_models_list_through_the_sdk(door):
    before = door.backend_requests()
    models = list(door.client.models.list())
    assert "tts-1" in [m.id for m in models]
    assert all(m.object == "model" for m in models)
    status, _, raw = door.get("/v1/models")
    assert status == 200 and raw["object"] == "list"
    assert {"id": "tts-1", "object": "model"}.items() <= raw["data"][0].items()
    assert door.backend_requests() == before


def test_voices_lists_the_openai_names(door):
    before = door.backend_requests()
    status, _, answer = door.get("/v1/audio/voices")
    assert status == 200 and set(OPENAI_VOICES) <= set(answer["voices"]), answer
    assert door.backend_requests() == before


# --- [route.voices] and pass_unknown_voices

VOICES_TOML = ('[route.voices]\n'   # lb_config writes [[route]] last: this is its table
               'narrator = { openai = "nova", chattts = 1234, '
               'chatterbox = { seed = 7, exaggeration = 0.7 } }\n')
# What each API is sent for "narrator", then for an unknown name let through.
SENT_AS = {
    "openai": (lambda b: (b["voice"], b["input"]), [("nova", TEXT), ("bob", TEXT)]),
    "chatterbox": (lambda b: (b.get("seed"), b.get("exaggeration"), b["text"]),
                   [(7, 0.7, TEXT), (None, None, TEXT)]),
    "chattts": (lambda b: (b["params_infer_code"].get("manual_seed"), b["text"]),
                [(1234, [TEXT]), (None, [TEXT])]),
}


@pytest.fixture
def start_voiced(tmp_path, http_engine):
    """start(api, module=None, pass_unknown=False): a Door whose route maps "narrator"."""
    doors = []

    def start(api: str, module: str | None = None, pass_unknown: bool = False) -> Door:
        server = Server(module or SIMULATORS[api], 0, *(() if module else FAST))
        route = {"path": SPEECH, "kind": "openai", "pass_unknown_voices": pass_unknown}
        path = tmp_path / f"voices{len(doors)}.toml"
        path.write_text(lb_config([{"url": server.url, "api": api}], routes=[route],
                                  retry={"attempts": 1}) + VOICES_TOML)
        try:
            doors.append(Door(api, server, Balancer(path, http=http_engine)))
        except BaseException:
            server.stop()
            raise
        return doors[-1]

    yield start
    for d in doors:
        d.close()


@pytest.mark.parametrize("api", list(SIMULATORS))
def test_a_mapped_voice_is_served_and_an_unknown_one_refused(start_voiced, api):
    d = start_voiced(api)
    status, _, body = d.post({**GOOD, "voice": "narrator"})
    assert (status, body) == (200, tone_for(TEXT)), body[:300]
    assert "narrator" in d.get("/v1/audio/voices")[2]["voices"]
    before = d.backend_requests()
    error = assert_openai_error(*d.post({**GOOD, "voice": "bob"}), "voice")
    assert "narrator" in error["message"]
    assert d.backend_requests() == before


@pytest.mark.parametrize("api", list(SIMULATORS))
def test_pass_unknown_voices_lets_any_name_through(start_voiced, api):
    d = start_voiced(api, pass_unknown=True)
    status, _, body = d.post({**GOOD, "voice": "bob"})
    assert (status, body) == (200, tone_for(TEXT)), body[:300]


@pytest.mark.parametrize("api", list(SIMULATORS))
def test_the_backend_is_sent_the_mapped_voice(start_voiced, api):
    d = start_voiced(api, module="backends.recorder", pass_unknown=True)
    d.post({**GOOD, "voice": "narrator"})   # the recorder's {"n": 1} is no audio: not 200
    d.post({**GOOD, "voice": "bob"})
    bodies = [json.loads(r["body"]) for r in get_json(d.server.port, "/_records")]
    sent, expected = SENT_AS[api]
    assert [sent(b) for b in bodies] == expected, bodies
