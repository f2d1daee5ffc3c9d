"""Accepting client connections, with a hard cap that pauses accepting.

We accept on a non-blocking socket ourselves instead of using
loop.create_server(): that lets us stop watching the listening socket when
the connection cap (or the descriptor limit) is reached and start again the
moment a connection closes.  New connections then wait in the kernel's listen
backlog: no accept storm, no error to the client, and no fixed one-second
back-off like asyncio's own accept loop has on EMFILE.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from typing import Callable

log = logging.getLogger("lb")

ACCEPT_BATCH = 64         # accepts per readiness callback, to stay fair to other work
_FD_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_FD_RETRY = 0.05          # when out of descriptors with nothing open to wait for
BACKLOG = 65535           # listen backlog asked for; the kernel caps it at net.core.somaxconn


def open_socket(host: str, port: int, backlog: int, reuse_port: bool = False) -> socket.socket:
    """A listening socket; with `reuse_port`, one of several (one per worker)
    on the same port, among which the kernel spreads new connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def somaxconn() -> int | None:
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


class Listener:
    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol_factory: Callable[[], asyncio.Protocol], max_connections: int):
        self._loop = loop
        self._sock = sock
        self._factory = protocol_factory
        self.max_connections = max_connections
        self.open = 0              # accepted and not yet closed
        self.accepted = 0
        self.pauses = 0            # times accepting was paused
        self.paused = False
        self._retry: asyncio.TimerHandle | None = None
        self._last_log = {"pausing": 0.0, "resuming": 0.0}
        self._unlogged = {"pausing": 0, "resuming": 0}

    def start(self) -> None:
        self._loop.add_reader(self._sock.fileno(), self._on_readable)

    def close(self) -> None:
        if not self.paused:
            self._loop.remove_reader(self._sock.fileno())
        self.paused = True
        if self._retry is not None:
            self._retry.cancel()
        self._sock.close()

    def connection_closed(self) -> None:
        self.open -= 1
        if self.paused and self._retry is None and self.open < self.max_connections \
                and self._sock.fileno() != -1:
            self._resume()

    def _on_readable(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if self.open >= self.max_connections:
                self._pause(f"{self.open} connections open, at the cap "
                            f"({self.max_connections})")
                return
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _FD_EXHAUSTED:
                    self._pause(f"accept failed: {exc.strerror}")
                    # Normally a closing connection resumes us; if none is
                    # open, poll briefly instead.
                    if self.open == 0:
                        self._retry = self._loop.call_later(_FD_RETRY, self._retry_after_error)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # the client gave up while queued
                log.warning("accept failed: %s", exc)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.open += 1
            self.accepted += 1
            self._loop.create_task(self._attach(conn))

    async def _attach(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, sock=conn)
        except Exception as exc:  # never leak a slot of the cap
            log.warning("could not set up an accepted connection: %s", exc)
            conn.close()
            self.connection_closed()

    def _retry_after_error(self) -> None:
        self._retry = None
        self._resume()

    def _pause(self, why: str) -> None:
        if self.paused:
            return
        self.paused = True
        self.pauses += 1
        self._loop.remove_reader(self._sock.fileno())
        self._log("pausing", f"pausing accept: {why}")

    def _resume(self) -> None:
        self.paused = False
        self._loop.add_reader(self._sock.fileno(), self._on_readable)
        self._log("resuming", f"resuming accept: {self.open} connections open")

    def _log(self, kind: str, message: str) -> None:
        # At the cap accepting flips on and off with every closing connection;
        # say each kind at most once a second.
        now = time.monotonic()
        if now - self._last_log[kind] >= 1.0:
            skipped = self._unlogged[kind]
            suffix = f" ({skipped} similar messages suppressed)" if skipped else ""
            log.warning("%s%s", message, suffix)
            self._last_log[kind] = now
            self._unlogged[kind] = 0
        else:
            self._unlogged[kind] += 1
