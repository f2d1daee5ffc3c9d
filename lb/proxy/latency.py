"""Latency you can alert on: Prometheus histograms since start for /metrics,
and percentiles over the last few minutes for /lb-stats.

Three things are timed for every proxied request (see Balancer.request_finished):

    duration     request head in -> the balancer is done with it
    first_byte   request head in -> the first response byte goes to the caller
    queue_wait   seconds spent in the queue, for requests that asked the
                 scheduler for a slot (0 for those that got one at once)

Histograms are kept per (backend, route kind), windows per backend.  The
bucket bounds are fixed, so an observation is one bisect into BOUNDS and a
few increments into lists made when the labels became known: nothing is
allocated per request.

The window is a ring of per-WINDOW_STEP bucket-count arrays covering
WINDOW_SPAN seconds: its memory is fixed whatever the traffic, and a slot is
cleared whole when its time comes round again, so the window holds between
WINDOW_SPAN - WINDOW_STEP and WINDOW_SPAN seconds of observations.
Percentiles are estimated from those counts as Prometheus's
histogram_quantile() does (linear within the bucket that holds the rank),
so /lb-stats and a dashboard on /metrics agree to the bucket.

Sans-io: every call that needs the time takes `now` (monotonic seconds).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Iterable, Iterator, Sequence

# Upper bounds (seconds) of the buckets, 5 ms to a minute; the last bucket
# (+Inf) holds what took longer.  A TTS call takes from ~50 ms (a short
# streamed sentence) to tens of seconds (a long text on a busy GPU).
BOUNDS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                             10.0, 30.0, 60.0)
NBUCKETS = len(BOUNDS) + 1

WINDOW_SPAN = 300.0    # seconds of history behind /lb-stats percentiles
WINDOW_STEP = 10.0     # seconds per ring slot: what the window forgets at once
QUANTILES = (0.5, 0.95, 0.99)

METRICS = ("duration", "first_byte", "queue_wait")

# Label values that are not a configured backend.  "-" cannot be a backend
# name (names start with a letter or digit) and is what the access log
# writes for the same requests.
NO_BACKEND_LABEL = "-"    # answered with no backend tried: queue full, queue timeout, none up
FALLBACK_BACKEND = "cartesia"   # answered by the Cartesia fallback
OTHER_KIND = "other"      # a request on no [[route]]


class Histogram:
    """Counts per bucket (not cumulative) and the sum of what was observed."""
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * NBUCKETS
        self.sum = 0.0

    def observe(self, value: float) -> int:
        """Count `value`; returns its bucket's index (for a Window)."""
        # bisect_left: a value equal to a bound belongs to that bound's
        # bucket, as Prometheus's `le` (less than or equal) says.
        index = bisect_left(BOUNDS, value)
        self.counts[index] += 1
        self.sum += value
        return index

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[int]:
        """What the `_bucket{le=...}` samples say: counts up to each bound, +Inf last."""
        out, seen = [], 0
        for n in self.counts:
            seen += n
            out.append(seen)
        return out


