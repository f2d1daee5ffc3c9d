"""The HTTP/1.1 server shared by the simulated GPU TTS servers (on plumbing.py, like echo.py).

A kind (chatterbox.py, openai_tts.py, chattts.py) subclasses SimServer, lists ROUTES
(method, exact path or compiled regex, handler name) and writes handlers
`async def h_x(self, conn, req, **groups)`.  From here it gets:

  * keep-alive connections, pipelining, 100-continue; idle keep-alive connections are closed
    after `keepalive` seconds (uvicorn's default 5 s, which is what the real servers run on);
  * bodies read whole (JSON or forms) up to a limit; answers with Content-Length (respond*) or
    chunked (start_stream / send_data / end_stream), every write awaiting drain: backpressure;
  * HTTPError(status, body) raised by a handler becomes that answer, like FastAPI's;
  * conn.guard(awaitable): wait while reading the socket, so a client that leaves (FIN or RST)
    ends the request at once and frees its GPU share;
  * self.synthesis(conn): the GPU lifecycle of one synthesis (optional lock, admission, OOM
    crash, fault fate, counters), see Synthesis; with --blocking its GPU time blocks the
    whole server (see gpu.py);
  * the samples: self.voice (speech.py: espeak-ng saying the text, or the tone; --tone forces
    the tone) and s.render(text, n), begun before the GPU time so the two overlap;
  * crash(): every connection reset, the listening port closed, a restart after
    --restart-after seconds on the same port, then --load-time seconds of model loading;
  * control endpoints, never counted: GET /_stats, /_stats/reset (counters as JSON),
    /_mode?fail_rate=P&hang_rate=P&reset_rate=P (change the fault rates; answers them),
    /_crash (crash now, as an OOM would).

Run a kind: `python -m backends.<kind> --port 0` prints "audio: espeak-ng (real speech)" (or
"audio: tone (why)"), then "listening on HOST:PORT" once listening, and exits 0 on
SIGTERM/SIGINT.  In-process: `with SimThread(Kind, gpu=GPUOptions(...))
as t: t.port`, or `server = Kind(...); await server.start(host, port)`.
"""
from __future__ import annotations

import argparse
import asyncio
from contextlib import asynccontextmanager
from urllib.parse import parse_qs

import h11
import orjson

from . import plumbing
from .gpu import GPU, GPUOptions, OutOfMemory, add_arguments, options_from_args
from .plumbing import READ_SIZE, Done, ServerThread, cli_parser, serve_until_signal
from .simstats import Stats
from .speech import Renderer, Voice

KEEPALIVE = 5.0               # uvicorn's timeout_keep_alive
HANG_MAX = 3600.0             # even a hang gives up eventually: every wait here is bounded
MAX_BODY = 64 << 20
PIPELINE_MAX = 1 << 20        # bytes read ahead (and kept) while a request is being served


class SynthFailed(Exception):
    """The fate said this synthesis fails (the handler answers with its kind's 500)."""


class HTTPError(Exception):
    """Raised by a handler before it starts its answer: answered as status + JSON body."""

    def __init__(self, status: int, body, headers=(), ctype: str = "application/json"):
        super().__init__(status)
        self.status, self.body, self.headers, self.ctype = status, body, list(headers), ctype


class Request:
    __slots__ = ("method", "target", "path", "query", "headers")

    def __init__(self, ev: h11.Request):
        self.method = ev.method.decode("latin-1")
        self.target = ev.target.decode("latin-1")
        self.path, _, q = self.target.partition("?")
        self.query = {k: v[-1] for k, v in parse_qs(q, keep_blank_values=True).items()}
        self.headers = ev.headers

    def header(self, name: str) -> str | None:
        name = name.lower().encode("latin-1")
        for k, v in self.headers:
            if k == name:
                return v.decode("latin-1")
        return None


