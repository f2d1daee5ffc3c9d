"""The streams workload's two ends: a backend that streams timestamped chunks, and its client.

  python -m bench.streams serve [--port 0]
  python -m bench.streams client --port P [--streams 200] [--chunks 20] [--interval-ms 50]

The backend answers `GET /stream?chunks=N&interval_ms=MS&bytes=B` with a chunked body of N
chunks sent MS apart, like a TTS server streaming audio.  Each chunk is one record,
`<seq> <send time> <filler>\\n`, B bytes long, the send time being time.monotonic_ns() just
before the write.  CLOCK_MONOTONIC is system-wide on Linux, so a client on the same machine
(another process) can subtract it from its own clock when the record arrives: that is the
chunk's delay, with no clock sync needed.

The client opens --streams requests at once (spread over one interval, as independent TTS
calls would be, rather than all in phase), decodes the chunked framing itself and prints one
JSON object: every record's delay in ns and what went wrong.  It splits the *decoded* body
into records at the newlines, not at chunk boundaries, because a proxy may re-frame the
body (tts-lb does) and TCP may coalesce or split anything.  Everything is bounded: the
client gives up --timeout seconds after it started, the server stops on SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from urllib.parse import parse_qs, urlsplit

HOST = "127.0.0.1"
MAX_HEAD = 16384
MAX_CHUNKS, MAX_INTERVAL_MS, MAX_CHUNK_BYTES = 10_000, 10_000, 1 << 20
ERROR_SAMPLES = 5           # error messages kept verbatim; the rest are only counted


# --- the backend ---------------------------------------------------------------------------


def record(seq: int, chunk_bytes: int) -> bytes:
    """One chunk's payload: seq and send time, padded to chunk_bytes, ending in a newline."""
    head = b"%d %d " % (seq, time.monotonic_ns())
    return head + b"." * max(0, chunk_bytes - len(head) - 1) + b"\n"


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _parse_stream_query(target: bytes) -> tuple[int, float, int] | str:
    """(chunks, interval in s, bytes per chunk) from the request target, or what is wrong."""
    url = urlsplit(target.decode("latin-1"))
    if url.path != "/stream":
        return f"no such path {url.path!r}: use /stream?chunks=N&interval_ms=MS&bytes=B"
    query = parse_qs(url.query)
    values = {}
    for name, default, hi in (("chunks", 20, MAX_CHUNKS), ("interval_ms", 50, MAX_INTERVAL_MS),
                              ("bytes", 64, MAX_CHUNK_BYTES)):
        text = query.get(name, [str(default)])[-1]
        if not text.isdigit() or not 0 <= int(text) <= hi:
            return f"{name} must be a whole number from 0 to {hi}, got {text!r}"
        values[name] = int(text)
    return values["chunks"], values["interval_ms"] / 1e3, values["bytes"]


