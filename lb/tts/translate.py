"""A local TTS call, read into one kind-neutral form, and the Cartesia
request that serves it.  Sans-io: bytes in, dicts out.

Three request kinds come from the GPU servers this balancer fronts
(../shared/reference/tts-apis.md has their APIs):

    chatterbox  POST /synthesize-json (JSON) or /synthesize (multipart form)
                -> JSON with an audio_url fetched in a second call
    openai      POST /v1/audio/speech[/stream] (JSON) -> WAV, chunked WAV or SSE
    chattts     POST /generate_voice (JSON, text is a list) -> a zip, one file a text

What Cartesia understands of them is the text, the voice, the speed and the
audio format; everything else (exaggeration, cfg_weight, temperature, seeds,
top_p...) has no Cartesia meaning and is dropped.  Audio stays 24 kHz mono
16-bit PCM end to end.
"""

from __future__ import annotations

import email.parser
import email.policy
import re
from dataclasses import dataclass

import orjson

KINDS = ("chatterbox", "openai", "chattts")

SAMPLE_RATE = 24000
SPEED_MIN, SPEED_MAX = 0.6, 1.5          # Cartesia's generation_config.speed range

# The caller's expected answer.
CHATTERBOX_JSON = "chatterbox_json"      # JSON with audio_url, audio kept by the balancer
WAV = "wav"                              # one WAV body
WAV_STREAM = "wav_stream"                # chunked WAV: unknown-size header, then PCM
SSE = "sse"                              # speech.audio.delta events, then speech.audio.done
ZIP = "zip"                              # one audio file per text item

# Text limits the real servers enforce (a longer text is the caller's error there too).
MAX_TEXT = {"chatterbox": 5000, "openai": 3000, "chattts": 2048}


class BadRequest(Exception):
    """The call cannot be understood: the caller's error (400), never a fallback."""


@dataclass(frozen=True)
class Synthesis:
    kind: str
    texts: tuple[str, ...]      # one for chatterbox/openai; one per item for chattts
    voice: str | None           # the caller's voice name, if it gave one
    speed: float | None         # Cartesia's scale, already clamped
    shape: str                  # what the caller expects back
    parameters: dict            # the caller's own fields, echoed in chatterbox's JSON

    @property
    def characters(self) -> int:
        """What Cartesia bills."""
        return sum(len(t) for t in self.texts)


def read_call(kind: str, path: str, content_type: str, body: bytes) -> Synthesis:
    """The call in `body`, or BadRequest naming what is wrong."""
    if kind == "chatterbox":
        if content_type.split(";", 1)[0].strip().lower() == "multipart/form-data":
            fields = _form_fields(content_type, body)
        else:
            fields = _json_object(body)
        return _chatterbox(fields)
    if kind == "openai":
        return _openai(path, _json_object(body))
    if kind == "chattts":
        return _chattts(_json_object(body))
    raise ValueError(f"unknown request kind {kind!r}")


def _chatterbox(fields: dict) -> Synthesis:
    text = _text(fields.get("text"), "text", MAX_TEXT["chatterbox"])
    speed = _number(fields.get("speech_rate"), "speech_rate")
    parameters = {k: v for k, v in fields.items() if k not in ("text", "audio_prompt")}
    return Synthesis("chatterbox", (text,), None, clamp_speed(speed), CHATTERBOX_JSON, parameters)


def _openai(path: str, fields: dict) -> Synthesis:
    text = _text(fields.get("input"), "input", MAX_TEXT["openai"])
    voice = fields.get("voice")
    if voice is not None and not isinstance(voice, str):
        raise BadRequest("voice must be a string")
    speed = _number(fields.get("speed"), "speed")
    if path.rstrip("/").endswith("/stream"):
        shape = WAV_STREAM
    elif fields.get("stream_format") == "sse":
        shape = SSE
    else:
        shape = WAV
    return Synthesis("openai", (text,), voice, clamp_speed(speed), shape, {})


_SPEED_PROMPT = re.compile(r"\[speed_(\d)\]")


def _chattts(fields: dict) -> Synthesis:
    items = fields.get("text")
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list) or not items:
        raise BadRequest("text must be a non-empty list of strings")
    texts = tuple(_text(t, f"text[{i}]", MAX_TEXT["chattts"]) for i, t in enumerate(items))
    params = fields.get("params_infer_code")
    speed = None
    voice = fields.get("voice") if isinstance(fields.get("voice"), str) else None
    if isinstance(params, dict):
        match = _SPEED_PROMPT.search(str(params.get("prompt", "")))
        if match:
            speed = int(match.group(1)) / 5   # [speed_5] is ChatTTS's normal pace
    return Synthesis("chattts", texts, voice, clamp_speed(speed), ZIP, {})


# --- the Cartesia side

def cartesia_request(call: Synthesis, text: str, *, model_id: str, language: str,
                     voice_id: str, container: str) -> bytes:
    """The JSON body of one Cartesia /tts/bytes request for `text`."""
    body: dict = {
        "model_id": model_id,
        "transcript": text,
        "voice": {"mode": "id", "id": voice_id},
        "language": language,
        "output_format": {"container": container, "encoding": "pcm_s16le",
                          "sample_rate": SAMPLE_RATE},
    }
    if call.speed is not None:
        body["generation_config"] = {"speed": call.speed}
    return orjson.dumps(body)


def container_for(shape: str) -> str:
    """What to ask Cartesia for: its WAV where the caller's WAV streams
    straight through; raw PCM where the balancer frames the audio itself
    (chunked WAV, SSE, and whole files whose header needs true sizes)."""
    return "wav" if shape == WAV else "raw"


def voice_id(voices: dict[str, str], name: str | None) -> str:
    """The Cartesia voice for a local voice name; `default` serves every other name."""
    if name is not None and name in voices:
        return voices[name]
    return voices["default"]


# --- helpers

def _json_object(body: bytes) -> dict:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object")
    return doc


def _form_fields(content_type: str, body: bytes) -> dict:
    """The text fields of a multipart/form-data body (files are left out)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise BadRequest("multipart/form-data body could not be read")
    fields: dict = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name or part.get_filename() is not None:
            continue
        payload = part.get_payload(decode=True) or b""
        fields[name] = payload.decode("utf-8", "replace")
    return fields


def _text(value, name: str, limit: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"{name} must be a non-empty string")
    if len(value) > limit:
        raise BadRequest(f"{name} is longer than {limit} characters")
    return value


def _number(value, name: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be a number, got {value!r}") from None
    if not number > 0:
        raise BadRequest(f"{name} must be positive, got {value!r}")
    return number


def clamp_speed(speed: float | None) -> float | None:
    """A speed on Cartesia's scale (SPEED_MIN-SPEED_MAX), as sent to it."""
    if speed is None:
        return None
    return min(SPEED_MAX, max(SPEED_MIN, round(speed, 3)))
