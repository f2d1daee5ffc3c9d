"""One piece of text synthesized by one GPU server, in that server's own API,
as 24 kHz mono 16-bit PCM arriving as the server makes it (or, where an
OpenAI-style server declares the caller's format, that format untouched).

    openai      POST /v1/audio/speech {input, voice, response_format "wav"
                (or the declared one), speed, stream true, ...}; a WAV container is
                stripped on the fly, whatever its header says about size
    chatterbox  POST /synthesize-json {text, speech_rate, voice fields} ->
                JSON with audio_url; then GET audio_url from the same server,
                on the same slot (no other server has the file)
    chattts     POST /generate_voice {text: [piece], params_infer_code:
                {prompt "[speed_N]", manual_seed}} -> a zip; its first file
                is read as the zip arrives (WAV stripped, MP3 decoded)

A non-2xx answer is a BackendStatus (the proxy's rules decide what it
means); a broken connection or a timeout is backend_http's BackendFailure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Callable

import base64
import re

import orjson

from ..config_model import Voice
from .backend_http import BackendFailure, BackendResponse, request
from .translate import SAMPLE_RATE, clamp_speed
from .wav_stream import SampleAligner, WavError, WavStripper
from .zip_stream import ZipFirstEntry, ZipStreamError

MAX_JSON_ANSWER = 1 << 20
MAX_SSE_EVENT = 4 << 20          # one event's bytes (a delta of ~80 s of audio)
_EVENT_END = re.compile(rb"\r?\n\r?\n")
MAX_ERROR_TEXT = 300
# Documented input limits of the servers (tts-apis.md).
API_MAX_CHARS = {"chatterbox": 5000, "openai": 3000, "chattts": 2048}
CHATTERBOX_SPEED = (0.5, 2.0)   # speech_rate's range there


class BackendStatus(Exception):
    """The server answered, but not with audio."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Piece:
    """What one backend call must say, before any API's spelling."""
    text: str
    voice_name: str | None      # the caller's voice name (None: it gave none)
    voice: Voice | None         # what it maps to (None: each API's default)
    speed: float | None         # OpenAI's scale, 0.25-4.0
    fields: dict                # the caller's body (for an OpenAI-style server)
    native: str | None = None   # ask an OpenAI-style server for this format, pass it through


@dataclass(frozen=True)
class Timeouts:
    connect: float
    first_byte: float
    idle: float
    max_head: int


def applied_speed(api: str, speed: float | None) -> float | None:
    """The speed the server is asked for on OpenAI's scale (None: it cannot)."""
    if speed is None:
        return None
    if api == "chatterbox":
        return min(CHATTERBOX_SPEED[1], max(CHATTERBOX_SPEED[0], speed))
    if api == "chattts":
        return _chattts_speed(speed) / 5
    if api == "cartesia":
        return clamp_speed(speed)
    return speed


def _chattts_speed(speed: float) -> int:
    """ChatTTS's [speed_N] prompt, N 0-9, 5 its normal pace."""
    return min(9, max(0, round(speed * 5)))


async def synthesize(api: str, backend, piece: Piece, t: Timeouts,
                     answered: Callable[[int], None]) -> AsyncIterator[bytes]:
    """The piece's audio as it arrives; `answered(status)` once, at the first head."""
    if api == "chatterbox":
        source = _chatterbox(backend, piece, t, answered)
    elif api == "chattts":
        source = _chattts(backend, piece, t, answered)
    else:
        source = _openai(backend, piece, t, answered)
    async for chunk in source:
        yield chunk


async def _call(backend, path: str, body: dict, t: Timeouts) -> BackendResponse:
    return await request(backend, "POST", path, orjson.dumps(body), "application/json",
                         connect=t.connect, first_byte=t.first_byte, idle=t.idle,
                         max_head=t.max_head)


