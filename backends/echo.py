"""A small, controllable HTTP/1.1 origin server for tts-lb's data-plane tests and benchmark.

Run it:     python -m backends.echo --port 0 [--host 127.0.0.1] [--port-file PATH]
                                    [--status N] [--health ready|loading]
            (prints "listening on 127.0.0.1:PORT"; exits cleanly on SIGTERM/SIGINT;
            --status and --health set the initial mode, see /_mode; defaults 0 and ready)
In-process: backend = EchoBackend(); await backend.start("127.0.0.1", 0)  -> asyncio.Server
            (or `server = await serve(host, port, backend)`); then backend.port, backend.stats,
            backend.mode, await backend.stop().  EchoBackend(status=N, health=H) and
            BackendThread(status=N, health=H) set the initial mode.
            From synchronous code: `with BackendThread() as b: b.port`.

Endpoints (query-string parameters, any method; every response carries X-Backend-Port):
  /bytes?n=N&chunk=C         N bytes of PATTERN with Content-Length, written C bytes at a time
  /stream?chunks=K&size=S&delay=D   chunked audio/wav; chunk i is b"chunk-<i>|" + "." padding,
                             cut to exactly S bytes; sleeps D seconds between chunks
  /echo[?cl=1]               streams the request body back as it arrives (chunked, or with the
                             request's Content-Length when cl=1).  Full duplex with backpressure
                             both ways, so a client that sends everything before reading can
                             deadlock once the body outgrows the socket buffers: that is the point.
  /headers                   JSON: method, path (the raw request target, query included),
                             http_version, headers [[name, value]...], peer, body_bytes
  /status/NNN                status NNN (200-599) with JSON {"status": NNN}
  /slow?delay=D              200 "ok\\n" after D seconds     /hang   never answers
  /reset                     RST without answering          /close  FIN without answering
  /die-mid-body?after=N&chunked=1   200 head, N body bytes, then RST
  /health                    200 {"status":"healthy","model_loaded":true}; with health=loading
                             503 {"detail":"Model not loaded","status":"loading"} (a Chatterbox
                             GPU server that is up but still loading its model)
  /_mode?status=N&health=H   sets the failure mode; answers JSON {"status": N, "health": H}.
                             status=N (200-599): every request except /health and /_* is answered
                             at once (body drained) with N and JSON {"detail": "simulated
                             failure", "status": N}; status=0: off.  health=ready|loading sets
                             /health.  Bad or unknown parameters: 400 {"error": ...}, no change.
  /_stats, /_stats/reset     counters (see Stats; reset leaves the mode alone);
                             anything else: 200 "ok\\n"
While /slow, /stream or /hang waits, the server keeps reading, so a client hanging up (FIN or
RST) ends the request at once.  A client that half-closes its socket counts as gone.
"""
from __future__ import annotations

import argparse, asyncio, math, os, signal, socket, struct, sys, threading, traceback
from http import HTTPStatus
from urllib.parse import parse_qs

import h11
import orjson

READ_SIZE = 65536
PATTERN = b"0123456789abcdefghijklmnopqrstuvwxyz\n"  # odd length (37) shows shifted pieces
HANG_MAX = 3600.0         # even /hang gives up eventually: every wait here is bounded
LINGER = 2.0              # how long a graceful close waits for the client's FIN
MAX_REQUESTS_PER_CONN = 10**9
MAX_READS_PER_EVENT = 100_000  # h11 caps heads at 16 KiB: only a pathological peer gets here


