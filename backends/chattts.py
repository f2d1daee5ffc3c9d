"""Simulated ChatTTS GPU server (2noise/ChatTTS examples/api/main.py).

On the simulated GPU of backends/gpu.py.  Run: python -m backends.chattts --port 0 [...]

  POST /generate_voice  JSON: "text" (required: a list of strings), "stream" false, "lang" null,
        "skip_refine_text" false, "refine_text_only" false, "use_decoder" true,
        "do_text_normalization" true, "do_homophone_replacement" false,
        "params_refine_text" (optional object), "params_infer_code" (required object; its
        fields, all optional: "prompt" "[speed_5]", "temperature" 0.3, "top_P" 0.7, "top_K" 20,
        "repetition_penalty" 1.05, "max_new_token" 2048, "manual_seed" null, ...).
        A bad body: 422 {"detail": [...]}.
        -> 200 application/zip (Content-Disposition: attachment; filename=audio_files.zip,
        sent chunked as Starlette's StreamingResponse does) holding one entry per text item.
        The real server writes MP3 ("0.mp3", "1.mp3", ...); this simulator has no MP3 encoder,
        so its entries are WAV files and are named honestly "0.wav", "1.wav", ... (24 kHz mono
        16-bit, each as long as its text at --chars-per-second and saying it with espeak-ng,
        or the tone: see speech.py).  "stream", "[speed_N]" and text refinement do not
        change the result.
        While loading: 503 {"detail": "Model not loaded"}.  A --fail-rate failure: 500
        text/plain "Internal Server Error" (an exception escaping a FastAPI handler).
  GET  /health  200 {"status": "healthy", "model_loaded": true} (as in ChatTTS's OpenAI-style
        example; main.py itself has none); while loading 503 {"status": "loading",
        "model_loaded": false}.

Requests are served one at a time behind a lock, as the real server is (its handler runs the
model synchronously); --slots N admits N at once.  Waiting for the lock uses no GPU time and
no GPU memory; a client that leaves while it waits is dropped from the queue.
Plus the simulator's /_stats, /_stats/reset, /_mode, /_crash (see simserver).
"""
from __future__ import annotations

import asyncio
import io
import sys
import zipfile

from . import audio
from .schema import Field, Invalid, json_body, validate
from .simserver import HTTPError, SimServer, SynthFailed, run_main

MAX_JSON = 4 << 20

INFER_CODE = {
    "prompt": Field("str", "[speed_5]"),
    "top_P": Field("float", 0.7),
    "top_K": Field("int", 20),
    "temperature": Field("float", 0.3),
    "repetition_penalty": Field("float", 1.05),
    "max_new_token": Field("int", 2048),
    "min_new_token": Field("int", 0),
    "show_tqdm": Field("bool", True),
    "ensure_non_empty": Field("bool", True),
    "manual_seed": Field("int", None, optional=True),
    "stream_batch": Field("int", 24),
    "stream_speed": Field("int", 12000),
    "pass_first_n_batches": Field("int", 2),
    "spk_emb": Field("str", None, optional=True),
}
REFINE_TEXT = {
    "prompt": Field("str", ""),
    "top_P": Field("float", 0.7),
    "top_K": Field("int", 20),
    "temperature": Field("float", 0.7),
    "repetition_penalty": Field("float", 1.0),
    "max_new_token": Field("int", 384),
    "min_new_token": Field("int", 0),
    "show_tqdm": Field("bool", True),
    "ensure_non_empty": Field("bool", True),
    "manual_seed": Field("int", None, optional=True),
}
CHATTTS_PARAMS = {
    "text": Field("list[str]"),
    "stream": Field("bool", False),
    "lang": Field("str", None, optional=True),
    "skip_refine_text": Field("bool", False),
    "refine_text_only": Field("bool", False),
    "use_decoder": Field("bool", True),
    "do_text_normalization": Field("bool", True),
    "do_homophone_replacement": Field("bool", False),
    "params_refine_text": Field(REFINE_TEXT, None, optional=True, class_name="RefineTextParams"),
    "params_infer_code": Field(INFER_CODE, class_name="InferCodeParams"),
}


def make_zip(pieces: list[bytes]) -> bytes:
    """A zip of one WAV per piece of s16le samples: 0.wav, 1.wav, ..."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for i, samples in enumerate(pieces):
            z.writestr(f"{i}.wav", audio.wav_header(len(samples)) + samples)
    return buf.getvalue()


class ChatTTSServer(SimServer):
    kind = "chattts"
    ROUTES = [("POST", "/generate_voice", "h_generate_voice"), ("GET", "/health", "h_health")]
    GPU_DEFAULTS = {"slots": 1}

    def __init__(self, gpu=None, keepalive=5.0):
        super().__init__(gpu, keepalive)
        self.lock = asyncio.Semaphore(self.opts.slots)

    async def h_health(self, conn, req):
        await conn.read_body()
        if self.ready:
            return await conn.respond_json(200, {"status": "healthy", "model_loaded": True})
        await conn.respond_json(503, {"status": "loading", "model_loaded": False})

    async def h_generate_voice(self, conn, req):
        body = await conn.read_body(MAX_JSON)
        try:
            params = validate(CHATTTS_PARAMS, json_body(body))
        except Invalid as e:
            raise HTTPError(422, e.body()) from None
        self.check_ready()
        cps = self.opts.chars_per_second
        counts = [audio.samples_for_text(t, cps) for t in params["text"]]
        async with self.synthesis(conn) as s:
            pieces = [s.render(text, n) for text, n in zip(params["text"], counts)]
            try:
                await s.whole(sum(counts) / audio.SAMPLE_RATE)
            except SynthFailed:
                raise HTTPError(500, b"Internal Server Error", ctype="text/plain; charset=utf-8") \
                    from None
            await s.send_whole(200, make_zip([await p for p in pieces]), [
                ("content-type", "application/zip"),
                ("content-disposition", "attachment; filename=audio_files.zip")], chunked=True)


def main(argv=None):
    return run_main(ChatTTSServer, "chattts", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