async def _refused(response: BackendResponse) -> BackendStatus:
    """What a non-2xx answer said, short."""
    try:
        text = (await response.read(MAX_JSON_ANSWER)).decode("utf-8", "replace")
    except BackendFailure:
        text = ""
    finally:
        response.close()
    try:
        doc = orjson.loads(text)
        detail = doc.get("detail") or doc.get("error", {}).get("message") or text
    except (orjson.JSONDecodeError, AttributeError):
        detail = text
    return BackendStatus(response.status, f"backend {response.name} answered "
                         f"{response.status}: {str(detail)[:MAX_ERROR_TEXT]}")


async def _openai(backend, piece: Piece, t: Timeouts, answered) -> AsyncIterator[bytes]:
    # The caller's model names OpenAI's (gpt-4o-mini-tts, tts-1): the server's
    # own default is what it has; its other fields go as they came.
    body = {k: v for k, v in piece.fields.items() if k not in ("stream_format", "model")}
    # Audio as it is made: Kokoro and ChatTTS's example stream on this flag;
    # servers that do not know it ignore it (travisvn's answers a whole file).
    body.setdefault("stream", True)
    body["input"] = piece.text
    voice = piece.voice.openai if piece.voice and piece.voice.openai else piece.voice_name
    if voice is not None:
        body["voice"] = voice
    declared = backend.cfg.formats
    body["response_format"] = piece.native or ("pcm" if "pcm" in declared else "wav")
    if "sse" in declared and not piece.native:
        # Its streaming form (travisvn's only one): PCM deltas as each chunk is made.
        body["stream_format"], body["response_format"] = "sse", "pcm"
    response = await _call(backend, "/v1/audio/speech", body, t)
    answered(response.status)
    if response.status // 100 != 2:
        raise await _refused(response)
    try:
        if piece.native:
            async for chunk in response.chunks():
                yield chunk
        elif response.content_type == "text/event-stream":
            async for chunk in _sse_pcm(response.name, response.chunks()):
                yield chunk
        elif response.content_type in ("audio/pcm", "audio/l16", "application/octet-stream"):
            async for chunk in _aligned(response.chunks()):
                yield chunk
        else:
            async for chunk in _strip_wav(response.name, response.chunks()):
                yield chunk
    finally:
        response.close()


async def _chatterbox(backend, piece: Piece, t: Timeouts, answered) -> AsyncIterator[bytes]:
    body: dict = dict(piece.voice.chatterbox) if piece.voice else {}
    body["text"] = piece.text
    speed = applied_speed("chatterbox", piece.speed)
    if speed is not None:
        body["speech_rate"] = speed
    response = await _call(backend, "/synthesize-json", body, t)
    answered(response.status)
    if response.status // 100 != 2:
        raise await _refused(response)
    try:
        answer = await response.read(MAX_JSON_ANSWER)
    finally:
        response.close()
    url = _audio_url(response.name, answer)
    audio = await request(backend, "GET", url, b"", "", connect=t.connect,
                          first_byte=t.first_byte, idle=t.idle, max_head=t.max_head)
    if audio.status // 100 != 2:   # its own file, just made: the server is at fault
        raise BackendFailure("bad_response", (await _refused(audio)).message)
    try:
        async for chunk in _strip_wav(audio.name, audio.chunks()):
            yield chunk
    finally:
        audio.close()


