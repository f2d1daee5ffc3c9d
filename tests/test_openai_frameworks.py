"""Voice-agent frameworks against the OpenAI front door: their exact requests
replayed with the `openai` SDK, and, where the framework itself is
installed, the framework driven for real (pytest.importorskip).

The request shapes are read from the frameworks' own sources
(/work/shared/reference/voice-agents.md, checked against pipecat-ai 1.14.0
`pipecat/services/openai/tts.py` and livekit-plugins-openai 1.8.9
`livekit/plugins/openai/tts.py`):

  Pipecat OpenAITTSService.run_tts: AsyncOpenAI(api_key, base_url) with the
    SDK's defaults; audio.speech.with_streaming_response.create(input, model
    "gpt-4o-mini-tts", voice (one of its VALID_VOICES, checked before
    sending), response_format "pcm", instructions and speed only when set);
    status 200 or an ErrorFrame; r.iter_bytes(chunk_size) played as 24 kHz
    s16le, chunk_size = 0.5 s of it (24000 bytes).
  LiveKit openai.TTS: AsyncClient(max_retries=0); create(input, model
    (default "gpt-4o-mini-tts"), voice (default "ash"), response_format
    (default "mp3"), speed 1.0, stream_format "audio" for tts-1/tts-1-hd
    else "sse", timeout 30); the body is read by its Content-Type:
    text/event-stream -> speech.audio.delta events ("delta" or "audio",
    base64, decoded as audio/<response_format>), else the raw bytes.
    prewarm(): client.get("/", cast_to=str), relative to base_url.

Both play audio as it arrives, so an answer from an OpenAI-style server
that streams must stream through the balancer too (first audio well before
the end, timed on the socket).
"""
from __future__ import annotations

import asyncio
import base64
import http.client
import json
import time

import openai
import pytest

import test_openai_front_door as front_door
from backends.audio import SAMPLE_RATE, pcm, samples_for_text
from test_openai_front_door import (GOOD, SPEECH, TEXT, TIMEOUT, decoded_seconds, sse_events,
                                    start_door, tone_for)

door = front_door.door          # the module-scoped fixture: one per API and engine

PIPECAT_CHUNK = int(SAMPLE_RATE * 0.5 * 2)   # TTSService.chunk_size: 0.5 s of s16le
# pipecat 1.14.0 openai/tts.py VALID_VOICES (the SDK's built-in voices, too).
PIPECAT_VOICES = ("alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin",
                  "nova", "onyx", "sage", "shimmer", "verse")
SSE_TYPE = "text/event-stream"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


# --- Pipecat, replayed


async def pipecat_call(base_url: str, **params) -> tuple[int, str, list[bytes]]:
    """What OpenAITTSService.run_tts sends and reads: (status, content type, chunks)."""
    async with openai.AsyncOpenAI(api_key="sk-test", base_url=base_url) as client:
        create = {"input": TEXT, "model": "gpt-4o-mini-tts", "voice": "alloy",
                  "response_format": "pcm", **params}
        async with client.audio.speech.with_streaming_response.create(**create) as r:
            return (r.status_code, r.headers.get("content-type", ""),
                    [c async for c in r.iter_bytes(PIPECAT_CHUNK)])


@pytest.mark.parametrize("settings", [{}, {"instructions": "Speak warmly.", "speed": 1.25}],
                         ids=["defaults", "instructions+speed"])
def test_pipecat_gets_raw_pcm_it_can_play(door, settings):
    status, content_type, chunks = run(pipecat_call(door.base_url, **settings))
    assert (status, content_type) == (200, "audio/pcm")
    audio = b"".join(chunks)
    # A WAV header here would be played as a click; an odd length misaligns samples.
    assert not audio.startswith(b"RIFF") and len(audio) % 2 == 0
    assert audio == tone_for(TEXT)
    assert all(len(c) == PIPECAT_CHUNK for c in chunks[:-1])


