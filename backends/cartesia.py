"""A fake Cartesia TTS API (tts-lb's cloud fallback) that checks what the real one checks.

Run it:     python -m backends.cartesia --port N [--host 127.0.0.1] [--port-file PATH]
                [--api-key KEY | --api-key-env NAME] [--concurrency N]
                [--tls-cert FILE --tls-key FILE] [--chars-per-second F] [--rtf F]
                [--wav-sizes exact|unknown]
            (prints "listening on 127.0.0.1:PORT", plus " (https)" when serving TLS; exits 0 on
            SIGTERM/SIGINT.  With neither key option the key comes from $CARTESIA_API_KEY; prefer
            --api-key-env, which keeps the key out of `ps`.)
In-process: fake = FakeCartesia(api_key="k", concurrency=2, ssl=ctx); await fake.start(host, 0);
            fake.port, fake.stats, fake.requests; await fake.stop().
            From synchronous code: `with CartesiaThread(api_key="k") as c: c.port`.

Endpoints (facts from /work/shared/reference/tts-apis.md, docs.cartesia.ai and the SDKs):
  POST /tts/bytes   JSON {model_id, transcript, voice:{mode:"id", id:UUID}, language?,
                    output_format:{container raw|wav|mp3, encoding, sample_rate[, bit_rate]},
                    generation_config?:{speed 0.6-1.5, volume 0.5-2.0, emotion}, duration?}.
                    200: the audio, chunked, as it is "generated" (a 440 Hz tone).
  POST /tts/sse     same body, container raw only; text/event-stream of
                    data: {"type":"chunk","data":"<base64>","done":false,"status_code":206}
                    ... then data: {"type":"done","done":true,"status_code":200}
  GET /             {"ok":true,"version":"2026-03-01"}, no key needed (a reachability probe)
  GET /_requests    every /tts/* request so far (the newest 10000): method, path, headers (key values replaced by
                    a marker saying whether they matched), auth verdict, version, parsed body,
                    status, completed, audio_bytes.  The key never appears anywhere in it.
  GET /_stats       {"requests", "in_flight", "max_in_flight", "by_status", "characters_billed",
                    "probes", "concurrency"}      GET /_reset  forgets the log and the counters.
  (/_* paths need no key and are never logged or counted.)

Checks, in this order, on /tts/*:  405 for a method other than POST;
  Cartesia-Version: missing, not a YYYY-MM-DD date, or older than 2024-06-10 -> 400;
  key: versions >= 2025-04-16 want "Authorization: Bearer KEY", older ones "X-API-Key: KEY";
       missing or wrong -> 401 (the other header, even with the right key, does not count);
  concurrency: more than N TTS requests at once -> 429 "concurrency_limited" (0: no limit);
  body: > 1 MiB -> 413; not JSON / invalid -> 400 (the SDK documents 400 for an empty
       transcript and for a null output_format, so every validation failure is 400; a retired
       model is 400 with error_code "model_sunsetted", the body Cartesia documents for it).
Error bodies: Cartesia-Version >= 2026-03-01 gets JSON {"error_code", "title", "message",
  "request_id"} (error_code is null unless Cartesia documents one: concurrency_limited,
  model_sunsetted); older versions, and requests whose version header is missing or unusable,
  get text/plain "Title: Message".

Audio: duration = len(transcript) / chars_per_second / speed (capped by "duration"); the
  generation of t seconds of audio takes rtf * t seconds, sent in 0.1 s pieces.  Billing: the
  transcript's characters are billed when the 200 head is sent.
  wav: the fake knows the length before it sends the first byte, so by default (wav_sizes
       "exact") the RIFF and data sizes are exact - streamed, yet parseable by `wave`.
       wav_sizes="unknown" writes 0xFFFFFFFF placeholders instead, as streaming servers that do
       not know the length do (OpenAI, ffmpeg pipes), to test clients that must cope with that.
       s16le is WAVE_FORMAT_PCM (1); f32le (3), alaw (6) and mulaw (7) get the 18-byte fmt chunk
       and the fact chunk that non-PCM WAVs require.
  mp3: silent MPEG Layer III frames (see mp3_silent_frame), not a 400: the fallback may be asked
       for mp3, no encoder is available, and valid all-zero frames cost a few lines.  As in the
       real API, mp3 takes sample_rate and bit_rate (no encoding).
"""
from __future__ import annotations

