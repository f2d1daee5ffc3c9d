"""What a client connection needs from the layers above it (the wire layer
imports nothing from them: the balancer and the exchange fill these in)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from .framing import Request

if TYPE_CHECKING:
    from .client import ClientConnection


class Handler(Protocol):
    """What a request's handler (the exchange, or a built-in endpoint) hears."""
    keeps_time: bool    # it bounds the request itself; else timeouts.idle does

    def client_data(self, data: bytes) -> None: ...
    def client_end(self, trailers: list) -> None: ...
    def client_bad_body(self, reason: str) -> None: ...
    def client_lost(self) -> None: ...
    def client_write_paused(self) -> None: ...
    def client_write_resumed(self) -> None: ...


class App(Protocol):
    """What a client connection needs from the balancer above it."""
    loop: asyncio.AbstractEventLoop
    draining: bool

    def open_request(self, conn: "ClientConnection", request: Request) -> Handler: ...
    def reject(self, conn: "ClientConnection", request: Request | None, request_id: str,
               status: int, reason: str) -> None: ...
    def connection_opened(self, conn: "ClientConnection") -> None: ...
    def connection_closed(self, conn: "ClientConnection") -> None: ...