def test_every_voice_pipecat_may_send_is_taken(http_engine, tmp_path):
    """Pipecat sends nothing but these names: each must work out of the box."""
    d = start_door("chatterbox", tmp_path / "lb.toml", http_engine)
    try:
        answers = {v: d.post({"model": "gpt-4o-mini-tts", "input": "Hi.", "voice": v,
                              "response_format": "pcm"}) for v in PIPECAT_VOICES}
    finally:
        d.close()
    refused = {v: (a[0], json.loads(a[2])["error"]["message"][:80])
               for v, a in answers.items() if a[0] != 200}
    assert refused == {}


# --- LiveKit, replayed


def livekit_client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(max_retries=0, api_key="sk-test", base_url=base_url)


async def livekit_call(base_url: str, model: str, fmt: str = "mp3") -> tuple[str, bytes]:
    """What ChunkedStream._run sends and reads: (media type, the audio it decodes)."""
    async with livekit_client(base_url) as client:
        async with client.audio.speech.with_streaming_response.create(
                input=TEXT, model=model, voice="ash", response_format=fmt, speed=1.0,
                stream_format="audio" if model in ("tts-1", "tts-1-hd") else "sse",
                timeout=30) as stream:
            media_type = stream.headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != SSE_TYPE:
                return media_type, b"".join([c async for c in stream.iter_bytes()])
            audio = []
            async for line in stream.iter_lines():
                if not line.startswith("data: ") or line[6:] == "[DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("type") == "speech.audio.delta":
                    audio.append(base64.b64decode(event.get("delta", "") or event["audio"]))
            return media_type, b"".join(audio)


@pytest.mark.parametrize("model, media_type", [("gpt-4o-mini-tts", SSE_TYPE),
                                               ("tts-1", "audio/mpeg")])
def test_livekit_gets_mp3_it_can_decode(door, model, media_type):
    got_type, audio = run(livekit_call(door.base_url, model))
    assert got_type == media_type
    # SSE deltas are decoded as audio/<response_format>: they must be mp3, not PCM.
    assert decoded_seconds(audio, "mp3") == pytest.approx(len(TEXT) / 15, abs=0.15)


def test_livekit_prewarm_is_answered_by_the_balancer(door):
    """prewarm() GETs "/" relative to base_url (.../v1/); it must not wait on a GPU."""
    before = door.backend_requests()

    async def prewarm():
        async with livekit_client(door.base_url) as client:
            return await client.get("/", cast_to=str)

    assert json.loads(run(prewarm()))
    assert door.backend_requests() == before


# --- first audio before the end: what a voice agent waits on ("stream every chunk
# through at once"), from an OpenAI-style server that streams

FIRST = "The first sentence is short, so its audio can be made and sent quite soon."
SECOND = ("The second sentence is a good deal longer than the first one, and the server "
          "needs much more time to make all of its audio before the answer is over.")
STREAMED_TEXT = f"{FIRST} {SECOND}"    # under split.min_chars (300): one piece, not cut
STREAM_CASES = {   # the backend's `formats` (None: unset), what the caller asks
    "door pcm, formats unset": (None, {"response_format": "pcm"}),
    "door sse, formats unset": (None, {"response_format": "pcm", "stream_format": "sse"}),
    "sse passed through": (["wav", "pcm", "sse"], {"response_format": "pcm",
                                                   "stream_format": "sse"}),
    "door sse, backend declares sse": (["wav", "sse"], {"response_format": "pcm",
                                                        "stream_format": "sse"}),
    "door pcm, backend declares sse": (["wav", "sse"], {"response_format": "pcm"}),
}


