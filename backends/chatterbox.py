"""Simulated Chatterbox GPU server, as deployed behind the original port-6095 balancer.

Faithful to crogers2287/chatterbox api_server_fast.py (FastAPI), on the simulated GPU of
backends/gpu.py.  Run: python -m backends.chatterbox --port 0 [--slots N --rtf R ...]

  GET  /                 {"message": "Chatterbox TTS API Server (Fast Edition)", ...}
  GET  /health           200 {"status":"healthy","gpu_available":true,"gpu_name":...,
                         "gpu_memory_total":24.0,"gpu_memory_allocated":...,"model_loaded":true,
                         "optimized_inference":true}.  While the model loads (start-up, after a
                         crash): 503 {"detail":"Model not loaded","status":"loading",
                         "model_loaded":false} (--loading-health 503, the default), or 200 with
                         "model_loaded": false (--loading-health 200, what the real
                         HealthResponse would say).
  POST /synthesize-json  JSON {"text" (required, <= 5000 chars), "exaggeration" 0.5 [0.1-2],
                         "temperature" 0.8 [0.05-5], "cfg_weight" 0.5 [0-1], "min_p" 0.05 [0-1],
                         "top_p" 1.0 [0-1], "repetition_penalty" 1.2 [1-2], "seed" null,
                         "speech_rate" 1.0 [0.5-2]}; a bad body: 422 {"detail": [...]}.
  POST /synthesize       the same fields as a form (multipart or urlencoded) plus an optional
                         `audio_prompt` file.  As in the real code, only the form types are
                         checked up front (422); the ranges are checked inside the handler's
                         try block, so an out-of-range value answers
                         500 {"detail": "Synthesis failed: 1 validation error for TTSRequest..."}.
    Both answer, after the GPU time: 200 {"success":true,"message":"Speech synthesized
    successfully","audio_url":"/audio/<uuid>.wav","duration":D,"sample_rate":24000,
    "parameters":{...all nine fields...},"inference_speed":len(text)*5/seconds (the real
    estimate)}; 503 {"detail":"Model not loaded"} while loading; 500 {"detail":"Synthesis
    failed: simulated"} for a --fail-rate failure.  speech_rate is accepted but, as in the real
    server, does not change the audio.
  GET  /audio/<name>     the WAV made by THIS server (audio/wav, Content-Length); any other name,
                         one from another server or one expired: 404 {"detail":"Audio file not
                         found"}.  The WAV says the text (espeak-ng, see speech.py) or is the
                         tone (--tone, or no espeak-ng).  Files live in memory (as text and
                         sample count: the samples are made again, identically, on each GET)
                         for --audio-ttl seconds (3600), at most --audio-max-files (newest
                         kept); they survive a crash, like the real server's files in /tmp.
                         Not subject to the fault rates.
Plus the simulator's /_stats, /_stats/reset, /_mode, /_crash (see simserver).
"""
from __future__ import annotations

import argparse
import asyncio
import re
import sys
import uuid
from collections import OrderedDict

import orjson

from . import audio
from .forms import FormError, parse_form
from .schema import Field, Invalid, json_body, pydantic_summary, validate
from .simserver import HTTPError, SimServer, SynthFailed, run_main

MAX_JSON = 1 << 20
MAX_FORM = 32 << 20
TOKENS_PER_CHAR = 5   # api_server_fast.py: estimated_tokens = len(request.text) * 5

TTS_REQUEST = {
    "text": Field("str", max_length=5000),
    "exaggeration": Field("float", 0.5, ge=0.1, le=2.0),
    "temperature": Field("float", 0.8, ge=0.05, le=5.0),
    "cfg_weight": Field("float", 0.5, ge=0.0, le=1.0),
    "min_p": Field("float", 0.05, ge=0.0, le=1.0),
    "top_p": Field("float", 1.0, ge=0.0, le=1.0),
    "repetition_penalty": Field("float", 1.2, ge=1.0, le=2.0),
    "seed": Field("int", None, optional=True),
    "speech_rate": Field("float", 1.0, ge=0.5, le=2.0),
}
# /synthesize's Form(...) parameters: types only; the ranges come later, from TTSRequest.
FORM_FIELDS = {name: Field(f.kind, f.default, optional=f.optional)
               for name, f in TTS_REQUEST.items()}


class AudioStore:
    """name -> (sample count, text), oldest first; bounded in count and age."""

    def __init__(self, ttl: float = 3600.0, max_files: int = 1000):
        self.ttl, self.max_files = ttl, max_files
        self.files: OrderedDict[str, tuple[tuple[int, str], float]] = OrderedDict()

    def _expire(self, now: float):
        while self.files:
            name, (_, expires) = next(iter(self.files.items()))
            if expires > now:
                break
            del self.files[name]

    def add(self, name: str, n_samples: int, text: str, now: float):
        self._expire(now)
        self.files[name] = ((n_samples, text), now + self.ttl)
        while len(self.files) > self.max_files:
            self.files.popitem(last=False)

    def get(self, name: str, now: float) -> tuple[int, str] | None:
        self._expire(now)
        entry = self.files.get(name)
        return None if entry is None else entry[0]