class Window:
    """Bucket counts of the last `span` seconds of `series` metrics side by
    side (see the module's docstring): one time check serves all of them."""
    __slots__ = ("step", "_ring", "_stamps", "_epoch", "_current")

    def __init__(self, span: float = WINDOW_SPAN, step: float = WINDOW_STEP,
                 series: int = 1) -> None:
        slots = max(1, round(span / step))
        self.step = step
        # ring[slot][series][bucket]; every list is made here, once.
        self._ring = [[[0] * NBUCKETS for _ in range(series)] for _ in range(slots)]
        self._stamps: list[int | None] = [None] * slots   # the step number each slot holds
        self._epoch: int | None = None                     # the step `_current` is for
        self._current = self._ring[0]

    @property
    def span(self) -> float:
        return self.step * len(self._ring)

    def slot(self, now: float) -> list[list[int]]:
        """The bucket counts (one list per series) to add to at `now`, which
        is never earlier than the last call's."""
        epoch = int(now // self.step)
        if epoch != self._epoch:
            self._turn(epoch)
        return self._current

    def add(self, index: int, now: float, series: int = 0) -> None:
        self.slot(now)[series][index] += 1

    def _turn(self, epoch: int) -> None:
        slot = epoch % len(self._ring)
        if self._stamps[slot] != epoch:
            for counts in self._ring[slot]:
                for i in range(NBUCKETS):   # cleared in place
                    counts[i] = 0
            self._stamps[slot] = epoch
        self._epoch = epoch
        self._current = self._ring[slot]

    def counts(self, now: float, series: int = 0) -> list[int]:
        """One series' bucket counts over the slots still inside the window at `now`."""
        epoch = int(now // self.step)
        oldest = epoch - len(self._ring)
        out = [0] * NBUCKETS
        for stamp, slot in zip(self._stamps, self._ring):
            if stamp is not None and oldest < stamp <= epoch:
                for i, n in enumerate(slot[series]):
                    out[i] += n
        return out


def quantile(counts: Sequence[int], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) estimated from non-cumulative bucket
    counts, as histogram_quantile() does: the bucket holding rank q*n, and a
    linear guess inside it (from 0 for the first bucket); in the +Inf bucket,
    the last bound.  None when nothing was counted."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i == len(BOUNDS):
                return BOUNDS[-1]
            lower = BOUNDS[i - 1] if i else 0.0
            upper = BOUNDS[i]
            return min(upper, lower + (upper - lower) * (rank - seen) / n)
        seen += n
    return BOUNDS[-1]   # not reached: rank <= total


def summary(counts: Sequence[int]) -> dict:
    """{"count": n, "p50": s, "p95": s, "p99": s} (None while nothing was counted)."""
    out: dict = {"count": sum(counts)}
    for q in QUANTILES:
        value = quantile(counts, q)
        out[f"p{round(q * 100)}"] = None if value is None else round(value, 4)
    return out


class Series:
    """The three histograms of one (backend, kind), and its backend's window
    (all the backend's kinds together; one series per METRICS entry)."""
    __slots__ = ("duration", "first_byte", "queue_wait", "window")

    def __init__(self, window: Window) -> None:
        self.duration = Histogram()
        self.first_byte = Histogram()
        self.queue_wait = Histogram()
        self.window = window


class LatencyBook:
    """Every series the balancer reports, made when their labels become known."""

    def __init__(self, backends: Iterable[str], kinds: Iterable[str], *,
                 span: float = WINDOW_SPAN, step: float = WINDOW_STEP) -> None:
        self.span, self.step = span, step
        self._windows: dict[str, Window] = {}
        self._series: dict[str, dict[str, Series]] = {}
        self.relabel(backends, kinds)

    def _window(self) -> Window:
        return Window(self.span, self.step, series=len(METRICS))

    def relabel(self, backends: Iterable[str], kinds: Iterable[str]) -> None:
        """A reload: series of the labels still known keep their counts (Prometheus
        counters must not go back), new ones start at 0, the others go."""
        kinds = list(dict.fromkeys(kinds))
        windows: dict[str, Window] = {}
        series: dict[str, dict[str, Series]] = {}
        for backend in dict.fromkeys(backends):
            window = windows[backend] = self._windows.get(backend) or self._window()
            old = self._series.get(backend, {})
            series[backend] = {kind: old.get(kind) or Series(window) for kind in kinds}
        self._windows, self._series = windows, series

    def observe(self, backend: str, kind: str, now: float, duration: float,
                first_byte: float | None, queue_wait: float | None) -> None:
        """One finished request; None: that part did not happen (no byte was
        sent; the request never asked the scheduler).  Runs for every
        request: two dict look-ups, one time check, a bisect and three
        increments per metric."""
        by_kind = self._series.get(backend)
        series = None if by_kind is None else by_kind.get(kind)
        if series is None:
            series = self._add(backend, kind)
        slot = series.window.slot(now)   # in METRICS order
        slot[0][series.duration.observe(duration)] += 1
        if first_byte is not None:
            slot[1][series.first_byte.observe(first_byte)] += 1
        if queue_wait is not None:
            slot[2][series.queue_wait.observe(queue_wait)] += 1

    def _add(self, backend: str, kind: str) -> Series:
        """Labels not made at start or reload (a request to a backend a reload
        removed finished after it): made now, and kept until the next reload."""
        window = self._windows.get(backend)
        if window is None:
            window = self._windows[backend] = self._window()
        series = self._series.setdefault(backend, {})[kind] = Series(window)
        return series

    def series(self) -> Iterator[tuple[str, str, Series]]:
        for backend, by_kind in self._series.items():
            for kind, series in by_kind.items():
                yield backend, kind, series

    def snapshot(self, now: float) -> dict:
        """Per backend, each metric's count and percentiles over the window."""
        return {
            "window_s": self.span,
            "step_s": self.step,
            "estimate": "from bucket counts over the window, as Prometheus "
                        "histogram_quantile() does",
            "backends": {backend: {metric: summary(window.counts(now, i))
                                   for i, metric in enumerate(METRICS)}
                         for backend, window in self._windows.items()},
        }