def first_audio_and_end(port: int, body: dict, sse: bool) -> tuple[float, float, bytes]:
    """Seconds from sending the call to its first audio and to its end, and the body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        start = time.monotonic()
        conn.request("POST", SPEECH, body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()[:300]
        data, first = b"", None
        while time.monotonic() - start < TIMEOUT:
            chunk = resp.read1(65536)
            if not chunk:
                break
            data += chunk
            if first is None and (b'"speech.audio.delta"' in data if sse else data):
                first = time.monotonic() - start
        return first, time.monotonic() - start, data
    finally:
        conn.close()


@pytest.mark.parametrize("case", list(STREAM_CASES))
def test_openai_style_audio_streams_as_it_is_made(case, http_engine, tmp_path):
    formats, asked = STREAM_CASES[case]
    # rtf 0.1: the server's two chunks (one per sentence) take ~0.5 s and ~1 s.
    d = start_door("openai", tmp_path / "lb.toml", http_engine, "--rtf", "0.1",
                   **({} if formats is None else {"formats": formats}))
    try:
        sse = asked.get("stream_format") == "sse"
        first, end, data = first_audio_and_end(d.balancer.port, {**GOOD, "input": STREAMED_TEXT,
                                                                 **asked}, sse)
        audio = (b"".join(base64.b64decode(e["audio"]) for e in
                          sse_events(data.decode().splitlines())
                          if e["type"] == "speech.audio.delta") if sse else data)
        # The tone, as long as the text (a streaming server rounds each chunk's length).
        assert audio == pcm(len(audio) // 2)
        assert len(audio) == pytest.approx(len(tone_for(STREAMED_TEXT)), rel=0.01)
        assert first is not None and first < 0.6 * end, (first, end)
    finally:
        d.close()


# --- the frameworks themselves, where installed (pip install pipecat-ai, or
# livekit-agents livekit-plugins-openai): none needs audio hardware.


def test_pipecat_pipeline_speaks_through_the_balancer(door):
    pipecat_tts = pytest.importorskip("pipecat.services.openai.tts")
    from pipecat.frames.frames import EndFrame, TTSAudioRawFrame, TTSSpeakFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.runner import PipelineRunner
    from pipecat.pipeline.task import PipelineParams, PipelineTask
    from pipecat.processors.frame_processor import FrameProcessor

    class Collect(FrameProcessor):
        """After the TTS service: keeps its audio frames (its ErrorFrames go upstream,
        and a refused call just yields no audio)."""

        def __init__(self):
            super().__init__()
            self.audio = []

        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            if isinstance(frame, TTSAudioRawFrame):
                self.audio.append(frame)
            await self.push_frame(frame, direction)

    async def speak(out: Collect):
        service = pipecat_tts.OpenAITTSService(
            api_key="sk-test", base_url=door.base_url,
            settings=pipecat_tts.OpenAITTSService.Settings(voice="alloy"))
        task = PipelineTask(Pipeline([service, out]),
                            params=PipelineParams(audio_out_sample_rate=SAMPLE_RATE))
        await task.queue_frames([TTSSpeakFrame(TEXT), EndFrame()])
        await PipelineRunner(handle_sigint=False).run(task)

    out = Collect()
    run(speak(out))
    assert {(f.sample_rate, f.num_channels) for f in out.audio} == {(SAMPLE_RATE, 1)}
    assert b"".join(f.audio for f in out.audio) == tone_for(TEXT)


@pytest.mark.parametrize("model", ["gpt-4o-mini-tts", "tts-1"])
def test_livekit_tts_speaks_through_the_balancer(door, model):
    lk_openai = pytest.importorskip("livekit.plugins.openai")

    async def speak():
        tts = lk_openai.TTS(base_url=door.base_url, api_key="sk-test", model=model)
        try:
            async with tts.synthesize(TEXT) as stream:
                return [event.frame async for event in stream]
        finally:
            await tts.aclose()

    frames = run(speak())
    assert {(f.sample_rate, f.num_channels) for f in frames} == {(SAMPLE_RATE, 1)}
    samples = sum(f.samples_per_channel for f in frames)
    assert samples == pytest.approx(samples_for_text(TEXT), abs=0.15 * SAMPLE_RATE)
