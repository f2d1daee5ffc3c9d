"""Serve a TTS call from Cartesia, in the shape the caller expects.

The local fleet could not serve the call (see exchange.py for when).  Here
the call, already read by `translate.read_call`, becomes one Cartesia
request per text, and Cartesia's audio goes back as:

    WAV            Cartesia's WAV, streamed through as it arrives
    WAV_STREAM     an "unknown size" WAV header, then the PCM as it arrives
    SSE            speech.audio.info, speech.audio.delta events (base64 PCM),
                   then speech.audio.done
    CHATTERBOX_JSON  Chatterbox's JSON; the WAV is kept by the balancer and
                   served at the JSON's audio_url
    ZIP            one WAV a text item (as ChatTTS returns one file an item)

Where the caller gets a whole file (JSON, zip) the balancer asks for raw PCM
and writes the WAV header itself, with true sizes.
"""

from __future__ import annotations

import base64
import io
import time
import uuid
import zipfile
from contextlib import aclosing
from typing import Protocol

import orjson

from . import translate as tr
from .cartesia import CartesiaClient, CartesiaError
from .speech_output import event as sse_event
from .wav_stream import pcm_to_wav_header
from ..config_model import Cartesia
from ..scheduling.expiring import ExpiringMap

BYTES_PER_SECOND = tr.SAMPLE_RATE * 2          # 16-bit mono
MAX_BUFFERED_AUDIO = 32 * 1024 * 1024          # a whole-file answer kept in memory (~11 min)
FALLBACK_HEADER = (b"x-tts-fallback", b"cartesia")
FALLBACK_FAILED = "failed"   # why a call went there: its last attempt failed with no response


class Output(Protocol):
    """Where the answer goes (the exchange, which owns the client connection)."""
    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...
    def data(self, chunk: bytes) -> None: ...
    async def drained(self) -> None: ...


def wav_header(data_bytes: int | None) -> bytes:
    """A 44-byte WAV header for 24 kHz mono 16-bit PCM; None: the streaming
    form with sizes set to "unknown", as the OpenAI-style servers send."""
    return pcm_to_wav_header(tr.SAMPLE_RATE, 1, data_bytes)


class Fallback:
    def __init__(self, cfg: Cartesia, client: CartesiaClient, audio: ExpiringMap[bytes]):
        self.cfg = cfg
        self.client = client
        self.audio = audio

    async def answer(self, call: tr.Synthesis, out: Output) -> int:
        """Write the answer to `out` (head and body, not the end); returns the
        status.  Raises CartesiaError: before out.head() the caller can still
        answer an error; after it, the response must be cut."""
        deadline = time.monotonic() + self.cfg.timeout
        shape = call.shape
        if shape == tr.WAV:
            await self._stream(call, out, deadline, b"audio/wav", lambda chunk: chunk)
        elif shape == tr.WAV_STREAM:
            await self._stream(call, out, deadline, b"audio/wav", lambda chunk: chunk,
                               preamble=wav_header(None))
        elif shape == tr.SSE:
            await self._sse(call, out, deadline)
        elif shape == tr.CHATTERBOX_JSON:
            await self._chatterbox(call, out, deadline)
        else:
            await self._zip(call, out, deadline)
        return 200

    def _request(self, call: tr.Synthesis, text: str) -> bytes:
        return tr.cartesia_request(call, text, model_id=self.cfg.model_id,
                                   language=self.cfg.language,
                                   voice_id=tr.voice_id(self.cfg.voices, call.voice),
                                   container=tr.container_for(call.shape))

    async def _stream(self, call, out: Output, deadline: float, content_type: bytes,
                      frame, preamble: bytes = b"") -> None:
        text = call.texts[0]
        started = False
        async with aclosing(self.client.stream(self._request(call, text), len(text),
                                               deadline)) as audio:
            async for chunk in audio:
                if not started:
                    started = True
                    out.head(200, [(b"content-type", content_type), FALLBACK_HEADER])
                    if preamble:
                        out.data(preamble)
                out.data(frame(chunk))
                await out.drained()
        if not started:   # Cartesia answered 200 with no audio at all
            out.head(200, [(b"content-type", content_type), FALLBACK_HEADER])
            if preamble:
                out.data(preamble)

    async def _sse(self, call, out: Output, deadline: float) -> None:
        carry = b""   # an odd byte waits for its pair: each event holds whole samples

        def event(chunk: bytes) -> bytes:
            nonlocal carry
            pcm = carry + chunk
            whole = len(pcm) - len(pcm) % 2
            carry = pcm[whole:]
            return sse_event({"type": "speech.audio.delta",
                               "audio": base64.b64encode(pcm[:whole]).decode("ascii")})

        info = sse_event({"type": "speech.audio.info", "sample_rate": tr.SAMPLE_RATE,
                           "channels": 1, "bits_per_sample": 16})
        await self._stream(call, out, deadline, b"text/event-stream", event, preamble=info)
        out.data(sse_event({"type": "speech.audio.done",
                             "usage": {"input_characters": call.characters}}))

    async def _pcm(self, call, text: str, deadline: float) -> bytes:
        pcm = bytearray()
        async with aclosing(self.client.stream(self._request(call, text), len(text),
                                               deadline)) as audio:
            async for chunk in audio:
                pcm += chunk
                if len(pcm) > MAX_BUFFERED_AUDIO:
                    raise CartesiaError(0, f"Cartesia audio passed {MAX_BUFFERED_AUDIO} bytes, "
                                        "more than a whole-file answer may hold")
        return bytes(pcm[:len(pcm) - len(pcm) % 2])

    async def _chatterbox(self, call, out: Output, deadline: float) -> None:
        started = time.monotonic()
        pcm = await self._pcm(call, call.texts[0], deadline)
        url = f"/audio/{uuid.uuid4()}.wav"
        self.audio.put(url.encode("ascii"), wav_header(len(pcm)) + pcm)
        body = orjson.dumps({
            "success": True,
            "message": "Speech synthesized by the Cartesia fallback",
            "audio_url": url,
            "duration": round(len(pcm) / BYTES_PER_SECOND, 3),
            "sample_rate": tr.SAMPLE_RATE,
            "parameters": call.parameters,
            "inference_speed": None,
            "synthesis_time": round(time.monotonic() - started, 3),
        })
        out.head(200, [(b"content-type", b"application/json"),
                       (b"content-length", str(len(body)).encode("ascii")), FALLBACK_HEADER])
        out.data(body)

    async def _zip(self, call, out: Output, deadline: float) -> None:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for i, text in enumerate(call.texts):
                pcm = await self._pcm(call, text, deadline)
                archive.writestr(f"{i}.wav", wav_header(len(pcm)) + pcm)
        body = buffer.getvalue()
        out.head(200, [(b"content-type", b"application/zip"),
                       (b"content-length", str(len(body)).encode("ascii")), FALLBACK_HEADER])
        out.data(body)