class StreamServer(asyncio.Protocol):
    """One connection: requests one after another (a proxy's pooled connection sends many),
    each answered with its stream before the next is read."""

    def __init__(self):
        self.transport = None
        self.buf = bytearray()
        self.timer: asyncio.TimerHandle | None = None
        self.busy = False
        self.close_after = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        if not self.busy:
            self._next_request()

    def connection_lost(self, exc):
        if self.timer is not None:
            self.timer.cancel()

    def _next_request(self):
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self._answer_error(431, "request head too large")
            return
        head = bytes(self.buf[:end])
        del self.buf[:end + 4]
        line, *header_lines = head.split(b"\r\n")
        parts = line.split(b" ")
        if len(parts) != 3 or parts[0] != b"GET":   # no bodies: anything else is refused
            self._answer_error(405 if len(parts) == 3 else 400, "only GET /stream")
            return
        self.close_after = any(h.lower().replace(b" ", b"") == b"connection:close"
                               for h in header_lines)
        wanted = _parse_stream_query(parts[1])
        if isinstance(wanted, str):
            self._answer_error(400 if "must be" in wanted else 404, wanted)
            return
        self.busy = True
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
        loop = asyncio.get_running_loop()
        self._send(0, *wanted, loop.time())

    def _send(self, seq: int, chunks: int, interval: float, chunk_bytes: int, t0: float):
        self.timer = None
        if self.transport.is_closing():
            return
        if seq < chunks:
            self.transport.write(_chunk(record(seq, chunk_bytes)))
            # scheduled from the stream's start, so that a late timer does not push every
            # later chunk back too
            self.timer = asyncio.get_running_loop().call_at(
                t0 + (seq + 1) * interval, self._send, seq + 1, chunks, interval, chunk_bytes, t0)
            return
        self.transport.write(b"0\r\n\r\n")
        self.busy = False
        if self.close_after:
            self.transport.close()
        elif self.buf:
            self._next_request()

    def _answer_error(self, status: int, message: str):
        body = json.dumps({"error": message}).encode() + b"\n"
        self.transport.write(b"HTTP/1.1 %d Error\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                             % (status, len(body), body))
        self.transport.close()


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(StreamServer, HOST, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bench.streams: listening on {HOST}:{server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()


# --- the client's parser (sans-io) ---------------------------------------------------------


class FramingError(Exception):
    pass


class ChunkedRecords:
    """Feed it a response's bytes as they come; it returns the complete records (the decoded
    body's lines, newline dropped) that each piece finished.  `done` once the last chunk and
    the trailers are in.  Only a 200 with Transfer-Encoding: chunked is accepted."""

    MAX_LINE = 4096

    def __init__(self):
        self.buf = bytearray()
        self.state = "head"
        self.left = 0            # bytes of the current chunk's data still to come
        self.pending = bytearray()   # body bytes after the last newline
        self.done = False

    def feed(self, data: bytes) -> list[bytes]:
        if self.done and data:
            raise FramingError(f"{len(data)} bytes after the end of the response")
        self.buf += data
        out: list[bytes] = []
        while not self.done:
            if self.state == "data":
                if not self.buf:
                    break
                take = min(self.left, len(self.buf))
                self._body(self.buf[:take], out)
                del self.buf[:take]
                self.left -= take
                if self.left == 0:
                    self.state = "data-end"
                continue
            if self.state == "head":
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > MAX_HEAD:
                        raise FramingError("response head over 16 KiB")
                    break
                self._head(bytes(self.buf[:end]))
                del self.buf[:end + 4]
                self.state = "size"
                continue
            line = self._line()
            if line is None:
                break
            if self.state == "data-end":
                if line:
                    raise FramingError(f"chunk data longer than its size line said: {line[:40]!r}")
                self.state = "size"
            elif self.state == "size":
                size_text = line.split(b";", 1)[0].strip()
                try:
                    self.left = int(size_text, 16)
                except ValueError:
                    raise FramingError(f"bad chunk size line {line[:40]!r}") from None
                if self.left < 0 or size_text.startswith((b"-", b"+", b"0x", b"0X")):
                    raise FramingError(f"bad chunk size line {line[:40]!r}")
                self.state = "data" if self.left else "trailers"
            elif self.state == "trailers" and not line:
                self.done = True
                if self.pending:
                    raise FramingError(f"body ends inside a record: {bytes(self.pending[:40])!r}")
                if self.buf:
                    raise FramingError(f"{len(self.buf)} bytes after the end of the response")
        return out

    def _line(self) -> bytes | None:
        end = self.buf.find(b"\r\n")
        if end < 0:
            if len(self.buf) > self.MAX_LINE:
                raise FramingError(f"a {self.state} line over {self.MAX_LINE} bytes")
            return None
        line = bytes(self.buf[:end])
        del self.buf[:end + 2]
        return line

    def _body(self, data: bytearray, out: list[bytes]) -> None:
        start = 0
        while (nl := data.find(b"\n", start)) >= 0:
            if self.pending:
                out.append(bytes(self.pending + data[start:nl]))
                self.pending.clear()
            else:
                out.append(bytes(data[start:nl]))
            start = nl + 1
        self.pending += data[start:]

    def _head(self, head: bytes) -> None:
        status_line, *lines = head.split(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise FramingError(f"not an HTTP/1.x status line: {status_line[:60]!r}")
        if parts[1] != b"200":
            raise FramingError(f"status {parts[1].decode('latin-1')}, expected 200")
        codings = []
        for line in lines:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"transfer-encoding":
                codings += [c.strip().lower() for c in value.split(b",")]
        if not codings or codings[-1] != b"chunked":
            raise FramingError("response is not chunked")


# --- the client ----------------------------------------------------------------------------


class StreamClient(asyncio.Protocol):
    """One request on its own connection; every record's delay noted as it completes."""

    def __init__(self, request: bytes, chunks: int, done: asyncio.Future):
        self.request, self.chunks, self.done = request, chunks, done
        self.parser = ChunkedRecords()
        self.delays: list[int] = []
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data):
        now = time.monotonic_ns()   # first thing: what the client's own parsing costs is not
        if self.done.done():        # the proxy's
            return
        try:
            for rec in self.parser.feed(data):
                seq, sent = rec.split(b" ", 2)[:2]
                if int(seq) != len(self.delays):
                    raise FramingError(f"record {int(seq)} arrived as number {len(self.delays)}")
                self.delays.append(now - int(sent))
        except (FramingError, ValueError) as exc:
            self._finish(f"{type(exc).__name__}: {exc}")
            return
        if self.parser.done:
            self._finish(None if len(self.delays) == self.chunks else
                         f"{len(self.delays)} records, expected {self.chunks}")

    def connection_lost(self, exc):
        if not self.done.done():
            self._finish(f"connection closed after {len(self.delays)} of {self.chunks} records"
                         + (f" ({exc})" if exc else ""))

    def _finish(self, error: str | None):
        if not self.done.done():
            self.done.set_result(error)
        self.transport.close()


async def run_streams(port: int, streams: int, chunks: int, interval_ms: int, chunk_bytes: int,
                      timeout: float) -> dict:
    """Open `streams` requests, spread over one interval, and wait for them all (at most
    `timeout` s in all).  Returns the delays in ns and the errors."""
    loop = asyncio.get_running_loop()
    request = (f"GET /stream?chunks={chunks}&interval_ms={interval_ms}&bytes={chunk_bytes} "
               f"HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n").encode()
    clients: list[StreamClient] = []
    errors: list[str] = []
    deadline = loop.time() + timeout

    async def one(k: int) -> str | None:
        await asyncio.sleep(k * interval_ms / 1e3 / streams)
        done = loop.create_future()
        try:
            _, client = await loop.create_connection(
                lambda: StreamClient(request, chunks, done), HOST, port)
        except OSError as exc:
            return f"connect: {exc}"
        clients.append(client)
        return await done

    tasks = [asyncio.ensure_future(one(k)) for k in range(streams)]
    finished, unfinished = await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
    for task in unfinished:
        task.cancel()
    for client in clients:
        if client.transport is not None:
            client.transport.close()
    errors = [t.result() for t in finished if t.result() is not None]
    errors += [f"stream not finished within {timeout:g} s"] * len(unfinished)
    delays = [d for c in clients for d in c.delays]
    return {"streams": streams, "chunks": chunks, "expected": streams * chunks,
            "received": len(delays), "errors": len(errors),
            "error_samples": sorted(set(errors))[:ERROR_SAMPLES], "delays_ns": delays}


def _new_loop() -> asyncio.AbstractEventLoop:
    try:   # uvloop, as the balancer runs on: its timers and syscalls are cheaper
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.streams",
                                description="The streams workload's backend and client.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="the backend")
    s.add_argument("--port", type=int, default=0)
    c = sub.add_parser("client", help="open the streams, print their delays as JSON")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--streams", type=int, default=200)
    c.add_argument("--chunks", type=int, default=20)
    c.add_argument("--interval-ms", type=int, default=50)
    c.add_argument("--chunk-bytes", type=int, default=2400)
    c.add_argument("--timeout", type=float, default=30.0, help="seconds for the whole round")
    args = p.parse_args(argv)
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        if args.command == "serve":
            runner.run(serve(args.port))
        else:
            result = runner.run(run_streams(args.port, args.streams, args.chunks,
                                            args.interval_ms, args.chunk_bytes, args.timeout))
            json.dump(result, sys.stdout)
            sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
