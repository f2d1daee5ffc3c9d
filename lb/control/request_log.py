"""Counting and logging each request as it ends: the status counts, the
latency histograms and the access-log line.  A mixin of `Balancer` (which
has every attribute used here), kept in a module of its own.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from . import accesslog
from ..proxy.latency import NO_BACKEND_LABEL, OTHER_KIND
from ..wire.framing import Request

if TYPE_CHECKING:
    from ..proxy.exchange import Exchange


class RequestAccounting:
    __slots__ = ()

    def request_finished(self, exchange: "Exchange") -> None:
        """A proxied request ended: counted, timed (the balancer's own
        endpoints and refused requests are counted, not timed: a scrape every
        few seconds would swamp the latency of TTS calls), logged."""
        now = time.monotonic()
        backend = (exchange.served_by or
                   (exchange.backend.name if exchange.backend is not None else NO_BACKEND_LABEL))
        duration = now - exchange.started
        ttfb, status = exchange.ttfb, exchange.status
        first_byte = ttfb
        if ttfb is None and status != 499:
            # An answer the balancer made itself (a 503, a 502) goes out
            # whole as the request ends; a client that left first got no byte.
            first_byte = duration
        if status != 101:   # a tunnel's life is no request's latency
            self.latency.observe(backend, exchange.kind or OTHER_KIND, now, duration, first_byte,
                                 # a two-step audio GET never asks the scheduler
                                 exchange.queued_for if exchange.pinned is None else None)
        self._count(exchange.request, exchange.request_id, status, backend,
                    exchange.started, exchange.note, bytes_in=exchange.bytes_in,
                    bytes_out=exchange.bytes_out, ttfb=ttfb, tried=exchange.tried,
                    why=exchange.why, queued=exchange.queued_for, now=now, ended=exchange.ended)

    def _count(self, request: Request | None, request_id: str, status: int, backend: str,
               started: float, note: str, *, bytes_in: int = 0, bytes_out: int = 0,
               ttfb: float | None = None, tried: list[str] = (), why: list[str] = (),
               queued: float = 0.0, now: float | None = None, ended: str = "") -> None:
        self.requests_total += 1
        self.by_status[status] += 1
        if self._access:
            accesslog.logger.info(accesslog.line(
                request_id=request_id,
                method=request.method if request is not None else b"-",
                target=request.target if request is not None else b"-",
                status=status, backend=backend, bytes_in=bytes_in, bytes_out=bytes_out,
                ttfb=ttfb, total=(time.monotonic() if now is None else now) - started,
                note=note, tried=tried, why=why, queued=queued, ended=ended))
