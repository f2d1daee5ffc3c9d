"""Simulated OpenAI-compatible TTS GPU server (Chatterbox as travisvn/chatterbox-tts-api).

Faithful to chatterbox-tts-api's speech and health endpoints, on the simulated GPU of
backends/gpu.py.  Run: python -m backends.openai_tts --port 0 [--slots N --rtf R ...]

  POST /v1/audio/speech   (aliases /audio/speech, /tts)  JSON: "input" (1-3000 chars,
        --max-input; stripped, blank is an error), "voice" (any name: unknown ones use the
        default voice), "model" (tts-1, tts-1-hd, chatterbox-v1, ...), "response_format" and
        "speed" (ignored: always WAV), "exaggeration" [0.25-2], "cfg_weight" [0-1],
        "temperature" [0.05-5], "stream_format" "audio"|"sse", "streaming_chunk_size" [50-500],
        "streaming_strategy" sentence|paragraph|fixed|word, "streaming_quality"
        fast|balanced|high.
        -> a whole WAV file (audio/wav, sent chunked as Starlette's StreamingResponse does),
        or with stream_format "sse": text/event-stream of `data: {json}` events:
        speech.audio.info, one speech.audio.delta {"audio": base64 PCM} per text chunk as it is
        generated, then speech.audio.done {"usage": {...}}.
        Also "stream": true (the ChatTTS OpenAI-style example's flag; chatterbox-tts-api
        ignores unknown fields) -> the chunked WAV of /v1/audio/speech/stream.
  POST /v1/audio/speech/stream   (alias /audio/speech/stream)  the same JSON ->
        audio/wav, chunked: the 44-byte unknown-size header (RIFF 0x7FFFFFFF-36, data
        0xFFFFFFFF), then raw s16le PCM, one piece per text chunk (sentences packed up to
        200 chars by default), each sent once its share of GPU time has passed.
  The samples say the text (espeak-ng, per chunk when streaming; see speech.py) or are the
  tone (--tone, or no espeak-ng); their lengths are the same either way.
  GET  /health (/v1/health)  200 {"status":"healthy"|"initializing","model_loaded":...,
        "device":"cuda", "initialization_state":"ready"|"initializing", ...}
  GET  /ping (/v1/ping)      200 {"status":"ok","message":"Server is running"}

Errors: a body that fails validation: 422 {"detail": [...]} (FastAPI's RequestValidationError;
the app's own handler only reshapes HTTPException); the app's HTTPExceptions:
{"error": {"message": ..., "type": ...}}: 503 "Model not loaded" (model_error) while loading
(the real server answers 500 or makes the request wait; 503 keeps "not ready" distinct from
"broken"), 500 "TTS generation failed: simulated" (generation_error) for a --fail-rate
failure.  A failure after a stream has started ends it the way uvicorn does when a streaming
generator raises: the connection closes with no last chunk.
Plus the simulator's /_stats, /_stats/reset, /_mode, /_crash (see simserver).
"""
from __future__ import annotations

import argparse
import base64
import re
import sys

import orjson

from . import audio
from .schema import Field, Invalid, json_body, validate
from .simserver import HTTPError, SimServer, SynthFailed, run_main

MAX_JSON = 1 << 20
MODELS = ("chatterbox-v1", "chatterbox-v2", "chatterbox-multilingual-v1",
          "chatterbox-multilingual-v2", "indextts-2", "higgs-audio-v2", "vibevoice-1.5b",
          "vibevoice-7b", "tts-1", "tts-1-hd")
STRATEGIES = ("sentence", "paragraph", "fixed", "word")
QUALITY = {"fast": (100, "word"), "balanced": (200, "sentence"), "high": (300, "paragraph")}


def _one_of(name, allowed):
    return lambda v: None if v in allowed else f"{name} must be one of: {', '.join(allowed)}"


def _nonblank(v: str):
    return (None, v.strip()) if v.strip() else "Input text cannot be empty"