import argparse, asyncio, base64, datetime, hmac, math, os, re, ssl as _ssl, struct, sys, uuid
from array import array
from functools import lru_cache
from urllib.parse import urlsplit

import h11
import orjson

from .plumbing import Conn, Done, Server, ServerThread, cli_parser, serve_until_signal

API_VERSIONS = ("2024-06-10", "2024-11-13", "2025-04-16", "2026-03-01")
BEARER_SINCE = "2025-04-16"       # from this version on: Authorization: Bearer <key>
JSON_ERRORS_SINCE = "2026-03-01"  # from this version on: structured JSON errors
MODELS = frozenset({"sonic-3", "sonic-3.5", "sonic-latest", "sonic-3-latest"})
MODEL_SNAPSHOT = re.compile(r"sonic-3(\.5)?-\d{4}-\d{2}-\d{2}\Z")  # dated snapshots
# Retired on 2026-06-01 (tts-apis.md): sonic, sonic-english, sonic-multilingual, sonic-2*, sonic-turbo*
RETIRED = re.compile(r"sonic(-english|-multilingual|-2(-.+)?|-turbo(-.+)?)?\Z")
ENCODINGS = {"pcm_s16le": 2, "pcm_f32le": 4, "pcm_mulaw": 1, "pcm_alaw": 1}  # bytes per sample
SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
CONTAINERS = ("raw", "wav", "mp3")
CONTENT_TYPES = {"raw": "application/octet-stream", "wav": "audio/wav", "mp3": "audio/mpeg"}
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
LANGUAGE_RE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})?\Z")
SPEED_RANGE, VOLUME_RANGE = (0.6, 1.5), (0.5, 2.0)

TONE_HZ = 440            # integer Hz: one second of samples repeats seamlessly
TONE_AMPLITUDE = 0.25    # times generation_config.volume (<= 2.0), so never clips
PIECE_SECONDS = 0.1      # audio per streamed piece
MAX_BODY = 1 << 20
MAX_LOG = 10_000          # /_requests keeps the newest entries only
WAIT_MAX = 3600.0        # no wait here is unbounded


class ApiError(Exception):
    """An error answer.  `version` (a parsed Cartesia-Version, or None) picks the body format."""

    def __init__(self, status: int, title: str, message: str, code: str | None = None):
        super().__init__(f"{status} {title}: {message}")
        self.status, self.title, self.message, self.code = status, title, message, code

    def render(self, version: str | None, request_id: str) -> tuple[str, bytes]:
        if version is not None and version >= JSON_ERRORS_SINCE:
            return "application/json", orjson.dumps({
                "error_code": self.code, "title": self.title, "message": self.message,
                "request_id": request_id})
        return "text/plain; charset=utf-8", f"{self.title}: {self.message}".encode()


def bad_request(message: str, code: str | None = None, title: str = "Bad Request") -> ApiError:
    return ApiError(400, title, message, code)


# --- request checks

def parse_version(value: str | None) -> str:
    if value is None:
        raise bad_request("Missing Cartesia-Version header; send the date you tested your "
                          "integration, e.g. Cartesia-Version: 2026-03-01")
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            raise ValueError
        datetime.date.fromisoformat(value)
    except ValueError:
        raise bad_request(f"Invalid Cartesia-Version {value!r}: want a date, YYYY-MM-DD") from None
    if value < API_VERSIONS[0]:
        raise bad_request(f"Unsupported Cartesia-Version {value}: the oldest is {API_VERSIONS[0]}")
    return value


