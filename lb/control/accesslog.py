"""The access log: one logfmt line per request, written when it ends."""

from __future__ import annotations

import logging
from typing import Sequence

logger = logging.getLogger("lb.access")


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def line(*, request_id: str, method: bytes, target: bytes, status: int, backend: str,
         bytes_in: int, bytes_out: int, ttfb: float | None, total: float, note: str,
         tried: Sequence[str] = (), why: Sequence[str] = (), queued: float = 0.0,
         ended: str = "") -> str:
    """`backend` is the one that answered (or was tried last); with retries,
    `attempts` and `tried` list every backend in order and `why` says what
    went wrong with each failed attempt; `queue_ms` is time spent waiting
    for a free slot; `ended` says why a tunnel (status 101) ended."""
    ttfb_ms = "-" if ttfb is None else f"{ttfb * 1000:.1f}"
    text = (f"rid={request_id} method={method.decode('ascii', 'replace')} "
            f"path={quote(target.decode('ascii', 'replace'))} status={status} "
            f"backend={backend} in={bytes_in} out={bytes_out} "
            f"ttfb_ms={ttfb_ms} total_ms={total * 1000:.1f}")
    if queued:
        text += f" queue_ms={queued * 1000:.1f}"
    if len(tried) > 1:
        text += f" attempts={len(tried)} tried={','.join(tried)}"
    if why:
        text += f" why={quote('; '.join(why))}"
    if ended:
        text += f" ended={ended}"
    return f"{text} note={quote(note)}" if note else text