class Synthesis:
    """One synthesis on the GPU.  `fate` says how it ends; handlers set `outcome` when they
    end it on purpose (failed, hung, reset), else it is ok, or gone/crashed on an exception."""

    def __init__(self, server: "SimServer", conn: "Conn", job, fate):
        self.server, self.conn, self.job, self.fate = server, conn, job, fate
        self.outcome: str | None = None
        self._renders: list[asyncio.Future] = []

    async def compute(self, audio_seconds: float) -> None:
        """The GPU time for `audio_seconds` of audio, shared with the other jobs; ends early
        (Done) if the client leaves.  --blocking: the whole server waits it out."""
        gpu = self.server.gpu
        if self.server.opts.blocking:
            return gpu.compute_blocking(self.job, gpu.work_for(audio_seconds))
        await self.conn.guard(gpu.compute(self.job, gpu.work_for(audio_seconds)))

    def render(self, text: str, n_samples: int, offset: int = 0) -> asyncio.Future:
        """Start making the n samples saying `text` (await the result after the GPU time);
        one this synthesis ends without awaiting is cancelled."""
        fut = self.server.renderer.start(text, n_samples, offset)
        self._renders.append(fut)
        return fut

    def cancel_renders(self) -> None:
        for fut in self._renders:
            fut.cancel()

    async def hang(self) -> None:
        """Never answer: wait (holding the GPU memory) until the client leaves."""
        self.outcome = "hung"
        await self.conn.guard(asyncio.sleep(HANG_MAX))
        await self.conn.close_gracefully()
        raise Done

    async def whole(self, audio_seconds: float) -> None:
        """The work of an answer made in one go: hang, fail part-way (SynthFailed), or all."""
        if self.fate.hang:
            await self.hang()
        if self.fate.fail:
            await self.compute(audio_seconds * self.fate.point)
            self.outcome = "failed"
            raise SynthFailed
        await self.compute(audio_seconds)

    def cut_at(self, n: int) -> int | None:
        """With a reset fate: how many of n units (bytes or pieces) go out before the RST."""
        if not self.fate.reset:
            return None
        return min(int(n * self.fate.point), max(n - 1, 0))

    def fail_before(self, n: int) -> int | None:
        """With a fail fate: the piece (0..n-1) whose generation fails."""
        return min(int(n * self.fate.point), max(n - 1, 0)) if self.fate.fail else None

    async def send_whole(self, status: int, body: bytes, headers: list, chunked: bool = False):
        """Answer with `body` (Content-Length, or chunked in 64 KiB pieces), or with a reset
        fate cut it part-way with an RST."""
        conn = self.conn
        cut = self.cut_at(len(body))
        if chunked:
            await conn.send(conn.head(status, headers))
        else:
            await conn.send(conn.head(status, headers + [("content-length", str(len(body)))]))
        end, view = len(body) if cut is None else cut, memoryview(body)
        for off in range(0, end, READ_SIZE):
            await conn.send(h11.Data(data=view[off:min(off + READ_SIZE, end)]))
        if cut is not None:
            self.outcome = "reset"
            await conn.reset()
        await conn.send(h11.EndOfMessage())