def check_key(expected: str, version: str, bearer: str | None, x_api_key: str | None) -> str:
    """The auth verdict: "ok", "missing", "wrong_key" or "wrong_scheme"."""
    if version >= BEARER_SINCE:
        if bearer is None:
            return "wrong_scheme" if x_api_key is not None else "missing"
        return "ok" if _same(bearer, expected) else "wrong_key"
    if x_api_key is None:
        return "wrong_scheme" if bearer is not None else "missing"
    return "ok" if _same(x_api_key, expected) else "wrong_key"


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


def _bearer(value: str | None) -> str | None:
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


AUTH_MESSAGES = {
    "missing": "No API key. Send {how}.",
    "wrong_key": "Invalid API key.",
    "wrong_scheme": "This Cartesia-Version authenticates with {how}.",
}


def _number(obj: dict, name: str, lo: float, hi: float, where: str) -> float | None:
    v = obj.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise bad_request(f"{where}.{name} must be a number from {lo} to {hi}, got {v!r}")
    return float(v)


class TTSRequest:
    """A validated /tts/bytes or /tts/sse body."""

    def __init__(self, body, sse: bool):
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object")
        model = body.get("model_id")
        if not isinstance(model, str) or not model:
            raise bad_request("model_id is required (a string such as \"sonic-3\")")
        if RETIRED.match(model):
            raise bad_request("The requested model has been sunsetted and is no longer available.",
                              "model_sunsetted", "Model sunsetted")
        if model not in MODELS and not MODEL_SNAPSHOT.match(model):
            raise bad_request(f"Unknown model_id {model!r}; use sonic-3, sonic-3.5 or sonic-latest")
        transcript = body.get("transcript")
        if not isinstance(transcript, str) or not transcript.strip():
            raise bad_request("transcript is required and must be a non-empty string")
        voice = body.get("voice")
        if not isinstance(voice, dict):
            raise bad_request("voice is required: {\"mode\": \"id\", \"id\": \"<voice UUID>\"}")
        if voice.get("mode") != "id":
            raise bad_request(f"voice.mode must be \"id\", got {voice.get('mode')!r} (voice "
                              "embeddings are no longer accepted)")
        if not isinstance(voice.get("id"), str) or not UUID_RE.match(voice["id"]):
            raise bad_request(f"voice.id must be a voice UUID, got {voice.get('id')!r}")
        language = body.get("language")
        if language is not None and (not isinstance(language, str) or not LANGUAGE_RE.match(language)):
            raise bad_request(f"language must be a language code such as \"en\", got {language!r}")
        fmt = body.get("output_format")
        if not isinstance(fmt, dict):
            raise bad_request("output_format is required: {container, encoding, sample_rate}")
        container = fmt.get("container")
        if container not in CONTAINERS:
            raise bad_request(f"output_format.container must be one of {', '.join(CONTAINERS)}, "
                              f"got {container!r}")
        if sse and container != "raw":
            raise bad_request("The SSE endpoint only supports output_format.container \"raw\"")
        rate = fmt.get("sample_rate")
        if isinstance(rate, bool) or rate not in SAMPLE_RATES:
            raise bad_request(f"output_format.sample_rate must be one of "
                              f"{', '.join(map(str, SAMPLE_RATES))}, got {rate!r}")
        encoding = fmt.get("encoding")
        bit_rate = fmt.get("bit_rate")
        if container == "mp3":  # the SDKs' Mp3OutputFormat: sample_rate and bit_rate
            if isinstance(bit_rate, bool) or not isinstance(bit_rate, int) or not 8000 <= bit_rate <= 320000:
                raise bad_request(f"output_format.bit_rate (bits per second, 8000-320000) is "
                                  f"required for mp3, got {bit_rate!r}")
        elif encoding not in ENCODINGS:
            raise bad_request(f"output_format.encoding must be one of {', '.join(ENCODINGS)}, "
                              f"got {encoding!r}")
        config = body.get("generation_config")
        if config is not None and not isinstance(config, dict):
            raise bad_request("generation_config must be an object")
        config = config or {}
        speed = _number(config, "speed", *SPEED_RANGE, "generation_config")
        volume = _number(config, "volume", *VOLUME_RANGE, "generation_config")
        if config.get("emotion") is not None and not isinstance(config["emotion"], (str, list)):
            raise bad_request("generation_config.emotion must be a string")
        duration = body.get("duration")
        if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float))
                                     or not 0 < duration <= WAIT_MAX):
            raise bad_request(f"duration must be a positive number of seconds, got {duration!r}")
        self.model, self.transcript, self.language = model, transcript, language
        self.container, self.encoding, self.rate = container, encoding, rate
        self.bit_rate, self.duration = bit_rate, duration
        self.speed, self.volume = speed or 1.0, volume or 1.0

    def samples(self, chars_per_second: float) -> int:
        seconds = len(self.transcript) / chars_per_second / self.speed
        if self.duration is not None:
            seconds = min(seconds, self.duration)
        return max(1, round(seconds * self.rate))


