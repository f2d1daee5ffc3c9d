"""The OpenAI front door serving one call: its pieces synthesized on up to
`split.parallel` backend slots at once, their audio sent strictly in order,
the first piece's as it arrives.

A piece that fails before any of its audio reached the caller is tried
again on another backend (up to retry.attempts in all; pieces ahead of the
one playing have sent nothing, so they can always be); a piece that fails
after the caller has some of its audio ends the answer visibly: the body is
cut without its last chunk (SpeechCut), and the log says why.  The first piece
queues as any call does; once it has its slot the call is under way, and
the later pieces wait for theirs at the head of the queue, as retries do,
for up to timeouts.first_byte: an answer under way is finished before new
calls start, rather than cut for a queue deadline.  A call that
fails before its first byte is a SpeechFailure the proxy answers in OpenAI's
error shape.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .backend_apis import BackendStatus, Piece, Timeouts, applied_speed, synthesize
from .backend_http import BackendFailure
from .speech_counters import SpeechCounters
from .fallback import FALLBACK_FAILED
from .speech_fallback import CARTESIA, cartesia_piece, fallback_reason
from .speech_output import SpeechOutput
from .speech_plan import api_of
from .speech_slots import Attempt, NoSlot, take_slot

log = logging.getLogger("lb")

AHEAD = 2       # pieces may be synthesized this many windows ahead of the one playing


class SpeechFailure(Exception):
    """Nothing was sent: answer `status` with OpenAI's error body."""

    def __init__(self, status: int, message: str, code: str, retry_after: bool = False):
        super().__init__(message)
        self.status, self.message, self.code, self.retry_after = status, message, code, retry_after


class SpeechCut(Exception):
    """Audio was sent, then a piece failed: the answer must be cut."""


@dataclass
class Fleet:
    """What a call needs of the balancer, read when it starts."""
    scheduler: object
    config: object              # config_model.Config
    why_no_backend: Callable[[], str]
    fallback: object = None     # fallback.Fallback, when Cartesia is configured
    fell_back: Callable[[str], None] = lambda why: None   # counts a piece sent there
    counters: SpeechCounters = field(default_factory=SpeechCounters)


class _PieceState:
    __slots__ = ("piece", "chunks", "done", "error", "sent", "api", "served_by")

    def __init__(self, piece: Piece):
        self.piece = piece
        self.chunks: deque[bytes] = deque()
        self.done = False
        self.error: Exception | None = None
        self.sent = False           # some of its audio has gone to the caller
        self.api = ""               # of the backend serving it
        self.served_by = ""         # that backend's name, or "cartesia"