class SimServer(plumbing.Server):
    kind = "sim"
    ROUTES: list = []
    GPU_DEFAULTS: dict = {}

    def __init__(self, gpu: GPUOptions | None = None, keepalive: float = KEEPALIVE):
        self.opts = gpu or GPUOptions(**self.GPU_DEFAULTS)
        self.gpu = GPU(self.opts)
        self.keepalive = keepalive
        self.stats = Stats()
        super().__init__()  # .port, .server
        self.host = "127.0.0.1"
        self.down = False
        self.loaded_at = 0.0
        self.lock: asyncio.Semaphore | None = None   # a kind that serialises sets this
        self.voice = Voice.choose(self.opts.tone, self.opts.chars_per_second)
        self.renderer = Renderer(self.voice, self.opts.blocking)
        self._restart_task: asyncio.Task | None = None
        self._stopping = False

    # --- life cycle -----------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        await super().start(host, port)
        self.loaded_at = asyncio.get_running_loop().time() + self.opts.load_time
        return self.server

    async def stop(self):
        self._stopping = True
        if self._restart_task is not None:
            self._restart_task.cancel()
        if self.server is not None:
            self.server.close()
        await self.end_conns()
        self.gpu.reset()
        if self.server is not None:
            await self.server.wait_closed()

    @property
    def ready(self) -> bool:
        return not self.down and asyncio.get_running_loop().time() >= self.loaded_at

    def loading_left(self) -> float:
        return max(0.0, self.loaded_at - asyncio.get_running_loop().time())

    def crash(self, reason: str) -> None:
        """The process dies: every connection is reset, the port closes, and the server comes
        back on the same port after restart_after seconds, loading its model for load_time."""
        if self.down or self._stopping:
            return
        self.down = True
        self.stats.crashes += 1
        print(f"crashed: {reason}; port {self.port} closed, restarting in "
              f"{self.opts.restart_after:g}s", flush=True)
        self.server.close()
        self.gpu.reset()
        me = asyncio.current_task()
        for c in list(self._conns):
            c.rst()
            if c.task is not me:
                c.task.cancel()
        self._restart_task = asyncio.create_task(self._restart())

    async def _restart(self):
        await asyncio.sleep(self.opts.restart_after)
        while True:
            try:
                self.server = await self.listen(self.host, self.port)
                break
            except OSError as e:
                print(f"restart: cannot listen on {self.host}:{self.port}: {e}; retrying",
                      flush=True)
                await asyncio.sleep(1.0)
        self.loaded_at = asyncio.get_running_loop().time() + self.opts.load_time
        self.down = False
        print(f"restarted: listening on {self.host}:{self.port}, loading the model for "
              f"{self.opts.load_time:g}s", flush=True)

    async def _on_connect(self, reader, writer):
        if self.down:  # accepted just before the crash closed the port
            writer.transport.abort()
            return
        await super()._on_connect(reader, writer)

    def new_conn(self, reader, writer) -> "Conn":
        return Conn(self, reader, writer)

    def conn_ended(self, c: "Conn"):
        self.stats.request_done(c)
        self.stats.conn_closed(c)

    # --- routing ----------------------------------------------------------------------------

    async def handle(self, conn: "Conn", req: Request):
        allowed = []
        for method, pattern, name in self.ROUTES:
            if isinstance(pattern, str):
                m = {} if req.path == pattern else None
            else:
                m = pattern.fullmatch(req.path)
                m = m.groupdict() if m else None
            if m is None:
                continue
            if method != req.method:
                allowed.append(method)
                continue
            return await getattr(self, name)(conn, req, **m)
        if allowed:
            raise HTTPError(405, {"detail": "Method Not Allowed"}, [("allow", ", ".join(allowed))])
        raise HTTPError(404, {"detail": "Not Found"})

    def not_ready_error(self) -> HTTPError:
        return HTTPError(503, {"detail": "Model not loaded"})

    def check_ready(self) -> None:
        if not self.ready:
            self.stats.synth_rejected += 1
            raise self.not_ready_error()

    # --- synthesis ---------------------------------------------------------------------------

    @asynccontextmanager
    async def synthesis(self, conn: "Conn"):
        loop = asyncio.get_running_loop()
        t0, crashes = loop.time(), self.stats.crashes
        self.stats.synth_started()
        job = s = None
        locked = False
        try:
            if self.lock is not None:
                await conn.acquire(self.lock)
                locked = True
            try:
                job = self.gpu.admit()
            except OutOfMemory as e:
                self.crash(str(e))
                raise Done from e
            s = Synthesis(self, conn, job, self.gpu.fate())
            yield s
            outcome = s.outcome or "ok"
        except BaseException:
            outcome = ((s and s.outcome) or
                       ("crashed" if self.stats.crashes != crashes or self.down else "gone"))
            raise
        finally:
            if s is not None:
                s.cancel_renders()
            if job is not None:
                self.gpu.release(job)
            if locked:
                self.lock.release()
            self.stats.synth_done({
                "outcome": outcome, "elapsed": round(loop.time() - t0, 4),
                "work": round(job.work, 4) if job else 0.0,
                "compute_time": round(job.compute_time, 4) if job else 0.0,
                "slowdown": round(job.slowdown, 4) if job else 1.0})

    # --- control ---------------------------------------------------------------------------

    async def control(self, conn: "Conn", req: Request):
        await conn.read_body()
        if req.path == "/_stats/reset":
            self.stats.reset()
            self.gpu.reset_counters()
        elif req.path == "/_mode":
            try:
                self._set_mode(req.query)
            except ValueError as e:
                return await conn.respond_json(400, {"error": str(e)})
            o = self.opts
            return await conn.respond_json(200, {"fail_rate": o.fail_rate, "hang_rate":
                                                 o.hang_rate, "reset_rate": o.reset_rate})
        elif req.path == "/_crash":
            self.crash("crash requested by /_crash")
            raise Done
        elif req.path != "/_stats":
            return await conn.respond_json(404, {"detail": "Not Found"})
        await conn.respond_json(200, self.snapshot())

    def _set_mode(self, q: dict):
        new = {}
        for name, value in q.items():
            if name not in ("fail_rate", "hang_rate", "reset_rate"):
                raise ValueError(f"unknown parameter {name!r}")
            try:
                new[name] = float(value)
            except ValueError:
                raise ValueError(f"{name}={value!r}: want a number") from None
            if not 0.0 <= new[name] <= 1.0:
                raise ValueError(f"{name}={value!r}: want 0..1")
        for name, value in new.items():
            setattr(self.opts, name, value)

    def snapshot(self) -> dict:
        return {"kind": self.kind, "port": self.port, "ready": self.ready,
                "loading_seconds_left": round(self.loading_left(), 3),
                **self.stats.snapshot(), **self.gpu.snapshot()}

    # --- command line ------------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        """Options of this kind, beyond the common and GPU ones."""

    @classmethod
    def from_args(cls, opts: GPUOptions, args: argparse.Namespace) -> "SimServer":
        return cls(opts, keepalive=args.keepalive)


