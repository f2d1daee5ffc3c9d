"""The OpenAI front door's keys: a backend's `api`, `formats` and
`max_chars`, and a kind = "openai" route's `voices`, `pass_unknown_voices`,
`models`, `max_input` and `[route.split]`.

    [[backend]]
    api = "chatterbox"            # openai | chatterbox | chattts
    formats = ["mp3", "pcm"]      # what an OpenAI-style server makes itself
    [[route]]
    path = "/v1/audio/speech"
    kind = "openai"
    [route.voices]
    alloy = { chatterbox = { seed = 11, exaggeration = 0.6 }, chattts = 2222 }
    [route.split]
    min_chars = 300
"""

from __future__ import annotations

import re
from typing import Any

from ..config_model import ConfigError, Speech, Split, Voice
from .config_tables import checked_keys
from .config_values import boolean, clip, integer, show

APIS = ("openai", "chatterbox", "chattts")
# response_format values an OpenAI-style server may declare, and "sse" for
# stream_format "sse" it answers itself.
FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm", "sse")
SPEECH_KEYS = ("voices", "pass_unknown_voices", "models", "max_input", "split")
# /synthesize-json fields a voice may set (text and speech_rate are the call's).
CHATTERBOX_VOICE_FIELDS = ("exaggeration", "temperature", "cfg_weight", "min_p", "top_p",
                           "repetition_penalty", "seed")
VOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


def api(value: Any) -> str:
    if value not in APIS:
        raise ValueError(f"must be one of {', '.join(APIS)}, got {show(value)}")
    return value


def formats(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or any(v not in FORMATS for v in value):
        raise ValueError(f"must be a list of {', '.join(FORMATS)}, got {show(value)}")
    return tuple(dict.fromkeys(value))


BACKEND_SPEECH_KEYS = {"api": api, "formats": formats, "max_chars": integer(1, 1_000_000)}


def speech(entry: dict, where: str) -> Speech:
    """The front door of an openai route (every key optional)."""
    values = checked_keys(entry, {
        "pass_unknown_voices": boolean,
        "models": _models,
        "max_input": integer(1, 1_000_000),
    }, where)
    voices = _voices(entry.get("voices", {}), f"{where}.voices")
    split = _split(entry.get("split", {}), f"{where}.split")
    return Speech(voices=voices, split=split, **values)


def _models(value: Any) -> tuple[str, ...]:
    if (not isinstance(value, list) or not value
            or any(not isinstance(v, str) or not VOICE_NAME.fullmatch(v) for v in value)):
        raise ValueError(f"must be a non-empty list of model names, got {show(value)}")
    return tuple(dict.fromkeys(value))


def _split(table: Any, where: str) -> Split:
    if not isinstance(table, dict):
        raise ConfigError(where, f"must be a table ([route.split]), got {show(table)}")
    keys = {"enabled": boolean, "min_chars": integer(1, 1_000_000), "parallel": integer(1, 64)}
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", f"unknown key (known: {', '.join(keys)})")
    return Split(**checked_keys(table, keys, where))


def _voices(table: Any, where: str) -> tuple[tuple[str, Voice], ...]:
    if not isinstance(table, dict):
        raise ConfigError(where, f"must be a table of voice name = {{ openai = ..., "
                          f"chatterbox = {{...}}, chattts = SEED }}, got {show(table)}")
    out = []
    for name, spec in table.items():
        here = f"{where}.{name}"
        if not VOICE_NAME.fullmatch(name):
            raise ConfigError(here, "a voice name is 1-64 letters, digits, '.', '_', ':' "
                              f"or '-', got {clip(name)}")
        out.append((name, _voice(spec, here)))
    return tuple(out)


def _voice(spec: Any, where: str) -> Voice:
    if isinstance(spec, str):   # one name for the OpenAI-style servers, defaults elsewhere
        spec = {"openai": spec}
    if not isinstance(spec, dict):
        raise ConfigError(where, "must be a table { openai = NAME, chatterbox = { FIELD = "
                          f"VALUE }}, chattts = SEED }} (or a name), got {show(spec)}")
    unknown = sorted(set(spec) - set(APIS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", f"unknown API (known: {', '.join(APIS)})")
    openai = spec.get("openai")
    if openai is not None and (not isinstance(openai, str) or not openai):
        raise ConfigError(f"{where}.openai", f"must be a voice name, got {show(openai)}")
    fields = spec.get("chatterbox", {})
    if not isinstance(fields, dict):
        raise ConfigError(f"{where}.chatterbox", "must be a table of /synthesize-json fields "
                          f"({', '.join(CHATTERBOX_VOICE_FIELDS)}), got {show(fields)}")
    for field, value in fields.items():
        if field not in CHATTERBOX_VOICE_FIELDS:
            raise ConfigError(f"{where}.chatterbox.{field}", "unknown field (known: "
                              f"{', '.join(CHATTERBOX_VOICE_FIELDS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}.chatterbox.{field}", f"must be a number, got {show(value)}")
    seed = spec.get("chattts")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed < 2**32):
        raise ConfigError(f"{where}.chattts", "must be a speaker seed, an integer "
                          f"0..4294967295, got {show(seed)}")
    return Voice(openai=openai, chatterbox=tuple(fields.items()), chattts=seed)
