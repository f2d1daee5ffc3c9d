"""An OpenAI `POST /v1/audio/speech` call, read and checked before any
backend is touched, and errors in OpenAI's own shape.  Sans-io.

    {"model": "tts-1", "input": "Hello.", "voice": "alloy",
     "response_format": "pcm", "speed": 1.0, "stream_format": "sse",
     "instructions": "..."}

The caller's answer is decided here: its audio format (`response_format`,
OpenAI's default mp3) and whether it comes as SSE events.  What each backend
API is sent is `backend_apis`' business.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx",
                 "sage", "shimmer", "verse", "marin", "cedar")   # the SDK's, Pipecat's
RESPONSE_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
DEFAULT_FORMAT = "mp3"          # OpenAI's, when the caller names none
SPEED_MIN, SPEED_MAX = 0.25, 4.0
# Fields this door understands; others go to OpenAI-style servers untouched.
KNOWN = ("model", "input", "voice", "response_format", "speed", "stream_format",
         "instructions")

# OpenAI's error types, by status.
_TYPES = {400: "invalid_request_error", 404: "invalid_request_error",
          408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class SpeechError(Exception):
    """A call the door refuses: status, and OpenAI's error fields."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


@dataclass(frozen=True)
class SpeechCall:
    model: str
    text: str
    voice: str | None           # None: each API's default voice
    response_format: str        # what the caller gets: one of RESPONSE_FORMATS
    format_named: bool          # the caller named it (else OpenAI's default)
    sse: bool                   # stream_format "sse": speech.audio.* events
    speed: float | None
    fields: dict                # the whole body, for an OpenAI-style server


def read_speech(body: bytes, *, known_voices: tuple[str, ...], pass_unknown: bool,
                formats: tuple[str, ...], max_input: int,
                default_format: str = DEFAULT_FORMAT) -> SpeechCall:
    """The call in `body`, or SpeechError naming the field at fault.
    `formats`: the response formats this route can give; `default_format`:
    when the caller names none (a .../stream path's is WAV, as its servers')."""
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise SpeechError(f"We could not parse the JSON body of your request: {exc}",
                          code="invalid_json") from None
    if not isinstance(fields, dict):
        raise SpeechError("The request body must be a JSON object.", code="invalid_json")
    model = fields.get("model", "tts-1")
    if not isinstance(model, str) or not model:
        raise SpeechError("'model' must be a non-empty string.", param="model",
                          code="invalid_type")
    text = fields.get("input")
    if not isinstance(text, str):
        raise SpeechError("'input' is a required string.", param="input",
                          code="invalid_type" if "input" in fields else "missing_required_parameter")
    if not text.strip():
        raise SpeechError("'input' must not be empty.", param="input", code="empty_input")
    if len(text) > max_input:
        raise SpeechError(f"'input' is {len(text)} characters; at most {max_input} are "
                          "allowed.", param="input", code="string_above_max_length")
    voice = fields.get("voice")
    if isinstance(voice, dict) and isinstance(voice.get("id"), str):
        voice = voice["id"]     # the SDK's custom-voice form, {"id": "..."}
    if voice is not None and (not isinstance(voice, str) or not voice):
        raise SpeechError("'voice' must be a non-empty string.", param="voice",
                          code="invalid_type")
    # OpenAI requires a voice; the servers behind here do not (their default
    # voice), and callers written for them send none: so neither does this.
    if voice is not None and voice not in known_voices and not pass_unknown:
        raise SpeechError(f"Unknown voice {voice[:64]!r}; this server knows: "
                          f"{', '.join(known_voices)}.", param="voice", code="invalid_value")
    fmt = fields.get("response_format")
    named = fmt is not None
    fmt = default_format if fmt is None else fmt
    if fmt not in formats:
        shown = fmt[:32] if isinstance(fmt, str) else orjson.dumps(fmt).decode()[:32]
        raise SpeechError(f"response_format {shown!r} is not available here; supported: "
                          f"{', '.join(formats)}.", param="response_format",
                          code="invalid_value")
    stream_format = fields.get("stream_format", "audio")
    if stream_format not in ("audio", "sse"):
        raise SpeechError("'stream_format' must be 'audio' or 'sse'.", param="stream_format",
                          code="invalid_value")
    speed = fields.get("speed")
    if speed is not None:
        if isinstance(speed, bool) or not isinstance(speed, (int, float)):
            raise SpeechError("'speed' must be a number.", param="speed", code="invalid_type")
        if not SPEED_MIN <= speed <= SPEED_MAX:
            raise SpeechError(f"'speed' must be between {SPEED_MIN} and {SPEED_MAX}, got "
                              f"{speed}.", param="speed", code="invalid_value")
        speed = float(speed)
    instructions = fields.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise SpeechError("'instructions' must be a string.", param="instructions",
                          code="invalid_type")
    return SpeechCall(model=model, text=text, voice=voice, response_format=fmt,
                      format_named=named, sse=stream_format == "sse", speed=speed,
                      fields=fields)


def error_body(status: int, message: str, *, param: str | None = None,
               code: str | None = None) -> bytes:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param,
                                   "code": code}})