class Conn(plumbing.Conn):
    def __init__(self, server: SimServer, reader, writer):
        super().__init__(reader, writer,
                         h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024))
        self.server, self.stats = server, server.stats
        self.counted = self.in_flight = False

    async def next_request(self):
        """The next request head, or None (close gracefully) when the client has closed or an
        idle keep-alive connection times out."""
        ev = self.h.next_event()
        if ev is h11.NEED_DATA:
            try:
                data = await asyncio.wait_for(self.reader.read(READ_SIZE), self.server.keepalive)
            except TimeoutError:
                return None
            self.h.receive_data(data)
            ev = await self.next_event()
        return None if type(ev) is h11.ConnectionClosed else ev

    async def bad_request(self, e: h11.RemoteProtocolError):
        await self.respond_json(e.error_status_hint, {"detail": f"bad request: {e}"})

    async def dispatch(self, ev: h11.Request):
        req = Request(ev)
        self.method = ev.method
        if req.path.startswith("/_"):
            return await self.server.control(self, req)
        self.stats.request_started(self)
        try:
            await self.server.handle(self, req)
        except HTTPError as e:
            if self.h.our_state is not h11.SEND_RESPONSE:
                raise Done from e  # an answer was already under way: cannot happen by design
            await self.read_body(MAX_BODY, discard=True)
            body = e.body if isinstance(e.body, bytes) else orjson.dumps(e.body)
            await self.respond(e.status, body, e.ctype, e.headers)
        finally:
            self.stats.request_done(self)

    # --- reading --------------------------------------------------------------------------

    async def read_body(self, limit: int = MAX_BODY, discard: bool = False) -> bytes:
        """The whole request body; over `limit` bytes: 413 (the rest is drained later)."""
        out, n = [], 0
        while (data := await self.body_data()) is not None:
            n += len(data)
            if discard:
                continue
            if n > limit:
                raise HTTPError(413, {"detail": f"Request body over {limit} bytes"})
            out.append(data)
        return b"".join(out)

    async def guard(self, aw):
        """Await `aw` while reading the socket: a client that leaves (FIN or RST) cancels it
        and raises Done at once.  Bytes read meanwhile (a pipelined request) go to h11, up to
        PIPELINE_MAX; past that we stop reading and just wait."""
        work = asyncio.ensure_future(aw)
        fed = 0
        try:
            while True:
                if fed > PIPELINE_MAX:
                    return await work
                read = asyncio.ensure_future(self.reader.read(READ_SIZE))
                try:
                    await asyncio.wait((work, read), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not read.done():  # let the read finish cancelling: a StreamReader
                        read.cancel()    # takes one reader at a time
                        await asyncio.wait((read,))
                if not read.cancelled():  # it may have got data just as we cancelled it
                    data = read.result()  # an OSError here: the client is gone
                    if not data:
                        raise Done
                    self.h.receive_data(data)
                    fed += len(data)
                if work.done():
                    return work.result()
        finally:
            if not work.done():
                work.cancel()

    async def acquire(self, sem: asyncio.Semaphore):
        """Take `sem`, giving up (Done) if the client leaves while it waits."""
        t = asyncio.ensure_future(sem.acquire())
        try:
            await self.guard(t)
        except BaseException:
            if t.done() and not t.cancelled() and t.exception() is None:
                sem.release()
            raise

    # --- writing --------------------------------------------------------------------------

    def head(self, status: int, headers) -> h11.Response:
        return super().head(status, [("x-backend-port", str(self.server.port)), *headers])

    async def start_stream(self, status: int, headers):
        """A chunked answer (no Content-Length): follow with send_data() and end_stream()."""
        await self.send(self.head(status, headers))

    async def send_data(self, data: bytes):
        await self.send(h11.Data(data=data))

    async def end_stream(self):
        await self.send(h11.EndOfMessage())

    async def abort_stream(self):
        """End a started answer early with a plain FIN and no last chunk, as uvicorn does when
        a streaming generator raises: the client sees an incomplete body."""
        await self.writer.drain()
        self.writer.close()
        raise Done


class SimThread(ServerThread):
    """Run a simulated server on its own event loop in a daemon thread, for synchronous tests:
    `with SimThread(ChatterboxServer, gpu=GPUOptions(load_time=0)) as t: t.port`.
    The server is built on that loop: cls(**kwargs)."""

    def __init__(self, cls, host: str = "127.0.0.1", port: int = 0, **kwargs):
        super().__init__(host, port, name=f"sim-{cls.kind}", what="simulated server",
                         make=lambda: cls(**kwargs))


def run_main(cls, module: str, doc: str, argv=None):
    p = cli_parser(module, doc)
    p.add_argument("--keepalive", type=float, default=KEEPALIVE, metavar="S",
                   help=f"close idle keep-alive connections after S seconds (default {KEEPALIVE:g}, "
                        f"uvicorn's)")
    add_arguments(p, **cls.GPU_DEFAULTS)
    cls.add_arguments(p)
    args = p.parse_args(argv)
    try:
        server = cls.from_args(options_from_args(args), args)
    except ValueError as e:
        p.error(str(e))
    print(f"audio: {server.voice.describe()}", flush=True)
    serve_until_signal(lambda: server, args)
    return 0