class SpeechCallRun:
    """One call.  `tried` and `why` are the exchange's (the access log's)."""

    def __init__(self, pieces: list[Piece], output: SpeechOutput, fleet: Fleet, *,
                 parallel: int, characters: int, speed: float | None,
                 tried: list[str], why: list[str]):
        self.states = [_PieceState(p) for p in pieces]
        self.output, self.fleet = output, fleet
        self.parallel, self.characters, self.speed = parallel, characters, speed
        self.tried, self.why = tried, why
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._running = 0
        self._admitted = False      # the first piece has its slot: the call is under way
        cfg = fleet.config
        self._timeouts = Timeouts(connect=cfg.timeouts.connect,
                                  first_byte=cfg.timeouts.first_byte, idle=cfg.timeouts.idle,
                                  max_head=cfg.limits.max_response_header_bytes)

    async def run(self, out) -> None:
        """Write the answer to `out` (fallback.Output): head, body, not the end."""
        started = False
        try:
            for index, state in enumerate(self.states):
                while True:
                    self._changed.clear()
                    self._launch(index)
                    while state.chunks:
                        chunk = state.chunks.popleft()
                        state.sent = True
                        data = self.output.feed(chunk)
                        if data:
                            if not started:
                                started = True
                                out.head(200, self._headers())
                            out.data(data)
                            await out.drained()
                    if state.done:
                        break
                    if state.error is not None:
                        self._failed(state, index, started)
                    await self._changed.wait()
            tail = self.output.finish(characters=self.characters)
            if not started:
                out.head(200, self._headers())
            out.data(tail)
        finally:
            for task in self._tasks:
                task.cancel()

    def _failed(self, state: _PieceState, index: int, started: bool) -> None:
        error = state.error
        if not started:
            if isinstance(error, SpeechFailure):
                raise error
            raise SpeechFailure(502, str(error), "backend_error")
        reason = (error.message if isinstance(error, SpeechFailure) else str(error))
        self.fleet.counters.cut += 1
        log.warning("speech call cut after audio was sent: piece %d of %d failed: %s",
                    index + 1, len(self.states), reason)
        raise SpeechCut(f"piece {index + 1} of {len(self.states)} failed after audio was "
                        f"sent: {reason}")

    @property
    def served_by(self) -> str:
        """Who made the first audio (the access log's and the latency's backend)."""
        return self.states[0].served_by

    def _headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", self.output.content_type),
                   (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
                   (b"x-tts-pieces", str(len(self.states)).encode("ascii"))]
        if self.speed is not None:
            applied = applied_speed(self.states[0].api or "openai", self.speed)
            headers.append((b"x-tts-speed-applied",
                            b"false" if applied is None else f"{applied:g}".encode("ascii")))
        if self.states[0].served_by == CARTESIA:
            headers.append((b"x-tts-fallback", b"cartesia"))
        return headers

    def _launch(self, playing: int) -> None:
        """Start pieces while slots (split.parallel) and the window allow."""
        limit = min(len(self.states), playing + AHEAD * self.parallel)
        if not self._admitted:
            limit = 1   # the rest wait for the call to be admitted (see _on_backends)
        while self._running < self.parallel and len(self._tasks) < limit:
            state = self.states[len(self._tasks)]
            self._running += 1
            self._tasks.append(asyncio.get_running_loop().create_task(self._piece(state)))

    async def _piece(self, state: _PieceState) -> None:
        try:
            await self._synthesize(state)
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # a bug must not hang the call
            log.error("speech piece failed: %s", type(exc).__name__)
            state.error = SpeechFailure(500, f"the balancer failed ({type(exc).__name__})",
                                        "internal_error")
        finally:
            self._running -= 1
            self._changed.set()

    async def _synthesize(self, state: _PieceState) -> None:
        why = await self._on_backends(state)
        if why and not state.sent and self.fleet.fallback is not None:
            self._admitted = True
            await cartesia_piece(self.fleet, state, why, self._changed)

    async def _on_backends(self, state: _PieceState) -> str:
        """Serve the piece from the fleet; "" when done (or failed for good),
        else why the Cartesia fallback may take it (exchange's rules)."""
        cfg = self.fleet.config
        scheduler = self.fleet.scheduler
        attempts = max(1, cfg.retry.attempts)
        tried: set[str] = set()
        # A later piece is part of an answer under way: it waits at the head
        # of the queue (as a retry does), and as long as a backend may take
        # to answer, since timing out would cut audio the caller is playing.
        later = state is not self.states[0]
        queue_timeout = cfg.balancer.queue_timeout
        if later:
            queue_timeout = max(queue_timeout, cfg.timeouts.first_byte)
        for n in range(attempts):
            if n:
                self.fleet.counters.piece_retries += 1
            try:
                backend = await take_slot(scheduler, frozenset(tried), retry=later or n > 0,
                                          queue_timeout=queue_timeout,
                                          why_none=self.fleet.why_no_backend)
            except NoSlot as exc:
                reason = exc.reason + (f" (after {'; '.join(self.why)})" if self.why else "")
                state.error = SpeechFailure(503, reason, exc.why, retry_after=True)
                return fallback_reason(exc.why, cfg.cartesia.spillover)
            tried.add(backend.name)
            self.tried.append(backend.name)
            if not self._admitted:
                self._admitted = True       # the other pieces may start now
                self._changed.set()
            state.api = api_of(backend)
            state.served_by = backend.name
            attempt = Attempt(backend, scheduler, cfg.passive.statuses)
            self.fleet.counters.pieces += 1
            try:
                async for chunk in synthesize(state.api, backend, state.piece, self._timeouts,
                                              attempt.answered):
                    state.chunks.append(chunk)
                    self._changed.set()
                attempt.answered(200)
                state.done = True
                return ""
            except BackendStatus as exc:
                self.why.append(exc.message)
                if exc.status // 100 == 4:
                    # Checked here first, so the server's own refusal is the
                    # caller's error (404/405: a server that is not that API).
                    status = 502 if exc.status in (404, 405) else 400
                    state.error = SpeechFailure(status, exc.message, "backend_refused")
                    return ""
                state.error = SpeechFailure(502, exc.message, "backend_error")
            except BackendFailure as exc:
                attempt.failed(exc.kind, exc.reason)
                self.why.append(exc.reason)
                state.error = SpeechFailure(502 if "timeout" not in exc.kind else 504,
                                            exc.reason, exc.kind)
            finally:
                attempt.end()
            if state.sent:
                return ""       # the caller has some of it: no second try
            state.chunks.clear()
            if n + 1 < attempts:
                state.error = None
                await asyncio.sleep(cfg.retry.backoff_base * (2 ** n))
        return FALLBACK_FAILED