def tts_request(max_input: int = 3000) -> dict:
    return {
        "input": Field("str", min_length=1, max_length=max_input, check=_nonblank),
        "model": Field("str", None, optional=True, check=lambda v: _one_of("model", MODELS)(v)),
        "voice": Field("str", "alloy", optional=True),
        "response_format": Field("str", "wav", optional=True),
        "speed": Field("float", 1.0, optional=True),
        "stream_format": Field("str", "audio", optional=True,
                               check=_one_of("stream_format", ("audio", "sse"))),
        "exaggeration": Field("float", None, optional=True, ge=0.25, le=2.0),
        "cfg_weight": Field("float", None, optional=True, ge=0.0, le=1.0),
        "temperature": Field("float", None, optional=True, ge=0.05, le=5.0),
        "streaming_chunk_size": Field("int", None, optional=True, ge=50, le=500),
        "streaming_strategy": Field("str", None, optional=True,
                                    check=_one_of("streaming_strategy", STRATEGIES)),
        "streaming_quality": Field("str", None, optional=True,
                                   check=_one_of("streaming_quality", tuple(QUALITY))),
        "stream": Field("bool", None, optional=True),
    }


_SENTENCE_END = re.compile(r"(?<=[.!?;:\u3002\uff01\uff1f])\s+")
_PARAGRAPH = re.compile(r"\n\s*\n")


def split_for_streaming(text: str, chunk_size: int | None = None, strategy: str | None = None,
                        quality: str | None = None) -> list[str]:
    """Text chunks, one audio piece each, roughly as chatterbox-tts-api's
    split_text_for_streaming: a quality preset gives the size and strategy (fast: 100 chars by
    words, balanced (default): 200 by sentences, high: 300 by paragraphs); units are packed
    into chunks up to the size, and a unit that is longer is cut at spaces (or hard)."""
    size, strat = QUALITY[quality or "balanced"]
    size, strat = chunk_size or size, strategy or strat
    text = text.strip()
    if strat == "sentence":
        units = _SENTENCE_END.split(text)
    elif strat == "paragraph":
        units = _PARAGRAPH.split(text)
    else:  # word, fixed
        units = text.split()
    chunks, cur = [], ""
    for unit in (u.strip() for u in units):
        if not unit:
            continue
        while len(unit) > size:  # too long for a chunk on its own: cut at a space if we can
            cut = unit.rfind(" ", 0, size + 1)
            cut = cut if cut > 0 else size
            if cur:
                chunks.append(cur)
                cur = ""
            chunks.append(unit[:cut].strip())
            unit = unit[cut:].strip()
        if cur and len(cur) + 1 + len(unit) > size:
            chunks.append(cur)
            cur = unit
        else:
            cur = f"{cur} {unit}" if cur else unit
    if cur:
        chunks.append(cur)
    return [c for c in chunks if c]


