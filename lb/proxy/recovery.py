"""What an exchange does when an attempt fails: retry elsewhere, or hand the
call to Cartesia, or answer the failure (the commit-point rules are in
`exchange`'s docstring).  A mixin of `Exchange`: the same object, its
recovery half kept in a module of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..scheduling.retry import DENIED_BODY_TOO_LARGE, DENIED_BUDGET, RETRYABLE_KINDS
from ..tts import translate
from ..tts.cartesia import CartesiaError
from .latency import FALLBACK_BACKEND
from .phases import BACKOFF, DONE, FALLBACK, FALLBACK_FAILED

log = logging.getLogger("lb")


class Recovery:
    """Retry and fallback, for `Exchange` (which has every attribute used here)."""
    __slots__ = ()

    # --- failures and retries

    def _fail(self, kind: str, status: int, reason: str) -> None:
        """The backend failed us: count it, then retry, answer, or break the response."""
        if self.phase == DONE:
            return
        backend = self.backend
        backend.record_failure(kind, reason, ends_attempt=self._open)
        self._open = False
        self.balancer.scheduler.failed(backend, local=True, reason=reason)
        if (not self.response_started and kind in RETRYABLE_KINDS
                and self._may_retry(reason)):
            self._drop_upstream()
            self._retry(status, reason, kind)
            return
        if not self.response_started and self._fall_back(status, reason, FALLBACK_FAILED):
            return
        self._abandon(status, reason)

    def _may_retry(self, reason: str) -> bool:
        """Is another attempt allowed?  Records why the failed one failed, and
        why there will be no retry when there is none."""
        self.why.append(reason)
        retry = self.balancer.retry
        if len(self.tried) >= retry.cfg.attempts or self.pinned is not None:
            return False
        if self.request.upgrade and self._sent_at:
            # The backend may have acted on it (a session opened): an upgrade
            # is retried only when it never went out (a connect failure).
            self.why.append("not retried: an upgrade request is never sent twice")
            return False
        if self._kept is None:
            retry.denied[DENIED_BODY_TOO_LARGE] += 1
            self.why.append(f"not retried: request body over retry.replay_max_bytes "
                            f"({retry.cfg.replay_max_bytes} bytes)")
            return False
        if not self._retrying and not retry.allows():
            retry.denied[DENIED_BUDGET] += 1
            self.why.append("not retried: retry budget spent (retry.budget_percent)")
            return False
        return True

    def _cannot_replay(self) -> None:
        self.balancer.retry.denied[DENIED_BODY_TOO_LARGE] += 1
        self.why.append(f"resend given up: request body grew over retry.replay_max_bytes "
                        f"({self.balancer.config.retry.replay_max_bytes} bytes)")
        status, reason = self._replay_failure
        self._abandon(status, reason)

    def _retry(self, status: int, reason: str, kind: str) -> None:
        retry = self.balancer.retry
        retry.retries += 1
        retry.by_reason[kind] += 1
        self._replay_failure = (status, reason)
        if not self._retrying:
            self._retrying = True
            retry.retrying += 1
        self._release_slot()
        self._pending.clear()
        self._pending_bytes = 0
        self._replaying = True
        self._race_ok = False
        self.phase = BACKOFF
        self._deadline.set(retry.backoff(len(self.tried)))

    # --- the Cartesia fallback

    def _fall_back(self, status: int, reason: str, why: str) -> bool:
        """Hand the call to Cartesia if it is a TTS call the fallback may take;
        True if this exchange is now answered that way (or refused for it)."""
        fallback = self.balancer.fallback
        if (fallback is None or self.kind is None or self.response_started
                or self.phase == DONE or self.request.method != b"POST"):
            return False
        if self._kept is None:
            self.why.append("no fallback: request body over retry.replay_max_bytes")
            return False
        self._drop_upstream()
        self._release_slot()
        self._quit_queue()
        self._deadline.cancel()
        if not fallback.client.usable:
            self._answer_error(503, f"{reason}; the Cartesia fallback is unusable: "
                               f"{fallback.client.unusable_reason}",
                               extra=[(b"retry-after", b"1")])
            return True
        self.balancer.fallbacks[why] += 1
        self._fallback = fallback   # kept: a reload may replace balancer.fallback meanwhile
        if self._retrying:
            # Its retries are over: it no longer counts against the retry budget.
            self._retrying = False
            self.balancer.retry.retrying -= 1
            self.balancer.retry.remember(self.request_id, 0, self.tried, self.why)
        self.phase = FALLBACK
        self.fallback_reason = reason
        self._replaying = True                 # the whole body is needed, as for a resend
        self._replay_failure = (status, reason)
        self._pending.clear()
        self._pending_bytes = 0
        self.client.resume_reading_for_backpressure()
        if self._request_ended:
            self._start_fallback()
        else:
            self._deadline.set(self.balancer.config.timeouts.idle)   # the rest of the body
        return True

    def _start_fallback(self) -> None:
        self._deadline.cancel()   # fallback.cartesia.timeout bounds it from here
        self._fallback_task = self.balancer.loop.create_task(self._serve_fallback())

    async def _serve_fallback(self) -> None:
        content_type = next((v.decode("latin-1") for k, v in self.request.headers
                             if k == b"content-type"), "")
        try:
            call = translate.read_call(self.kind, self.request.target.split(b"?", 1)[0]
                                       .decode("ascii", "replace"), content_type,
                                       b"".join(self._kept))
        except translate.BadRequest as exc:
            self._answer_error(400, f"{self.fallback_reason}; the call cannot be sent to "
                               f"Cartesia: {exc}")
            return
        self._kept = None
        self.served_by = FALLBACK_BACKEND
        try:
            await self._fallback.answer(call, _ToClient(self))
        except ClientStalled:
            if self.phase != DONE:
                self._abandon(504, f"client read nothing for "
                              f"{self.balancer.config.timeouts.idle:g}s")
            return
        except CartesiaError as exc:
            if self.phase == DONE:
                return
            reason = f"{self.fallback_reason}; fallback to Cartesia failed: {exc.reason}"
            if self.response_started:
                self.note = reason
                self._finish()
                self.client.abort_response()
            else:
                self._answer_error(503, reason, extra=[(b"retry-after", b"1")])
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # a bug must not leave the caller hanging
            # Only the type: a message from deep inside could quote the API key.
            log.error("fallback call %s failed: %s", self.request_id, type(exc).__name__)
            if self.phase != DONE:
                self._abandon(500, f"{self.fallback_reason}; the fallback failed "
                              f"({type(exc).__name__})")
            return
        if self.phase == DONE:
            return
        self.note = f"fallback: {self.fallback_reason}"
        self._finish()
        self.client.send_end()


class _ToClient:
    """The fallback's view of the client connection (see fallback.Output)."""
    __slots__ = ("exchange",)

    def __init__(self, exchange: "Recovery"):
        self.exchange = exchange

    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        ex = self.exchange
        ex.status = status
        ex.ttfb = time.monotonic() - ex.started
        ex.response_started = True
        ex.client.send_response(status, [*headers, (b"x-request-id",
                                                    ex.request_id.encode("ascii"))])

    def data(self, chunk: bytes) -> None:
        ex = self.exchange
        ex.bytes_out += len(chunk)
        ex.client.send_data(chunk)

    async def drained(self) -> None:
        """Wait while the client's write buffer is full, at most timeouts.idle."""
        ex = self.exchange
        if ex.client.write_paused and ex.phase != DONE:
            ex._drained = ex.balancer.loop.create_future()
            try:
                await asyncio.wait_for(ex._drained, ex.balancer.config.timeouts.idle)
            except asyncio.TimeoutError:
                raise ClientStalled() from None
            finally:
                ex._drained = None


class ClientStalled(Exception):
    """The caller stopped reading the fallback's answer."""
