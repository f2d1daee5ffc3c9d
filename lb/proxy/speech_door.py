"""Where an exchange on a kind = "openai" route meets the front door.

The whole body is in (a speech call is small; see `exchange.start`), so the
call is read before any backend is touched: a bad one is answered 400 in
OpenAI's error shape at once; one the OpenAI-style servers can take as it
came goes on as an ordinary proxied request (byte for byte, as before);
any other is served by tts.speech_service on a task of the exchange's, the
way the Cartesia fallback is.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..tts.openai_speech import DEFAULT_FORMAT, SpeechError, read_speech
from ..tts.speech_counters import FRONT_DOOR, PASSED_THROUGH, REFUSED
from ..tts.speech_output import SpeechOutput
from ..tts.speech_service import Fleet, SpeechCallRun, SpeechCut, SpeechFailure
from .phases import DONE, SPEECH
from .recovery import ClientStalled, _ToClient

if TYPE_CHECKING:
    from .exchange import Exchange

log = logging.getLogger("lb")


def take(ex: "Exchange") -> bool:
    """True if the front door answers this call (or refused it); False: proxy it."""
    balancer = ex.balancer
    plan = balancer.speech_plans.get(ex.request.path)
    if plan is None:
        return False
    speech = plan.speech
    if ex._kept is None or (ex.request.has_body and not ex._request_ended):
        ex._answer_error(413, "The request body is too large for a speech call "
                         f"(over retry.replay_max_bytes, {balancer.config.retry.replay_max_bytes} "
                         "bytes).", code="request_too_large")
        return True
    backends = balancer.scheduler.backends
    counters = balancer.speech_counters
    try:
        call = read_speech(b"".join(ex._kept), known_voices=plan.known_voices,
                           pass_unknown=speech.pass_unknown_voices,
                           formats=plan.formats(backends), max_input=speech.max_input,
                           default_format="wav" if ex.request.path.endswith(b"/stream")
                           else DEFAULT_FORMAT)
        if plan.passes_through(call, backends):
            counters.calls[PASSED_THROUGH] += 1
            return False
        pieces = plan.pieces(call, backends)
        output = SpeechOutput(call.response_format, sse=call.sse,
                              native=pieces[0].native is not None)
    except SpeechError as exc:
        counters.calls[REFUSED] += 1
        ex._answer_error(exc.status, exc.message, code=exc.code, param=exc.param)
        return True
    counters.calls[FRONT_DOOR] += 1
    if len(pieces) > 1:
        counters.split_calls += 1
    run = SpeechCallRun(pieces, output,
                        Fleet(balancer.scheduler, balancer.config, balancer.why_no_backend,
                              fallback=balancer.fallback, fell_back=_counter(balancer),
                              counters=counters),
                        parallel=speech.split.parallel if len(pieces) > 1 else 1,
                        characters=len(call.text), speed=call.speed,
                        tried=ex.tried, why=ex.why)
    ex._kept = None
    ex.phase = SPEECH
    ex._deadline.cancel()        # each backend call is bounded by its own timeouts
    ex._fallback_task = balancer.loop.create_task(_serve(ex, run))
    return True


def _counter(balancer):
    """Counts a piece handed to Cartesia with the proxy's fallbacks (by reason)."""
    def fell_back(why: str) -> None:
        balancer.fallbacks[why] += 1
    return fell_back


async def _serve(ex: "Exchange", run: SpeechCallRun) -> None:
    failure: Exception | None = None
    try:
        await run.run(_ToClient(ex))
    except (ClientStalled, SpeechFailure, SpeechCut) as exc:
        failure = exc
    except asyncio.CancelledError:
        raise
    except Exception as exc:   # a bug must not leave the caller hanging
        log.exception("speech call %s failed", ex.request_id)
        failure = exc
    ex.served_by = run.served_by     # for the access log and the latency figures
    if ex.phase == DONE:
        return
    if failure is None:
        ex._finish()
        ex.client.send_end()
    elif isinstance(failure, SpeechFailure):
        extra = [(b"retry-after", b"1")] if failure.retry_after else []
        ex._answer_error(failure.status, failure.message, code=failure.code, extra=extra)
    elif isinstance(failure, SpeechCut):
        ex.note = str(failure)
        ex._finish()
        ex.client.abort_response()
    elif isinstance(failure, ClientStalled):
        ex._abandon(504, f"client read nothing for {ex.balancer.config.timeouts.idle:g}s")
    else:
        ex._abandon(500, f"the front door failed ({type(failure).__name__})")
