"""The tunnel and tcp workloads' backend: a raw TCP byte server on 127.0.0.1.

  python -m bench.bulk_server [--port 0]

A connection says first what it wants, one of two ways:

- an HTTP/1.1 upgrade request head, `GET /sink|/source|/echo HTTP/1.1` with
  `Connection: Upgrade` and `Upgrade: ...` (what a WebSocket client sends; the tunnel
  workload, through the balancer's HTTP listener): answered with a bare
  `101 Switching Protocols`, then the connection is the byte server of that mode;
- a line `sink\\n`, `source\\n` or `echo\\n` (plain TCP: the tcp workload, through a
  `[[tcp]]` listener or HAProxy mode tcp): no answer, the connection is that byte server.

The modes:
  sink    discards and counts every byte; at the client's EOF (half-close) it writes the
          count as `<bytes>\\n` and closes, so that the client knows how many arrived and when
  source  once the client sends one byte ("go": so that nothing is sent before the clock
          starts), writes bytes as fast as the connection takes them, until the client closes
  echo    writes back every byte it reads (for round-trip latency)

Anything else gets a 400 (or `GET /health` a 200) and is closed.  Everything is bounded: a
head is at most 16 KiB, a connection lives at most MAX_CONNECTION_SECONDS, the server stops
on SIGTERM/SIGINT.  uvloop when installed, as the balancer runs on.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys

HOST = "127.0.0.1"
MODES = (b"sink", b"source", b"echo")
MAX_HEAD = 16384
MAX_CONNECTION_SECONDS = 900.0   # a forgotten connection cannot keep a source going for ever
READ_BUFFER = 256 * 1024
SOURCE_BLOCK = bytes(range(256)) * 4096         # 1 MiB, written again and again
WRITE_HIGH = 1 << 20             # source: stop writing past this much buffered in userspace
FILL_WRITES = 16                 # source: writes per turn of the loop, at most

UPGRADE_ANSWER = (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                  b"Upgrade: bulk\r\n\r\n")
_REQUEST_LINE = re.compile(rb"([A-Z]+) (/[^ ]*) HTTP/1\.[01]")


def _answer(status: str, body: bytes) -> bytes:
    return (b"HTTP/1.1 %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (status.encode(), len(body), body))


def _upgrade_mode(head: bytes) -> bytes | str:
    """The mode an HTTP request head asks for, or the error answer's reason."""
    line, *header_lines = head.split(b"\r\n")
    m = _REQUEST_LINE.fullmatch(line)
    if not m:
        return "not an HTTP/1.x request line"
    headers: dict[bytes, bytes] = {}
    for h in header_lines:
        name, _, value = h.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    if m.group(1) == b"GET" and m.group(2) == b"/health":
        return "health"
    if b"upgrade" not in headers or b"upgrade" not in headers.get(b"connection", b""):
        return "only upgrade requests (Connection: Upgrade, Upgrade: ...)"
    mode = m.group(2).lstrip(b"/").split(b"?", 1)[0]
    if m.group(1) != b"GET" or mode not in MODES:
        return "GET /sink, /source or /echo"
    return mode


class BulkConnection(asyncio.BufferedProtocol):
    """One connection: its head (an upgrade request or a mode line), then its mode."""

    def __init__(self):
        self.buffer = bytearray(READ_BUFFER)
        self.view = memoryview(self.buffer)
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.mode: bytes | None = None
        self.count = 0            # sink: bytes after the head
        self.paused = False       # source: the transport's buffer is over WRITE_HIGH
        self.streaming = False    # source: the "go" byte came
        self.lifetime: asyncio.TimerHandle | None = None

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        self.lifetime = asyncio.get_running_loop().call_later(MAX_CONNECTION_SECONDS,
                                                              transport.close)

    def connection_lost(self, exc):
        self.streaming = False
        if self.lifetime is not None:
            self.lifetime.cancel()

    def get_buffer(self, sizehint):
        return self.view

    def buffer_updated(self, nbytes):
        if self.mode is None:
            self.head += self.view[:nbytes]
            self._read_head()
        else:
            self._body(self.view[:nbytes])

    def _read_head(self):
        if self.head[:1] != b"G":
            # a mode line: sink\n, source\n or echo\n (none starts with the G of GET)
            nl = self.head.find(b"\n")
            if nl < 0:
                if len(self.head) > 16 or not any(m.startswith(bytes(self.head)) for m in MODES):
                    self._refuse("400 Bad Request", "start with sink, source or echo and a "
                                 "newline, or an HTTP upgrade request")
                return
            mode = bytes(self.head[:nl]).rstrip(b"\r")
            if mode not in MODES:
                self._refuse("400 Bad Request", f"unknown mode {mode[:20]!r}")
                return
            self._start(mode, nl + 1)
            return
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > MAX_HEAD:
                self._refuse("431 Request Header Fields Too Large", "head over 16 KiB")
            return
        mode = _upgrade_mode(bytes(self.head[:end]))
        if mode == "health":
            self.transport.write(_answer("200 OK", b"ok\n"))
            self.transport.close()
        elif isinstance(mode, str):
            self._refuse("400 Bad Request", mode)
        else:
            self.transport.write(UPGRADE_ANSWER)
            self._start(mode, end + 4)

    def _start(self, mode: bytes, body_at: int):
        self.mode = mode
        rest = bytes(self.head[body_at:])
        self.head = bytearray()
        if rest:
            self._body(memoryview(rest))

    def _body(self, data: memoryview):
        if self.mode == b"sink":
            self.count += len(data)
        elif self.mode == b"echo":
            self.transport.write(bytes(data))
        elif not self.streaming:      # source: the first byte is "go"; the rest is ignored
            self.streaming = True
            self._fill()

    def eof_received(self):
        if self.mode == b"sink":
            self.transport.write(b"%d\n" % self.count)
        return False    # close (after what is buffered has been written)

    def _fill(self):
        # Bounded per turn: a transport whose kernel buffer never fills would otherwise
        # keep this loop (and the event loop) busy for ever.
        for _ in range(FILL_WRITES):
            if self.paused or not self.streaming or self.transport.is_closing():
                return
            self.transport.write(SOURCE_BLOCK)
        asyncio.get_running_loop().call_soon(self._fill)

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        if self.mode == b"source" and self.streaming:
            self._fill()

    def _refuse(self, status: str, why: str):
        self.transport.write(_answer(status, why.encode() + b"\n"))
        self.transport.close()


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(BulkConnection, HOST, port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bench.bulk_server: listening on {HOST}:{server.sockets[0].getsockname()[1]}",
          flush=True)
    await stop.wait()
    server.close()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bulk_server",
                                description="Byte sink, source and echo for bench.throughput's "
                                            "tunnel and tcp workloads.")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        runner.run(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
