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

import argparse, math, sys
from urllib.parse import parse_qs

import h11

from .plumbing import READ_SIZE, Conn, Done, Server, ServerThread, cli_parser, serve_until_signal

PATTERN = b"0123456789abcdefghijklmnopqrstuvwxyz\n"  # odd length (37) shows shifted pieces
HANG_MAX = 3600.0         # even /hang gives up eventually: every wait here is bounded


def expected_bytes(n: int) -> bytes:
    """The body /bytes?n=N sends (for tests; this one does allocate n bytes)."""
    return (PATTERN * (n // len(PATTERN) + 1))[:n]


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


class EchoBackend(Server):
    def __init__(self, status: int = 0, health: str = "ready"):
        super().__init__()  # start(host, port), stop(), .port, .server
        self.stats = Stats()
        self.mode = Mode(status, health)

    def new_conn(self, reader, writer) -> _Conn:
        return _Conn(self, reader, writer)

    def conn_ended(self, c: _Conn):
        self.stats.request_done(c)
        self.stats.conn_closed(c)


async def serve(host: str = "127.0.0.1", port: int = 0, backend: EchoBackend | None = None):
    """Start serving; pass your own EchoBackend to read its .stats and .port."""
    return await (backend or EchoBackend()).start(host, port)


class _Conn(Conn):
    def __init__(self, backend: EchoBackend, reader, writer):
        super().__init__(reader, writer)
        self.backend, self.stats = backend, backend.stats
        peer = writer.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        self.counted = self.served = self.in_flight = False
        self.epoch = 0
        self.stats.count_conn(self)

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
        await self.reset()  # pushes out what is queued, then the RST

    def head(self, status, headers) -> h11.Response:
        return super().head(status, [("x-backend-port", str(self.backend.port)), *headers])

    async def read_body(self) -> int:
        n = 0
        while (data := await self.body_data()) is not None:
            n += len(data)
        return n


def _num(q, name, default, kind=float, lo=0, hi=HANG_MAX):
    """Query parameter `name` as `kind`, within [lo, hi] (floats: finite), else BadParam."""
    try:
        v = kind(q[name]) if name in q else default
    except ValueError:
        raise BadParam(f"{name}={q[name]!r}") from None
    if not (lo <= v <= hi) or (kind is float and not math.isfinite(v)):
        raise BadParam(f"{name}={v} out of range [{lo}, {hi}]")
    return v


class BackendThread(ServerThread):
    """Run an EchoBackend on its own event loop in a daemon thread, for synchronous tests:
    `with BackendThread() as b: http.client.HTTPConnection("127.0.0.1", b.port)`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **mode):
        super().__init__(host, port, name="echo-backend", what="echo backend",
                         server=EchoBackend(**mode))  # mode: status=, health=

    backend = property(lambda self: self.server)


def _status_arg(text: str) -> int:
    try:  # ArgumentTypeError, unlike ValueError, puts our message in argparse's error
        return parse_status(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None):
    p = cli_parser("echo", __doc__)
    p.add_argument("--status", type=_status_arg, default=0, metavar="N",
                   help="answer every ordinary request with N (200-599; default 0: off)")
    p.add_argument("--health", choices=tuple(HEALTH), default="ready",
                   help="what /health reports (default ready)")
    args = p.parse_args(argv)
    serve_until_signal(lambda: EchoBackend(args.status, args.health), args)


if __name__ == "__main__":
    sys.exit(main())
