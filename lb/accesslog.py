"""The access log: one logfmt line per request, written when it ends."""

from __future__ import annotations

import logging

logger = logging.getLogger("lb.access")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def line(*, request_id: str, method: bytes, target: bytes, status: int, backend: str,
         bytes_in: int, bytes_out: int, ttfb: float | None, total: float, note: str) -> str:
    ttfb_ms = "-" if ttfb is None else f"{ttfb * 1000:.1f}"
    text = (f"rid={request_id} method={method.decode('ascii', 'replace')} "
            f"path={_quote(target.decode('ascii', 'replace'))} status={status} "
            f"backend={backend} in={bytes_in} out={bytes_out} "
            f"ttfb_ms={ttfb_ms} total_ms={total * 1000:.1f}")
    return f"{text} note={_quote(note)}" if note else text
