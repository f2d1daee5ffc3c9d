"""A front-door piece the fleet could not serve, made by Cartesia instead.

The proxy's rules, piece by piece: Cartesia takes a piece when no backend
is in the rotation, when its attempts all failed (a 5xx or no answer), or,
with `spillover`, when the fleet stayed full; never after a 4xx, and never
once some of the piece's own audio reached the caller.  Cartesia is asked
for raw PCM, so its audio goes out in the caller's format like any other
piece's.
"""

from __future__ import annotations

import time
from contextlib import aclosing

from . import translate as tr
from ..scheduling.scheduler import NO_BACKEND
from .cartesia import CartesiaError
from .wav_stream import SampleAligner

CARTESIA = "cartesia"


def fallback_reason(no_slot_why: str, spillover: bool) -> str:
    """Why Cartesia may take a piece no backend took ("" : it may not)."""
    if no_slot_why == NO_BACKEND:
        return no_slot_why
    return no_slot_why if spillover else ""


async def cartesia_piece(fleet, state, why: str, changed) -> None:
    """Serve `state`'s piece from Cartesia; on failure its error says why both failed."""
    fallback = fleet.fallback
    client = fallback.client
    reason = state.error.message if state.error is not None else "the fleet failed"
    if not client.usable:
        state.error.message = (f"{reason}; the Cartesia fallback is unusable: "
                               f"{client.unusable_reason}")
        return
    piece = state.piece
    cfg = fallback.cfg
    call = tr.Synthesis("openai", (piece.text,), piece.voice_name,
                        tr.clamp_speed(piece.speed), tr.WAV_STREAM, {})
    body = tr.cartesia_request(call, piece.text, model_id=cfg.model_id, language=cfg.language,
                               voice_id=tr.voice_id(cfg.voices, piece.voice_name),
                               container="raw")
    fleet.fell_back(why)
    failure, state.error = state.error, None
    state.served_by, state.api = CARTESIA, CARTESIA
    aligner = SampleAligner()
    try:
        async with aclosing(client.stream(body, len(piece.text),
                                          time.monotonic() + cfg.timeout)) as audio:
            async for chunk in audio:
                pcm = aligner.feed(chunk)
                if pcm:
                    state.chunks.append(pcm)
                    changed.set()
    except CartesiaError as exc:
        failure.message = f"{reason}; fallback to Cartesia failed: {exc.reason}"
        state.error = failure
        return
    state.done = True