def _audio_url(name: str, answer: bytes) -> str:
    """The path of the audio_url in a Chatterbox JSON answer (its own server's)."""
    try:
        doc = orjson.loads(answer)
        url = doc["audio_url"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise BackendFailure("bad_response", f"backend {name} answered without an "
                             "audio_url") from None
    if not isinstance(url, str) or not url:
        raise BackendFailure("bad_response", f"backend {name} answered a bad audio_url")
    if "://" in url:    # absolute: the path on the same server is what is fetched
        url = "/" + url.split("://", 1)[1].partition("/")[2]
    if not url.startswith("/") or any(c in url for c in " \r\n"):
        raise BackendFailure("bad_response", f"backend {name} answered a bad audio_url")
    return url


async def _chattts(backend, piece: Piece, t: Timeouts, answered) -> AsyncIterator[bytes]:
    infer: dict = {"prompt": f"[speed_{_chattts_speed(piece.speed or 1.0)}]"}
    if piece.voice is not None and piece.voice.chattts is not None:
        infer["manual_seed"] = piece.voice.chattts
    body = {"text": [piece.text], "stream": False, "skip_refine_text": True,
            "params_infer_code": infer}
    response = await _call(backend, "/generate_voice", body, t)
    answered(response.status)
    if response.status // 100 != 2:
        raise await _refused(response)
    archive = ZipFirstEntry()
    decode = None
    try:
        async for chunk in response.chunks():
            try:
                data = archive.feed(chunk)
            except ZipStreamError as exc:
                raise BackendFailure("bad_response", f"backend {response.name}: {exc}") from None
            if decode is None and archive.name is not None:
                decode = _decoder_for(response.name, archive.name)
            if data:
                out = decode(data)
                if out:
                    yield out
            if archive.done:
                break
        try:
            archive.finish()
        except ZipStreamError as exc:
            raise BackendFailure("bad_response", f"backend {response.name}: {exc}") from None
        tail = decode(None) if decode is not None else b""
        if tail:
            yield tail
    finally:
        response.close()


def _decoder_for(name: str, entry: str) -> Callable[[bytes | None], bytes]:
    """PCM from a zip entry's bytes (None: the end): WAV stripped, MP3 decoded."""
    if entry.lower().endswith(".mp3"):
        from .encoders import StreamDecoder   # FFmpeg: loaded only where it is needed
        decoder = StreamDecoder("mp3")
        return lambda data: decoder.finish() if data is None else decoder.feed(data)
    stripper = WavStripper()

    def strip(data: bytes | None) -> bytes:
        try:
            if data is None:
                stripper.finish()
                return b""
            return _as_expected(name, stripper, stripper.feed(data))
        except WavError as exc:
            raise BackendFailure("bad_response", f"backend {name}: {exc}") from None
    return strip


def _as_expected(name: str, stripper: WavStripper, pcm: bytes) -> bytes:
    """`pcm`, once the header said 24 kHz mono (what every answer here is made of)."""
    if stripper.format_known and (stripper.sample_rate, stripper.channels) != (SAMPLE_RATE, 1):
        raise BackendFailure("bad_response", f"backend {name} sent {stripper.sample_rate} Hz, "
                             f"{stripper.channels}-channel audio; 24000 Hz mono is expected")
    return pcm


async def _strip_wav(name: str, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    stripper = WavStripper()
    try:
        async for chunk in chunks:
            pcm = _as_expected(name, stripper, stripper.feed(chunk))
            if pcm:
                yield pcm
        stripper.finish()
    except WavError as exc:
        raise BackendFailure("bad_response", f"backend {name} sent audio that is not "
                             f"24 kHz 16-bit WAV: {exc}") from None


async def _aligned(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    aligner = SampleAligner()
    async for chunk in chunks:
        pcm = aligner.feed(chunk)
        if pcm:
            yield pcm


async def _sse_pcm(name: str, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The PCM of an OpenAI-style SSE answer: each speech.audio.delta's base64
    `audio` (or `delta`), as the events arrive; other events are skipped."""
    aligner = SampleAligner()
    pending = b""
    async for chunk in chunks:
        pending += chunk
        if len(pending) > MAX_SSE_EVENT:
            raise BackendFailure("bad_response", f"backend {name} sent an SSE event over "
                                 f"{MAX_SSE_EVENT} bytes")
        *events, pending = _EVENT_END.split(pending)
        for event in events:
            for line in event.splitlines():
                if not line.startswith(b"data:"):
                    continue
                try:
                    doc = orjson.loads(line[5:])
                    audio = (base64.b64decode(doc.get("audio") or doc.get("delta") or "")
                             if doc.get("type") == "speech.audio.delta" else b"")
                except (orjson.JSONDecodeError, AttributeError, ValueError, TypeError):
                    raise BackendFailure("bad_response", f"backend {name} sent an SSE "
                                         "event that is not speech JSON") from None
                pcm = aligner.feed(audio)
                if pcm:
                    yield pcm