class ChatterboxServer(SimServer):
    kind = "chatterbox"
    ROUTES = [
        ("GET", "/", "h_root"),
        ("GET", "/health", "h_health"),
        ("POST", "/synthesize-json", "h_synthesize_json"),
        ("POST", "/synthesize", "h_synthesize_form"),
        ("GET", re.compile(r"/audio/(?P<filename>[^/]+)"), "h_audio"),
    ]
    GPU_NAME = "NVIDIA GeForce RTX 3090 (simulated)"

    def __init__(self, gpu=None, keepalive=5.0, *, loading_health: int = 503,
                 audio_ttl: float = 3600.0, audio_max_files: int = 1000):
        super().__init__(gpu, keepalive)
        self.loading_health = loading_health
        self.files = AudioStore(audio_ttl, audio_max_files)

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("chatterbox")
        g.add_argument("--loading-health", type=int, choices=(503, 200), default=503,
                       help="/health while loading: 503 Model not loaded, or 200 with "
                            "model_loaded false (default 503)")
        g.add_argument("--audio-ttl", type=float, default=3600.0, metavar="S",
                       help="seconds a made file stays fetchable (default 3600)")
        g.add_argument("--audio-max-files", type=int, default=1000, metavar="N",
                       help="files kept at most, newest first (default 1000)")

    @classmethod
    def from_args(cls, opts, args):
        if args.audio_ttl <= 0 or args.audio_max_files < 1:
            raise ValueError("--audio-ttl must be > 0 and --audio-max-files >= 1")
        return cls(opts, args.keepalive, loading_health=args.loading_health,
                   audio_ttl=args.audio_ttl, audio_max_files=args.audio_max_files)

    # --- endpoints ----------------------------------------------------------------------------

    async def h_root(self, conn, req):
        await conn.respond_json(200, {"message": "Chatterbox TTS API Server (Fast Edition)",
                                      "version": "2.0.0", "inference_speed": "120+ it/s",
                                      "docs": "/docs", "health": "/health"})

    async def h_health(self, conn, req):
        await conn.read_body()
        if self.ready:
            return await conn.respond_json(200, self.health_body(True))
        if self.loading_health == 503:
            return await conn.respond_json(503, {"detail": "Model not loaded",
                                                 "status": "loading", "model_loaded": False})
        await conn.respond_json(200, self.health_body(False))

    def health_body(self, loaded: bool) -> dict:
        return {"status": "healthy", "gpu_available": True, "gpu_name": self.GPU_NAME,
                "gpu_memory_total": 24.0,
                "gpu_memory_allocated": round(3.1 + 1.2 * len(self.gpu.jobs), 2) if loaded else 0.4,
                "model_loaded": loaded, "optimized_inference": loaded}

    async def h_synthesize_json(self, conn, req):
        body = await conn.read_body(MAX_JSON)
        try:
            params = validate(TTS_REQUEST, json_body(body))
        except Invalid as e:
            raise HTTPError(422, e.body()) from None
        self.check_ready()
        await self.synthesize(conn, params)

    async def h_synthesize_form(self, conn, req):
        body = await conn.read_body(MAX_FORM)
        try:
            form = parse_form(req.header("content-type"), body)
        except FormError:
            raise HTTPError(400, {"detail": "There was an error parsing the body"}) from None
        values = {}
        for name, part in form.items():
            if name == "audio_prompt":
                continue
            if part.filename is not None:
                continue  # a file where a field belongs: FastAPI sees the field as missing
            if part.text == "" and name != "text":
                continue  # FastAPI reads an empty form value as "not given"
            values[name] = part.text
        errors = []
        try:
            values = validate(FORM_FIELDS, values)
        except Invalid as e:
            errors = e.errors
        prompt = form.get("audio_prompt")
        if prompt is not None and prompt.filename is None and prompt.data:
            errors.append({"type": "value_error", "loc": ["body", "audio_prompt"],
                           "msg": "Value error, Expected UploadFile, received: <class 'str'>",
                           "input": prompt.text, "ctx": {"error": {}}})
        if errors:
            raise HTTPError(422, {"detail": errors})
        self.check_ready()
        try:  # TTSRequest(...) inside the handler's `try`: a range error is a 500
            params = validate(TTS_REQUEST, values)
        except Invalid as e:
            raise HTTPError(500, {"detail": "Synthesis failed: " +
                                  pydantic_summary(e.errors, "TTSRequest")}) from None
        await self.synthesize(conn, params)

    async def synthesize(self, conn, params: dict):
        text = params["text"]
        n = audio.samples_for_text(text, self.opts.chars_per_second)
        async with self.synthesis(conn) as s:
            try:
                await s.whole(n / audio.SAMPLE_RATE)
            except SynthFailed:
                raise HTTPError(500, {"detail": "Synthesis failed: simulated"}) from None
            t3 = s.job.compute_time
            name = f"{uuid.uuid4()}.wav"
            self.files.add(name, n, text, asyncio.get_running_loop().time())
            body = orjson.dumps({
                "success": True, "message": "Speech synthesized successfully",
                "audio_url": f"/audio/{name}", "duration": n / audio.SAMPLE_RATE,
                "sample_rate": audio.SAMPLE_RATE, "parameters": params,
                "inference_speed": len(text) * TOKENS_PER_CHAR / t3 if t3 > 0 else 0})
            await s.send_whole(200, body, [("content-type", "application/json")])

    async def h_audio(self, conn, req, filename: str):
        await conn.read_body()
        entry = self.files.get(filename, asyncio.get_running_loop().time())
        if entry is None:
            raise HTTPError(404, {"detail": "Audio file not found"})
        n, text = entry
        samples = await conn.guard(self.renderer.start(text, n))
        await conn.respond(200, audio.wav_header(len(samples)) + samples, "audio/wav",
                           [("content-disposition", f'attachment; filename="{filename}"'),
                            ("cache-control", "no-cache")])


def main(argv=None):
    return run_main(ChatterboxServer, "chatterbox", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