def expected_bytes(n: int) -> bytes:
    """The body /bytes?n=N sends (for tests; this one does allocate n bytes)."""
    return (PATTERN * (n // len(PATTERN) + 1))[:n]


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


class Done(Exception):
    """This connection is over: the client went away, or we closed or aborted it on purpose."""


class BadParam(ValueError):
    pass


class Stats:
    """Counters served by /_stats.  Requests to /_stats* and /_mode are never counted, and
    neither is a connection that has carried nothing but those, so polling doesn't disturb them.
    Simulated failures (see Mode) and /health are ordinary requests: they count."""
    FIELDS = ("connections_open", "connections_total", "requests_in_flight", "requests_total",
              "max_requests_in_flight")

    def __init__(self):
        self.connections_open = self.requests_in_flight = self.epoch = 0
        self.reset()

    def reset(self):
        self.connections_total = self.requests_total = 0
        self.max_requests_in_flight = self.requests_in_flight  # 0 when idle; never below current
        self.epoch += 1  # lets uncount_conn tell whether this connection's +1 survived a reset

    def snapshot(self) -> dict:
        return {k: getattr(self, k) for k in self.FIELDS}

    def count_conn(self, c):
        c.counted, c.epoch = True, self.epoch
        self.connections_open += 1
        self.connections_total += 1

    def uncount_conn(self, c):
        if c.counted and not c.served:
            c.counted = False
            self.connections_open -= 1
            if c.epoch == self.epoch:
                self.connections_total -= 1

    def conn_closed(self, c):
        if c.counted:
            c.counted = False
            self.connections_open -= 1

    def request_started(self, c):
        if not c.counted:
            self.count_conn(c)
        c.served = c.in_flight = True
        self.requests_in_flight += 1
        self.requests_total += 1
        self.max_requests_in_flight = max(self.max_requests_in_flight, self.requests_in_flight)

    def request_done(self, c):
        if c.in_flight:
            c.in_flight = False
            self.requests_in_flight -= 1


HEALTH = {  # /health answers, as a Chatterbox GPU server gives them
    "ready": (200, {"status": "healthy", "model_loaded": True}),
    "loading": (503, {"detail": "Model not loaded", "status": "loading"}),  # up, model loading
}


def parse_status(text: str) -> int:
    """A failure status: 0 (off) or 200-599, in plain ASCII digits (int() alone would also take
    " 503", "5_03" or Arabic-Indic digits), else ValueError naming the parameter."""
    n = int(text) if text.isascii() and text.isdigit() and len(text) <= 3 else -1
    if n != 0 and not 200 <= n <= 599:
        raise ValueError(f"status={text!r}: want 0 or 200-599")
    return n


def check_health(text: str) -> str:
    if text not in HEALTH:
        raise ValueError(f"health={text!r}: want {' or '.join(HEALTH)}")
    return text


class Mode:
    """Failure knobs, set by /_mode or the command line.  Kept apart from Stats so that
    /_stats/reset between test phases does not heal a backend the test broke on purpose.
    status: 0, or the code every ordinary request gets at once; health: a key of HEALTH."""

    def __init__(self, status: int = 0, health: str = "ready"):
        self.status, self.health = parse_status(str(status)), check_health(health)

    def snapshot(self) -> dict:
        return {"status": self.status, "health": self.health}

    def update(self, q: dict[str, list[str]]):
        """Apply /_mode's parameters (parse_qs form): all of them or, on ValueError, none."""
        for name in q:
            if name not in ("status", "health"):  # a typo must not look like success
                raise ValueError(f"unknown parameter {name!r}: want status or health")
        status = parse_status(q["status"][-1]) if "status" in q else self.status
        health = check_health(q["health"][-1]) if "health" in q else self.health
        self.status, self.health = status, health

    def fails(self, path: str) -> bool:
        # Control paths stay usable so a test can always look at and repair a broken backend.
        return self.status != 0 and path != "/health" and not path.startswith("/_")


class EchoBackend:
    def __init__(self, status: int = 0, health: str = "ready"):
        self.stats = Stats()
        self.mode = Mode(status, health)
        self.port = 0
        self.server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
        self.server = await asyncio.start_server(self._on_connect, host, port, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.server

    async def stop(self):
        if self.server is None:
            return
        self.server.close()
        # Aborting the transports wakes every handler (they all await a read or a drain).
        for c in list(self._conns):
            c.writer.transport.abort()
        tasks = [c.task for c in self._conns]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2)
            for t in pending:
                t.cancel()
        await self.server.wait_closed()

    async def _on_connect(self, reader, writer):
        c = _Conn(self, reader, writer)
        self._conns.add(c)
        try:
            await c.run()
        except (Done, OSError):  # OSError covers resets, broken pipes and timeouts
            pass  # the client went away, or we ended the connection on purpose: not an error
        except asyncio.CancelledError:
            pass  # only stop() cancels us; returning normally keeps 3.11's stream callback quiet
        except Exception:
            traceback.print_exc()  # a bug in this server: make it loud
        finally:
            self.stats.request_done(c)
            self.stats.conn_closed(c)
            self._conns.discard(c)
            if not writer.transport.is_closing():
                writer.transport.abort()


async def serve(host: str = "127.0.0.1", port: int = 0, backend: EchoBackend | None = None):
    """Start serving; pass your own EchoBackend to read its .stats and .port."""
    return await (backend or EchoBackend()).start(host, port)


class _Conn:
    def __init__(self, backend: EchoBackend, reader, writer):
        self.backend, self.stats, self.reader, self.writer = backend, backend.stats, reader, writer
        self.task = asyncio.current_task()
        self.h = h11.Connection(h11.SERVER)
        peer = writer.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        self.counted = self.served = self.in_flight = self.no_body = False
        self.epoch, self.method = 0, b"GET"
        self.stats.count_conn(self)

    async def run(self):
        try:
            for _ in range(MAX_REQUESTS_PER_CONN):
                req = await self.next_event()
                if type(req) is h11.ConnectionClosed:
                    return
                await self.dispatch(req)
                while self.h.their_state is h11.SEND_BODY:  # skip any body the handler left unread
                    await self.next_event()
                if self.h.our_state is not h11.DONE or self.h.their_state is not h11.DONE:
                    break  # Connection: close, HTTP/1.0, ...
                self.h.start_next_cycle()
        except h11.RemoteProtocolError as e:
            if self.h.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                self.method = b"GET"
                await self.respond(e.error_status_hint, f"bad request: {e}\n".encode())
        await self.close_gracefully()

    async def next_event(self):
        for _ in range(MAX_READS_PER_EVENT):  # each pass reads more; at EOF h11 stops asking
            ev = self.h.next_event()
            if ev is not h11.NEED_DATA:
                return ev
            self.h.receive_data(await self.reader.read(READ_SIZE))
        raise h11.RemoteProtocolError("too many reads for one event", error_status_hint=400)

    async def dispatch(self, req: h11.Request):
        self.method = req.method
        path, _, query = req.target.decode("latin-1").partition("?")
        q = {k: v[-1] for k, v in parse_qs(query).items()}
        if path in ("/_stats", "/_stats/reset", "/_mode"):
            self.stats.uncount_conn(self)
            await self.read_body()
            if path == "/_mode":
                return await self.h_mode(query)
            if path == "/_stats/reset":
                self.stats.reset()
            return await self.respond_json(200, self.stats.snapshot())
        self.stats.request_started(self)
        try:
            if self.backend.mode.fails(path):
                return await self.h_fail(self.backend.mode.status)
            await self.route(req, path, q)
        except BadParam as e:
            if self.h.our_state is not h11.SEND_RESPONSE:
                raise Done from e  # cannot happen: handlers validate before answering
            await self.read_body()
            await self.respond(400, f"bad parameter: {e}\n".encode())
        finally:
            self.stats.request_done(self)

    async def route(self, req, path, q):
        if path == "/bytes":
            return await self.h_bytes(_num(q, "n", 0, int, 0, 1 << 50),
                                      _num(q, "chunk", 65536, int, 1, 4 << 20))
        if path == "/stream":
            return await self.h_stream(_num(q, "chunks", 1, int, 0, 10**6),
                                       _num(q, "size", 1024, int, 0, 16 << 20),
                                       _num(q, "delay", 0.0))
        if path == "/echo":
            return await self.h_echo(req, q.get("cl") == "1")
        if path == "/headers":
            n = await self.read_body()
            return await self.respond_json(200, {
                "method": req.method.decode("latin-1"), "path": req.target.decode("latin-1"),
                "http_version": req.http_version.decode("latin-1"),
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in req.headers],
                "peer": self.peer, "body_bytes": n})
        if path.startswith("/status/"):
            code = _num({"status": path[8:]}, "status", 0, int, 200, 599)
            await self.read_body()
            return await self.respond_json(code, {"status": code})
        if path == "/slow":
            delay = _num(q, "delay", 1.0)
            await self.read_body()
            await self.wait_or_gone(delay)
            return await self.respond(200, b"ok\n")
        if path == "/hang":  # discard input (never reused) until the client leaves
            await self.wait_or_gone(HANG_MAX, keep=False)
            await self.close_gracefully()
            raise Done
        if path == "/reset":
            self.rst()
            raise Done
        if path == "/close":
            await self.close_gracefully()
            raise Done
        if path == "/die-mid-body":
            return await self.h_die(_num(q, "after", 0, int, 0, 1 << 30),
                                    q.get("chunked", "1") != "0")
        if path == "/health":
            await self.read_body()
            return await self.respond_json(*HEALTH[self.backend.mode.health])
        await self.read_body()
        await self.respond(200, b"ok\n")

    async def h_mode(self, query):
        try:  # keep_blank_values: "status=" is a mistake to report, not a no-op
            self.backend.mode.update(parse_qs(query, keep_blank_values=True))
        except ValueError as e:
            return await self.respond_json(400, {"error": str(e)})
        await self.respond_json(200, self.backend.mode.snapshot())

    async def h_fail(self, status):
        await self.read_body()  # drained, not left unread: the connection stays reusable
        await self.respond_json(status, {"detail": "simulated failure", "status": status})

    async def h_bytes(self, n, chunk):
        await self.read_body()
        await self.send(self.head(200, [("content-type", "application/octet-stream"),
                                        ("content-length", str(n))]))
        # One chunk-sized window over the repeated pattern; slicing at offset % 37 keeps the
        # bytes continuous across chunks without ever holding n bytes.
        block = memoryview(PATTERN * (min(chunk, n) // len(PATTERN) + 2))
        for off in range(0, n, chunk):
            start = off % len(PATTERN)
            await self.send(h11.Data(data=block[start:start + min(chunk, n - off)]))
        await self.send(h11.EndOfMessage())

    async def h_stream(self, chunks, size, delay):
        await self.read_body()
        await self.send(self.head(200, [("content-type", "audio/wav")]))
        for i in range(chunks):
            prefix = b"chunk-%d|" % i
            await self.send(h11.Data(data=(prefix + b"." * (size - len(prefix)))[:size]))
            if i < chunks - 1 and delay > 0:
                await self.wait_or_gone(delay)
        await self.send(h11.EndOfMessage())

    async def h_echo(self, req, cl_mode):
        headers = [("content-type", "application/octet-stream")]
        if cl_mode:
            cl = next((v for k, v in req.headers if k == b"content-length"), None)
            if cl is None:
                raise BadParam("/echo?cl=1 needs a request with Content-Length")
            headers.append(("content-length", cl.decode()))
        await self.continue_100()
        await self.send(self.head(200, headers))
        while self.h.their_state is h11.SEND_BODY:  # one event per pass, ends at EndOfMessage
            ev = await self.next_event()
            if type(ev) is h11.Data:
                await self.send(h11.Data(data=ev.data))  # drains before we read more: backpressure
        await self.send(h11.EndOfMessage())

    async def h_die(self, n, chunked):
        # With n=0 a Content-Length of 0 would be a complete response, hence the floor of 1.
        headers = [] if chunked else [("content-length", str(max(10 * n, 1)))]
        await self.send(self.head(200, [("content-type", "application/octet-stream"), *headers]))
        for off in range(0, n, READ_SIZE):
            await self.send(h11.Data(data=expected_bytes(min(READ_SIZE, n - off))))
        # An RST throws away whatever is still queued, so first push everything to the kernel
        # (a zero high-water mark makes drain() wait for an empty buffer) and wait, briefly,
        # for the peer to acknowledge it.
        self.writer.transport.set_write_buffer_limits(0)
        await self.writer.drain()
        for _ in range(100):
            if _unacked_bytes(self.writer) == 0:
                break
            await asyncio.sleep(0.01)
        self.rst()
        raise Done

    def head(self, status, headers) -> h11.Response:
        self.no_body = self.method == b"HEAD" or status in (204, 304)
        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
        return h11.Response(status_code=status, reason=reason,
                            headers=[("x-backend-port", str(self.backend.port)), *headers])

    async def respond(self, status, body: bytes, ctype="text/plain"):
        headers = [] if status in (204, 304) else [("content-type", ctype),
                                                    ("content-length", str(len(body)))]
        await self.send(self.head(status, headers), h11.Data(data=body), h11.EndOfMessage())

    async def respond_json(self, status, obj):
        await self.respond(status, orjson.dumps(obj), "application/json")

    async def send(self, *events):
        """Write events in one go, then drain: the drain is what keeps memory bounded."""
        if self.writer.is_closing():
            raise Done  # writing to a dead transport would only log warnings
        out = []
        for ev in events:
            if type(ev) is h11.Data and (self.no_body or not ev.data):
                continue
            out += self.h.send_with_data_passthrough(ev)
        self.writer.write(b"".join(out))
        await self.writer.drain()

    async def continue_100(self):
        if self.h.they_are_waiting_for_100_continue:
            await self.send(h11.InformationalResponse(status_code=100, headers=[]))

    async def read_body(self) -> int:
        await self.continue_100()
        n = 0
        while self.h.their_state is h11.SEND_BODY:  # one event per pass, ends at EndOfMessage
            ev = await self.next_event()
            if type(ev) is h11.Data:
                n += len(ev.data)
        return n

    async def wait_or_gone(self, seconds, keep=True):
        """Sleep, but keep reading so we notice the client hanging up at once (-> Done).
        Pipelined bytes are handed to h11 (keep=True) up to 1 MiB, then we stop reading."""
        loop = asyncio.get_running_loop()
        deadline, fed = loop.time() + seconds, 0
        while (left := deadline - loop.time()) > 0:  # each pass reads, times out or raises
            if fed > 1 << 20:
                await asyncio.sleep(left)
                return
            try:
                data = await asyncio.wait_for(self.reader.read(READ_SIZE), left)
            except TimeoutError:
                return
            if not data:
                raise Done
            if keep:
                self.h.receive_data(data)
                fed += len(data)

    def rst(self):
        transport = self.writer.transport
        try:  # SO_LINGER (on, 0 s) turns close() into an RST
            transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, AttributeError):
            pass  # already closed: nothing left to reset
        transport.abort()

    async def close_gracefully(self):
        # Half-close, then read until the client's FIN: closing a socket that still has unread
        # input sends an RST, which can destroy a response the client has not read yet.
        try:
            if not self.writer.is_closing() and self.writer.can_write_eof():
                self.writer.write_eof()
                async with asyncio.timeout(LINGER):
                    while await self.reader.read(READ_SIZE):  # bounded by LINGER
                        pass
        except OSError:  # includes TimeoutError
            pass
        self.writer.close()


def _num(q, name, default, kind=float, lo=0, hi=HANG_MAX):
    """Query parameter `name` as `kind`, within [lo, hi] (floats: finite), else BadParam."""
    try:
        v = kind(q[name]) if name in q else default
    except ValueError:
        raise BadParam(f"{name}={q[name]!r}") from None
    if not (lo <= v <= hi) or (kind is float and not math.isfinite(v)):
        raise BadParam(f"{name}={v} out of range [{lo}, {hi}]")
    return v


def _unacked_bytes(writer) -> int:
    try:  # Linux TIOCOUTQ/SIOCOUTQ: bytes the peer has not acknowledged yet
        import fcntl, termios
        fd = writer.transport.get_extra_info("socket").fileno()
        return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (ImportError, OSError, AttributeError):
        return 0


class BackendThread:
    """Run an EchoBackend on its own event loop in a daemon thread, for synchronous tests:
    `with BackendThread() as b: http.client.HTTPConnection("127.0.0.1", b.port)`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **mode):
        self.backend, self._addr = EchoBackend(**mode), (host, port)  # mode: status=, health=
        self._ready, self._loop, self._error = threading.Event(), None, None

    port = property(lambda self: self.backend.port)
    stats = property(lambda self: self.backend.stats)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, name="echo-backend", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error:
            raise RuntimeError(f"echo backend did not start: {self._error!r}")
        return self

    def __exit__(self, *exc):
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self):
        async def main():
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            try:
                await self.backend.start(*self._addr)
            except OSError as e:
                self._error = e
                return
            finally:
                self._ready.set()
            await self._stop.wait()
            await self.backend.stop()

        with asyncio.Runner(loop_factory=_new_loop) as runner:
            runner.run(main())


async def _main(args):
    backend = EchoBackend(args.status, args.health)
    await backend.start(args.host, args.port)
    if args.port_file:  # write-then-rename so a reader never sees a partial file
        tmp = f"{args.port_file}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{backend.port}\n")
        os.replace(tmp, args.port_file)
    print(f"listening on {args.host}:{backend.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await backend.stop()


def _status_arg(text: str) -> int:
    try:  # ArgumentTypeError, unlike ValueError, puts our message in argparse's error
        return parse_status(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m backends.echo", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="0 picks a free port")
    p.add_argument("--port-file", help="write the bound port here (atomically)")
    p.add_argument("--status", type=_status_arg, default=0, metavar="N",
                   help="answer every ordinary request with N (200-599; default 0: off)")
    p.add_argument("--health", choices=tuple(HEALTH), default="ready",
                   help="what /health reports (default ready)")
    args = p.parse_args(argv)
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        runner.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
