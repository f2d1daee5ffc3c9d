"""One HTTP/1.1 request to a GPU server, for the OpenAI front door: the
balancer is the client here (it makes the Chatterbox, ChatTTS or OpenAI-style
call itself and reads the audio), not a proxy of the caller's bytes.

One connection a request, closed after it: these calls last seconds, and a
Chatterbox two-step call's second request must not wait behind nothing.
Every wait is bounded (timeouts.connect, first_byte, idle) and a failure is
a BackendFailure whose `kind` is one of the proxy's failure kinds
(retry.RETRYABLE_KINDS), so passive health counts it the same way.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import h11

READ_SIZE = 65536


class BackendFailure(Exception):
    """The server failed the call: `kind` for health and retries, `reason` for people."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


class BackendResponse:
    """A response head, and its body to read."""

    def __init__(self, name: str, status: int, headers: dict[str, str], conn: h11.Connection,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter, idle: float):
        self.name = name
        self.status = status
        self.headers = headers
        self._conn, self._reader, self._writer, self._idle = conn, reader, writer, idle

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives."""
        while True:
            event = await _next_event(self.name, self._conn, self._reader, self._idle,
                                      "idle_timeout", "in the middle of the response")
            if isinstance(event, h11.Data):
                if event.data:
                    yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            elif isinstance(event, h11.ConnectionClosed):
                raise BackendFailure("reset", f"backend {self.name} closed the connection "
                                     "in the middle of the response")

    async def read(self, limit: int) -> bytes:
        """The whole body, at most `limit` bytes (more is a failure)."""
        out = bytearray()
        async for chunk in self.chunks():
            out += chunk
            if len(out) > limit:
                raise BackendFailure("bad_response", f"backend {self.name} answered "
                                     f"more than {limit} bytes where a short answer was due")
        return bytes(out)

    def close(self) -> None:
        self._writer.transport.abort()


async def request(backend, method: str, path: str, body: bytes, content_type: str, *,
                  connect: float, first_byte: float, idle: float,
                  max_head: int) -> BackendResponse:
    """Send one request to `backend` (a scheduling.Backend) and read its head."""
    name = backend.name
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(backend.cfg.host, backend.cfg.port), connect)
    except asyncio.TimeoutError:
        raise BackendFailure("connect_timeout", f"backend {name} did not accept a connection "
                             f"within {connect:g}s") from None
    except OSError as exc:
        raise BackendFailure("connect", f"cannot connect to backend {name}: "
                             f"{exc.strerror or exc}") from None
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head)
    headers = [("host", backend.host_header.decode("ascii")), ("user-agent", "tts-lb"),
               ("connection", "close"), ("content-length", str(len(body)))]
    if content_type:
        headers.append(("content-type", content_type))
    try:
        writer.write(conn.send(h11.Request(method=method, target=path, headers=headers)))
        if body:
            writer.write(conn.send(h11.Data(data=body)))
        writer.write(conn.send(h11.EndOfMessage()))
        while True:
            event = await _next_event(name, conn, reader, first_byte, "first_byte_timeout",
                                      "before answering")
            if isinstance(event, h11.Response):
                break
            if isinstance(event, h11.ConnectionClosed):
                raise BackendFailure("reset", f"backend {name} closed the connection "
                                     "without answering")
    except BaseException:
        writer.transport.abort()
        raise
    fields = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
    return BackendResponse(name, event.status_code, fields, conn, reader, writer, idle)


async def _next_event(name: str, conn: h11.Connection, reader: asyncio.StreamReader,
                      timeout: float, timeout_kind: str, when: str):
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise BackendFailure("bad_response", f"backend {name} sent an invalid "
                                 f"response: {str(exc)[:120]}") from None
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await asyncio.wait_for(reader.read(READ_SIZE), timeout)
        except asyncio.TimeoutError:
            raise BackendFailure(timeout_kind, f"backend {name} sent nothing for "
                                 f"{timeout:g}s {when}") from None
        except OSError as exc:
            raise BackendFailure("reset", f"backend {name} connection failed: "
                                 f"{exc.strerror or type(exc).__name__}") from None
        conn.receive_data(data)