def _sse(obj) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class OpenAITTSServer(SimServer):
    kind = "openai_tts"
    ROUTES = [(m, p, h) for paths, m, h in [
        (("/v1/audio/speech", "/audio/speech", "/tts"), "POST", "h_speech"),
        (("/v1/audio/speech/stream", "/audio/speech/stream"), "POST", "h_stream"),
        (("/health", "/v1/health"), "GET", "h_health"),
        (("/ping", "/v1/ping"), "GET", "h_ping"),
    ] for p in paths]

    def __init__(self, gpu=None, keepalive=5.0, *, max_input: int = 3000):
        super().__init__(gpu, keepalive)
        self.max_input = max_input
        self.schema = tts_request(max_input)

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("openai_tts")
        g.add_argument("--max-input", type=int, default=3000, metavar="N",
                       help="longest `input` accepted (default 3000; ChatTTS's example: 2048)")

    @classmethod
    def from_args(cls, opts, args):
        if args.max_input < 1:
            raise ValueError("--max-input must be >= 1")
        return cls(opts, args.keepalive, max_input=args.max_input)

    def not_ready_error(self) -> HTTPError:
        return HTTPError(503, {"error": {"message": "Model not loaded", "type": "model_error"}})

    @staticmethod
    def generation_error(what: str = "TTS generation") -> HTTPError:
        return HTTPError(500, {"error": {"message": f"{what} failed: simulated",
                                         "type": "generation_error"}})

    # --- endpoints ----------------------------------------------------------------------------

    async def h_health(self, conn, req):
        await conn.read_body()
        ready = self.ready
        await conn.respond_json(200, {
            "status": "healthy" if ready else "initializing", "model_loaded": ready,
            "device": "cuda",
            "config": {"max_chunk_length": 280, "max_total_length": self.max_input,
                       "voice_sample_path": "./voice-sample.mp3", "default_exaggeration": 0.5,
                       "default_cfg_weight": 0.5, "default_temperature": 0.8},
            "initialization_state": "ready" if ready else "initializing",
            "initialization_progress": "Model ready" if ready else "Loading model...",
            "initialization_error": None})

    async def h_ping(self, conn, req):
        await conn.read_body()
        await conn.respond_json(200, {"status": "ok", "message": "Server is running"})

    async def parse(self, conn) -> dict:
        body = await conn.read_body(MAX_JSON)
        try:
            params = validate(self.schema, json_body(body))
        except Invalid as e:
            raise HTTPError(422, e.body()) from None
        self.check_ready()
        return params

    async def h_speech(self, conn, req):
        params = await self.parse(conn)
        if params["stream_format"] == "sse":
            return await self.sse(conn, params)
        if params["stream"]:
            return await self.wav_stream(conn, params)
        n = audio.samples_for_text(params["input"], self.opts.chars_per_second)
        async with self.synthesis(conn) as s:
            samples = s.render(params["input"], n)
            try:
                await s.whole(n / audio.SAMPLE_RATE)
            except SynthFailed:
                raise self.generation_error() from None
            samples = await samples
            await s.send_whole(200, audio.wav_header(len(samples)) + samples, [
                ("content-type", "audio/wav"),
                ("content-disposition", "attachment; filename=speech.wav")], chunked=True)

    async def h_stream(self, conn, req):
        await self.wav_stream(conn, await self.parse(conn))

    def chunks(self, params) -> list[str]:
        return split_for_streaming(params["input"], params["streaming_chunk_size"],
                                   params["streaming_strategy"], params["streaming_quality"])

    async def wav_stream(self, conn, params):
        headers = [("content-type", "audio/wav"),
                   ("content-disposition", "attachment; filename=speech_stream.wav"),
                   ("cache-control", "no-cache"), ("x-accel-buffering", "no")]
        await self.stream_pieces(conn, params, headers, audio.wav_header(None),
                                 lambda pcm: pcm, None)

    async def sse(self, conn, params):
        headers = [("content-type", "text/event-stream; charset=utf-8"),
                   ("cache-control", "no-cache"), ("x-accel-buffering", "no")]
        info = _sse({"type": "speech.audio.info", "sample_rate": audio.SAMPLE_RATE,
                     "channels": audio.CHANNELS, "bits_per_sample": 8 * audio.SAMPLE_WIDTH})

        def delta(pcm: bytes) -> bytes:
            return _sse({"type": "speech.audio.delta", "audio": base64.b64encode(pcm).decode()})

        def done(n_chunks: int) -> bytes:
            words = len(params["input"].split())
            return _sse({"type": "speech.audio.done", "usage": {
                "input_tokens": words, "output_tokens": 50 * n_chunks,
                "total_tokens": words + 50 * n_chunks}})

        await self.stream_pieces(conn, params, headers, info, delta, done)

    async def stream_pieces(self, conn, params, headers, first: bytes, wrap, last):
        """Head and `first` at once (as the real generator yields its header before any
        generation), then one piece per text chunk as its GPU time passes, then `last`."""
        chunks = self.chunks(params)
        cps = self.opts.chars_per_second
        async with self.synthesis(conn) as s:
            if s.fate.hang:
                await s.hang()
            fail_at, cut = s.fail_before(len(chunks)), s.cut_at(len(chunks))
            await conn.start_stream(200, headers)
            await conn.send_data(first)
            offset = 0
            for i, chunk in enumerate(chunks):
                if i == cut:
                    s.outcome = "reset"
                    await conn.reset()
                n = audio.samples_for_text(chunk, cps)
                piece = s.render(chunk, n, offset)  # made while its GPU time passes
                if i == fail_at:
                    await s.compute(n / audio.SAMPLE_RATE * s.fate.point)
                    s.outcome = "failed"
                    await conn.abort_stream()
                await s.compute(n / audio.SAMPLE_RATE)
                await conn.send_data(wrap(await piece))
                offset += n
            if last is not None:
                await conn.send_data(last(len(chunks)))
            await conn.end_stream()


def main(argv=None):
    return run_main(OpenAITTSServer, "openai_tts", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
