"""The fake Cartesia's request checks: version, key and body, as the real API makes them.

Everything here decides whether a /tts/* request is acceptable and, if not, which error it
gets, without touching a socket, so the rules (their order and messages are in the module doc
of backends/cartesia.py) sit in one place apart from the HTTP plumbing of cartesia_server.py:

  * ApiError / bad_request(): an error answer, rendered as JSON or text/plain by version;
  * parse_version(): the Cartesia-Version header (a YYYY-MM-DD date, not too old);
  * check_key(), bearer_token(), same_key(): the auth verdict, Bearer or X-API-Key by version,
    compared in constant time;
  * TTSRequest: a validated /tts/bytes or /tts/sse JSON body.
"""
from __future__ import annotations

import datetime, hmac, re

import orjson

from .cartesia_audio import CONTAINERS, ENCODINGS, SAMPLE_RATES

API_VERSIONS = ("2024-06-10", "2024-11-13", "2025-04-16", "2026-03-01")
BEARER_SINCE = "2025-04-16"       # from this version on: Authorization: Bearer <key>
JSON_ERRORS_SINCE = "2026-03-01"  # from this version on: structured JSON errors
MODELS = frozenset({"sonic-3", "sonic-3.5", "sonic-latest", "sonic-3-latest"})
MODEL_SNAPSHOT = re.compile(r"sonic-3(\.5)?-\d{4}-\d{2}-\d{2}\Z")  # dated snapshots
# Retired on 2026-06-01 (tts-apis.md): sonic, sonic-english, sonic-multilingual, sonic-2*, sonic-turbo*
RETIRED = re.compile(r"sonic(-english|-multilingual|-2(-.+)?|-turbo(-.+)?)?\Z")
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
LANGUAGE_RE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})?\Z")
SPEED_RANGE, VOLUME_RANGE = (0.6, 1.5), (0.5, 2.0)
WAIT_MAX = 3600.0        # no wait here is unbounded (the longest "duration"; the server's waits)


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


# --- the version and the key

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
        return "ok" if same_key(bearer, expected) else "wrong_key"
    if x_api_key is None:
        return "wrong_scheme" if bearer is not None else "missing"
    return "ok" if same_key(x_api_key, expected) else "wrong_key"


def same_key(given: str, expected: str) -> bool:
    """given == expected in constant time (a key check must not leak how much matched)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


def bearer_token(value: str | None) -> str | None:
    """The token of an "Authorization: Bearer <token>" value; None for any other value."""
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


AUTH_MESSAGES = {
    "missing": "No API key. Send {how}.",
    "wrong_key": "Invalid API key.",
    "wrong_scheme": "This Cartesia-Version authenticates with {how}.",
}


# --- the body

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
