"""What OpenAI clients probe, answered by the balancer itself when it has an
OpenAI front door (a kind = "openai" route): at once, without a backend.

    GET /, /v1/            LiveKit's prewarm(); any "is it up" check
    GET /v1/models         client.models.list(): the model names the routes serve
    GET /v1/models/<id>    one of them (404 in OpenAI's shape otherwise)
    GET /v1/audio/voices   the voice names the routes take
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from ..tts.openai_speech import error_body

if TYPE_CHECKING:
    from ..wire.framing import Request
    from .balancer import Balancer

JSON = b"application/json"
MODELS_PREFIX = b"/v1/models/"


def _models(balancer: "Balancer") -> list[str]:
    names: dict[str, None] = {}
    for plan in balancer.speech_plans.values():
        names.update(dict.fromkeys(plan.speech.models))
    return list(names)


def _model(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "tts-lb"}


def root(balancer: "Balancer", request: "Request", peer: str) -> tuple[int, bytes, bytes]:
    paths = [p.decode("ascii") for p in balancer.speech_plans]
    return 200, JSON, orjson.dumps({"ok": True, "service": "tts-lb", "speech": paths,
                                    "models": _models(balancer)})


def models(balancer: "Balancer", request: "Request", peer: str) -> tuple[int, bytes, bytes]:
    return 200, JSON, orjson.dumps({"object": "list",
                                    "data": [_model(m) for m in _models(balancer)]})


def model(balancer: "Balancer", request: "Request", peer: str) -> tuple[int, bytes, bytes]:
    name = request.path[len(MODELS_PREFIX):].decode("utf-8", "replace")
    if name in _models(balancer):
        return 200, JSON, orjson.dumps(_model(name))
    return 404, JSON, error_body(404, f"The model {name[:64]!r} does not exist here.",
                                 param="model", code="model_not_found")


def voices(balancer: "Balancer", request: "Request", peer: str) -> tuple[int, bytes, bytes]:
    names: dict[str, bool] = {}
    for plan in balancer.speech_plans.values():
        for name in plan.known_voices:
            names[name] = names.get(name, False) or name in plan.voices
    return 200, JSON, orjson.dumps({
        "object": "list",
        "voices": list(names),
        "data": [{"id": n, "object": "voice", "name": n, "configured": mapped}
                 for n, mapped in names.items()]})


# LiveKit's prewarm() GETs "/" relative to its base_url, ".../v1": "/v1/".
ROUTES = {b"/": root, b"/v1": root, b"/v1/": root, b"/v1/models": models,
          b"/v1/audio/voices": voices}


def route(path: bytes, balancer: "Balancer"):
    """The handler for `path` when the balancer has a front door, else None."""
    if not balancer.speech_plans:
        return None
    found = ROUTES.get(path)
    if found is None and path.startswith(MODELS_PREFIX):
        return model
    return found
