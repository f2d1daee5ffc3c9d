"""Idle upstream connections for one backend, and opening new ones.

Idle connections are kept LIFO: the most recently used one is the warmest and
least likely to have been closed by the backend's keep-alive timer, and the
ones at the bottom age out.  An idle connection the backend closes removes
itself (connection_lost), so `acquire` never hands out a dead one it knows of.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from .upstream import UpstreamConnection


class UpstreamPool:
    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int, *,
                 max_idle: int, idle_timeout: float, connect_timeout: float,
                 make_connection: Callable[["UpstreamPool"], UpstreamConnection]):
        self._loop = loop
        self._host = host
        self._port = port
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._make_connection = make_connection
        self._idle: list[UpstreamConnection] = []
        self.opened = 0   # connections opened, ever
        self.reused = 0   # requests that went out on a pooled connection

    def acquire(self) -> UpstreamConnection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable:
                self.reused += 1
                return conn
        return None

    def release(self, conn: UpstreamConnection) -> None:
        """Take back a connection whose exchange finished cleanly."""
        if not conn.usable or len(self._idle) >= self._max_idle:
            conn.close()
            return
        conn.idle_since = self._loop.time()
        self._idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        """An idle connection closed under us: forget it."""
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    async def connect(self) -> UpstreamConnection:
        """Open a new connection; raises OSError or asyncio.TimeoutError."""
        _, conn = await asyncio.wait_for(
            self._loop.create_connection(lambda: self._make_connection(self),
                                         self._host, self._port),
            self._connect_timeout)
        self.opened += 1
        return conn

    def expire(self, now: float) -> None:
        """Close idle connections unused for longer than idle_timeout."""
        keep = [c for c in self._idle if now - c.idle_since < self._idle_timeout]
        if len(keep) != len(self._idle):
            for conn in self._idle:
                if now - conn.idle_since >= self._idle_timeout:
                    conn.close()
            self._idle = keep

    def close_all(self) -> None:
        """Close the idle connections, and any handed back from now on (the
        backend is gone: stopping, or removed by a reload)."""
        self._max_idle = 0
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def snapshot(self) -> dict:
        return {"idle": len(self._idle), "opened": self.opened, "reused": self.reused}