# --- audio

def lin2ulaw(s: int) -> int:
    """G.711 mu-law byte for a 16-bit sample (the Sun reference code that audioop used)."""
    s >>= 2  # 14 bits
    if s < 0:
        s, mask = -s, 0x7F
    else:
        mask = 0xFF
    s = min(s, 8159) + 0x21
    seg = s.bit_length() - 6
    if seg >= 8:
        return 0x7F ^ mask
    return ((seg << 4) | ((s >> (seg + 1)) & 0x0F)) ^ mask


def ulaw2lin(u: int) -> int:
    u = ~u & 0xFF
    s = ((((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 7)) - 0x84
    return -s if u & 0x80 else s


_ALAW_SEG_END = (0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)


def lin2alaw(s: int) -> int:
    """G.711 A-law byte for a 16-bit sample (the Sun reference code that audioop used)."""
    s >>= 3
    if s >= 0:
        mask = 0xD5
    else:
        mask, s = 0x55, -s - 1
    seg = next((i for i, end in enumerate(_ALAW_SEG_END) if s <= end), 8)
    if seg >= 8:
        return 0x7F ^ mask
    return ((seg << 4) | ((s >> (1 if seg < 2 else seg)) & 0x0F)) ^ mask


def alaw2lin(a: int) -> int:
    a ^= 0x55
    t, seg = (a & 0x0F) << 4, (a & 0x70) >> 4
    if seg == 0:
        t += 8
    else:
        t = (t + 0x108) << (seg - 1)
    return t if a & 0x80 else -t


def _little_endian(a: array) -> bytes:
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


@lru_cache(maxsize=64)
def tone(encoding: str, rate: int, volume: float = 1.0) -> bytes:
    """Two seconds of the tone in `encoding`: any piece of up to one second starting at
    (sample index mod rate) is a slice of it, continuous across pieces."""
    amp = TONE_AMPLITUDE * volume
    w = 2 * math.pi * TONE_HZ / rate
    floats = [amp * math.sin(w * n) for n in range(rate)]
    if encoding == "pcm_f32le":
        one = _little_endian(array("f", floats))
    else:
        ints = [round(x * 32767) for x in floats]
        if encoding == "pcm_s16le":
            one = _little_endian(array("h", ints))
        else:
            one = bytes(map(lin2ulaw if encoding == "pcm_mulaw" else lin2alaw, ints))
    return one * 2


WAV_TAGS = {"pcm_s16le": 1, "pcm_f32le": 3, "pcm_alaw": 6, "pcm_mulaw": 7}
UNKNOWN_SIZE = 0xFFFFFFFF


def wav_header(encoding: str, rate: int, nframes: int | None) -> bytes:
    """A mono RIFF/WAVE header.  nframes None: "unknown length" placeholders (0xFFFFFFFF)."""
    tag, width = WAV_TAGS[encoding], ENCODINGS[encoding]
    fmt = (tag, 1, rate, rate * width, width, width * 8)
    chunks = b"fmt " + (b"\x10\x00\x00\x00" + struct.pack("<HHIIHH", *fmt) if tag == 1 else
                        b"\x12\x00\x00\x00" + struct.pack("<HHIIHHH", *fmt, 0))
    if tag != 1:  # non-PCM formats carry a fact chunk: the number of samples
        chunks += b"fact\x04\x00\x00\x00" + struct.pack("<I", UNKNOWN_SIZE if nframes is None else nframes)
    if nframes is None:
        data_size = riff_size = UNKNOWN_SIZE
    else:
        data_size = nframes * width
        riff_size = 4 + len(chunks) + 8 + data_size + (data_size & 1)  # odd chunks get a pad byte
    return b"RIFF" + struct.pack("<I", riff_size) + b"WAVE" + chunks + b"data" + struct.pack("<I", data_size)


# sample rate -> (MPEG version bits: 3 MPEG-1, 2 MPEG-2, 0 MPEG-2.5; sample-rate index)
MP3_RATES = {44100: (3, 0), 48000: (3, 1), 22050: (2, 0), 24000: (2, 1), 16000: (2, 2), 8000: (0, 2)}
MP3_KBPS_V1 = (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)   # Layer III
MP3_KBPS_V2 = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)       # MPEG-2 and 2.5


@lru_cache(maxsize=32)
def mp3_silent_frame(rate: int, bit_rate: int) -> tuple[bytes, int]:
    """One silent mono MPEG Layer III frame and its samples per frame.

    Every sample rate Cartesia offers exists in some MPEG version: 44.1/48 kHz in MPEG-1
    (1152 samples a frame), 16/22.05/24 kHz in MPEG-2 and 8 kHz in MPEG-2.5 (576).  The header
    says: no CRC, no padding, mono; the bitrate is the largest of the version's table that is
    <= bit_rate.  The side information (17 bytes in MPEG-1 mono, 9 in MPEG-2/2.5) and the
    main data are all zero: main_data_begin 0, part2_3_length 0, big_values 0, i.e. no
    Huffman data, which every decoder renders as silence.  The frame length is the standard
    floor(samples/8 * bitrate / rate) bytes, so frames follow each other without padding."""
    version, rate_index = MP3_RATES[rate]
    table = MP3_KBPS_V1 if version == 3 else MP3_KBPS_V2
    kbps = max([k for k in table if k * 1000 <= bit_rate] or [table[0]])
    spf = 1152 if version == 3 else 576
    size = spf // 8 * kbps * 1000 // rate
    header = ((0x7FF << 21) | (version << 19) | (1 << 17)   # sync, version, layer III
              | (1 << 16)                                   # protection bit 1: no CRC
              | ((table.index(kbps) + 1) << 12) | (rate_index << 10)
              | (3 << 6))                                   # channel mode 11: mono
    return struct.pack(">I", header) + bytes(size - 4), spf


def audio_pieces(req: TTSRequest, nsamples: int, wav_sizes: str):
    """(audio seconds generated so far, bytes) per piece of the response body."""
    rate = req.rate
    if req.container == "mp3":
        frame, spf = mp3_silent_frame(rate, req.bit_rate)
        nframes = -(-nsamples // spf)
        per_piece = max(1, round(PIECE_SECONDS * rate / spf))
        for first in range(0, nframes, per_piece):
            n = min(per_piece, nframes - first)
            yield (first + n) * spf / rate, frame * n
        return
    width = ENCODINGS[req.encoding]
    table = tone(req.encoding, rate, req.volume)
    header = b""
    if req.container == "wav":
        header = wav_header(req.encoding, rate, None if wav_sizes == "unknown" else nsamples)
    per_piece = max(1, round(PIECE_SECONDS * rate))
    pos = 0
    while pos < nsamples:
        n = min(per_piece, nsamples - pos)
        start = pos % rate
        piece = table[start * width:(start + n) * width]
        pos += n
        if pos == nsamples and req.container == "wav" and wav_sizes != "unknown" and (n * width) & 1:
            piece += b"\x00"  # RIFF pad byte after an odd-sized data chunk
        yield pos / rate, header + piece
        header = b""


# --- the server

REDACTED = {True: "<redacted: key matched>", False: "<redacted: key did not match>"}


class Stats:
    def __init__(self, concurrency: int):
        self.concurrency = concurrency
        self.in_flight = 0
        self.reset()

    def reset(self):
        self.requests = self.characters_billed = self.probes = 0
        self.max_in_flight = self.in_flight
        self.by_status: dict[str, int] = {}

    def snapshot(self) -> dict:
        return {"requests": self.requests, "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight, "by_status": dict(self.by_status),
                "characters_billed": self.characters_billed, "probes": self.probes,
                "concurrency": self.concurrency}


class FakeCartesia(Server):
    def __init__(self, api_key: str, concurrency: int = 0, chars_per_second: float = 15.0,
                 rtf: float = 0.1, wav_sizes: str = "exact", ssl: _ssl.SSLContext | None = None):
        if not api_key:
            raise ValueError("api_key must be a non-empty string")
        if not (chars_per_second > 0 and math.isfinite(chars_per_second)):
            raise ValueError("chars_per_second must be > 0")
        if not (0 <= rtf <= 100):
            raise ValueError("rtf must be within [0, 100]")
        if wav_sizes not in ("exact", "unknown"):
            raise ValueError("wav_sizes must be exact or unknown")
        if concurrency < 0:
            raise ValueError("concurrency must be >= 0 (0: no limit)")
        super().__init__()  # start(host, port), stop(), .port, .server
        self.api_key, self.chars_per_second, self.rtf = api_key, chars_per_second, rtf
        self.wav_sizes, self.ssl = wav_sizes, ssl
        self.stats = Stats(concurrency)
        self.requests: list[dict] = []

    def reset(self):
        self.requests.clear()
        self.stats.reset()

    def scrub(self, obj):
        """obj with every occurrence of the API key replaced, all the way down."""
        if isinstance(obj, str):
            return obj.replace(self.api_key, "<redacted>")
        if isinstance(obj, list):
            return [self.scrub(v) for v in obj]
        if isinstance(obj, dict):
            return {self.scrub(k): self.scrub(v) for k, v in obj.items()}
        return obj

    def new_conn(self, reader, writer) -> _Conn:
        return _Conn(self, reader, writer)

    def conn_ended(self, c: _Conn):
        c.release()


class _Conn(Conn):
    def __init__(self, fake: FakeCartesia, reader, writer):
        super().__init__(reader, writer)
        self.fake, self.stats = fake, fake.stats
        self.slot = False
        self.entry: dict | None = None

    async def next_cycle(self) -> bool:
        if self.h.our_state is not h11.DONE:
            return False  # closing anyway: a body left unread is not read first
        return await super().next_cycle()

    # -- routing

    async def dispatch(self, req: h11.Request):
        self.method = req.method
        target = req.target.decode("latin-1")
        path = urlsplit(target).path
        headers = {}
        for k, v in req.headers:  # the first of repeated headers wins
            headers.setdefault(k.decode("latin-1"), v.decode("latin-1"))
        if path.startswith("/_"):
            await self.drain_body()
            if path == "/_requests":
                return await self.respond_json(200, self.fake.requests)
            if path == "/_stats":
                return await self.respond_json(200, self.stats.snapshot())
            if path == "/_reset":
                self.fake.reset()
                return await self.respond_json(200, self.stats.snapshot())
            return await self.respond_json(404, {"error": f"no introspection endpoint {path}"})
        request_id = str(uuid.uuid4())
        try:  # picks the error format; /tts/* rejects a missing or bad version itself
            version = parse_version(headers.get("cartesia-version"))
        except ApiError:
            version = None
        try:
            if path == "/":
                if req.method not in (b"GET", b"HEAD"):
                    raise ApiError(405, "Method Not Allowed", "Use GET /")
                self.stats.probes += 1
                await self.drain_body()
                return await self.respond_json(200, {"ok": True, "version": API_VERSIONS[-1]})
            if path not in ("/tts/bytes", "/tts/sse"):
                raise ApiError(404, "Not Found", f"No route for {req.method.decode()} {path}")
            await self.tts(req, target, path, headers, version, request_id)
        except ApiError as e:
            if self.h.our_state is not h11.SEND_RESPONSE:
                raise Done from e  # cannot happen: errors are raised before the head is sent
            await self.drain_body()
            ctype, body = e.render(version, request_id)
            await self.respond(e.status, body, ctype)
        finally:
            self.release()

    async def tts(self, req, target, path, headers, version, request_id):
        fake = self.fake
        self.stats.requests += 1
        self.entry = entry = {
            "request_id": request_id, "method": req.method.decode("latin-1"),
            "path": fake.scrub(target), "headers": self.redacted(req.headers),
            "version": None, "auth": None, "body": None, "status": None,
            "completed": False, "audio_bytes": 0}
        fake.requests.append(entry)
        if len(fake.requests) > MAX_LOG:
            del fake.requests[:len(fake.requests) - MAX_LOG]
        if req.method != b"POST":
            raise ApiError(405, "Method Not Allowed", f"Use POST {path}")
        version = parse_version(headers.get("cartesia-version"))  # raises for a bad one
        entry["version"] = version
        verdict = check_key(fake.api_key, version, _bearer(headers.get("authorization")),
                            headers.get("x-api-key"))
        entry["auth"] = verdict
        if verdict != "ok":
            how = "Authorization: Bearer <key>" if version >= BEARER_SINCE else "X-API-Key: <key>"
            raise ApiError(401, "Unauthorized", AUTH_MESSAGES[verdict].format(how=how))
        limit = self.stats.concurrency
        if limit and self.stats.in_flight >= limit:
            raise ApiError(429, "Too many concurrent requests",
                           f"You have exceeded your plan's concurrency limit ({limit}).",
                           "concurrency_limited")
        self.slot = True
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        raw = await self.read_body(MAX_BODY)
        if raw is None:
            raise ApiError(413, "Payload Too Large", f"The request body exceeds {MAX_BODY} bytes")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            entry["body"] = fake.scrub(raw.decode("utf-8", "replace"))
            raise bad_request(f"The request body is not valid JSON: {e}") from None
        entry["body"] = fake.scrub(body)
        tts = TTSRequest(body, sse=path == "/tts/sse")
        await self.stream(tts, path == "/tts/sse")

    def redacted(self, headers) -> list[list[str]]:
        out = []
        for k, v in headers:
            name, value = k.decode("latin-1"), v.decode("latin-1")
            if name == "authorization":
                token = _bearer(value)
                value = ("<redacted: not a Bearer token>" if token is None
                         else "Bearer " + REDACTED[_same(token, self.fake.api_key)])
            elif name == "x-api-key":
                value = REDACTED[_same(value.strip(), self.fake.api_key)]
            out.append([name, self.fake.scrub(value)])
        return out

    async def stream(self, tts: TTSRequest, sse: bool):
        fake, entry = self.fake, self.entry
        nsamples = tts.samples(fake.chars_per_second)
        ctype = "text/event-stream" if sse else CONTENT_TYPES[tts.container]
        await self.send(self.head(200, [("content-type", ctype), ("cache-control", "no-cache")]))
        entry["status"] = 200
        self.count_status(200)
        self.stats.characters_billed += len(tts.transcript)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for seconds, piece in audio_pieces(tts, nsamples, fake.wav_sizes):
            delay = start + fake.rtf * seconds - loop.time()
            if delay > 0:
                await self.wait_or_gone(min(delay, WAIT_MAX))
            if sse:
                data = b'data: ' + orjson.dumps({"type": "chunk", "data": base64.b64encode(piece).decode(),
                                                 "done": False, "status_code": 206}) + b"\n\n"
            else:
                data = piece
            await self.send(h11.Data(data=data))
            entry["audio_bytes"] += len(piece)
        if sse:
            await self.send(h11.Data(data=b'data: ' + orjson.dumps(
                {"type": "done", "done": True, "status_code": 200}) + b"\n\n"))
        await self.send(h11.EndOfMessage())
        entry["completed"] = True

    def count_status(self, status: int):
        self.stats.by_status[str(status)] = self.stats.by_status.get(str(status), 0) + 1

    def release(self):
        """Give back the concurrency slot, once."""
        if self.slot:
            self.slot = False
            self.stats.in_flight -= 1
        self.entry = None

    # -- HTTP plumbing (the rest is plumbing.Conn's)

    async def read_body(self, limit: int) -> bytes | None:
        """The whole request body, or None (after draining it) when it outgrows limit."""
        parts, n = [], 0
        while (data := await self.body_data()) is not None:
            n += len(data)
            if n <= limit:
                parts.append(bytes(data))
        return b"".join(parts) if n <= limit else None

    async def drain_body(self):
        while await self.body_data() is not None:
            pass

    async def respond(self, status, body: bytes, ctype="text/plain", headers=()):
        if self.entry is not None:
            self.entry["status"] = status
            self.count_status(status)
        await super().respond(status, body, ctype, headers)


def server_ssl_context(cert_file: str, key_file: str) -> _ssl.SSLContext:
    ctx = _ssl.create_default_context(_ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


class CartesiaThread(ServerThread):
    """Run a FakeCartesia on its own event loop in a daemon thread, for synchronous tests:
    `with CartesiaThread(api_key="k") as c: http.client.HTTPConnection("127.0.0.1", c.port)`.
    Keyword arguments go to FakeCartesia."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **kwargs):
        super().__init__(host, port, name="fake-cartesia", what="fake Cartesia",
                         server=FakeCartesia(**kwargs))

    fake = property(lambda self: self.server)


def _positive(kind):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (v >= 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"{text!r}: want a finite number >= 0")
        return v
    return parse


def main(argv=None):
    p = cli_parser("cartesia", __doc__)
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--api-key", help="the key clients must send (visible in ps: prefer --api-key-env)")
    keys.add_argument("--api-key-env", metavar="NAME",
                      help="read the key from this environment variable (default CARTESIA_API_KEY)")
    p.add_argument("--concurrency", type=_positive(int), default=0, metavar="N",
                   help="simultaneous TTS requests before 429 (plans: Free 2, Pro 3, Startup 5, "
                        "Scale 15; default 0: no limit)")
    p.add_argument("--tls-cert", help="serve HTTPS with this certificate chain (PEM)")
    p.add_argument("--tls-key", help="... and this private key (PEM)")
    p.add_argument("--chars-per-second", type=_positive(float), default=15.0, metavar="F",
                   help="transcript characters per second of audio (default 15)")
    p.add_argument("--rtf", type=_positive(float), default=0.1, metavar="F",
                   help="real-time factor: seconds of work per second of audio (default 0.1; "
                        "0: as fast as the socket takes it)")
    p.add_argument("--wav-sizes", choices=("exact", "unknown"), default="exact",
                   help="WAV header sizes: exact (default) or 0xFFFFFFFF placeholders")
    args = p.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if args.chars_per_second == 0:
        p.error("--chars-per-second must be > 0")
    if args.api_key is not None:
        api_key = args.api_key
    else:
        name = args.api_key_env or "CARTESIA_API_KEY"
        api_key = os.environ.get(name, "")
        if not api_key:
            p.error(f"no API key: ${name} is unset or empty (pass --api-key or --api-key-env)")
    if not api_key:
        p.error("the API key must not be empty")
    try:
        ctx = server_ssl_context(args.tls_cert, args.tls_key) if args.tls_cert else None
        serve_until_signal(lambda: FakeCartesia(api_key, args.concurrency, args.chars_per_second,
                                                args.rtf, args.wav_sizes, ctx),
                           args, " (https)" if ctx else "")
    except (OSError, _ssl.SSLError, ValueError) as e:
        print(f"fake cartesia: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
