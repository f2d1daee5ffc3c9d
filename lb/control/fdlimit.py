"""File-descriptor budget: raise RLIMIT_NOFILE and size the connection cap.

Each proxied request holds two descriptors (client and backend), idle pooled
backend connections hold one each, and the process needs a few for itself
(stdio, the listening socket, the event loop's epoll and signal pipe, logs).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

# Descriptors kept back for the process itself and for short bursts
# (connections being closed, a log file reopened, DNS lookups).
RESERVE = 64


@dataclass(frozen=True)
class FdLimit:
    asked: int
    soft_before: int
    hard: int
    granted: int
    error: str = ""   # why the raise failed, if it did


def raise_nofile(asked: int) -> FdLimit:
    """Raise the soft limit towards `asked`, never above the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = asked if hard == resource.RLIM_INFINITY else min(asked, hard)
    target = max(target, soft) if soft != resource.RLIM_INFINITY else soft  # never lower it
    error = ""
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            error = str(exc)
    granted = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return FdLimit(asked=asked, soft_before=soft, hard=hard, granted=granted, error=error)


def connection_cap(granted: int, pooled_idle: int, configured: int) -> tuple[int, str]:
    """The client-connection cap and, if the configured one was lowered, why."""
    derived = max(1, (granted - RESERVE - pooled_idle) // 2)
    if configured == 0:
        return derived, ""
    if configured > derived:
        return derived, (f"limits.max_connections={configured} needs more descriptors than "
                         f"the {granted} granted; using {derived}")
    return configured, ""
