"""The HTTP/1.1 plumbing shared by the simulated GPU TTS servers (asyncio + h11, like echo.py).

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
    crash, fault fate, counters), see Synthesis;
  * crash(): every connection reset, the listening port closed, a restart after
    --restart-after seconds on the same port, then --load-time seconds of model loading;
  * control endpoints, never counted: GET /_stats, /_stats/reset (counters as JSON),
    /_mode?fail_rate=P&hang_rate=P&reset_rate=P (change the fault rates; answers them),
    /_crash (crash now, as an OOM would).

Run a kind: `python -m backends.<kind> --port 0` prints "listening on HOST:PORT" once
listening and exits 0 on SIGTERM/SIGINT.  In-process: `with SimThread(Kind, gpu=GPUOptions(...))
as t: t.port`, or `server = Kind(...); await server.start(host, port)`.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import struct
import threading
import traceback
from collections import deque
from contextlib import asynccontextmanager
from http import HTTPStatus
from urllib.parse import parse_qs

import h11
import orjson

from .gpu import GPU, GPUOptions, OutOfMemory, add_arguments, options_from_args

READ_SIZE = 65536
KEEPALIVE = 5.0               # uvicorn's timeout_keep_alive
LINGER = 2.0                  # how long a graceful close waits for the client's FIN
HANG_MAX = 3600.0             # even a hang gives up eventually: every wait here is bounded
MAX_BODY = 64 << 20
MAX_READS_PER_EVENT = 100_000
MAX_REQUESTS_PER_CONN = 10**9
PIPELINE_MAX = 1 << 20        # bytes read ahead (and kept) while a request is being served
RECENT = 64                   # synthesis records kept for /_stats


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


class Done(Exception):
    """This connection is over: the client went away, or we closed or reset it on purpose."""


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


class Stats:
    """Counters for /_stats.  Ordinary requests: every request but /_* (health checks count).
    Synthesis: requests that passed validation and the loading check and went to the GPU
    (through the lock, if the kind has one); `outcomes` says how each ended: ok, failed (500),
    hung, reset, gone (the client left first) or crashed."""

    def __init__(self):
        self.connections_open = self.requests_in_flight = self.synth_in_flight = 0
        self.crashes = 0
        self.reset()

    def reset(self):
        self.connections_total = self.requests_total = self.synth_total = 0
        self.synth_rejected = self.crashes = 0
        self.max_requests_in_flight = self.requests_in_flight
        self.max_synth_in_flight = self.synth_in_flight
        self.max_slowdown = 0.0
        self.outcomes: dict[str, int] = {}
        self.recent: deque[dict] = deque(maxlen=RECENT)

    def request_started(self, c: "Conn"):
        if not c.counted:
            c.counted = True
            self.connections_open += 1
            self.connections_total += 1
        c.in_flight = True
        self.requests_in_flight += 1
        self.requests_total += 1
        self.max_requests_in_flight = max(self.max_requests_in_flight, self.requests_in_flight)

    def request_done(self, c: "Conn"):
        if c.in_flight:
            c.in_flight = False
            self.requests_in_flight -= 1

    def conn_closed(self, c: "Conn"):
        if c.counted:
            c.counted = False
            self.connections_open -= 1

    def synth_started(self):
        self.synth_in_flight += 1
        self.synth_total += 1
        self.max_synth_in_flight = max(self.max_synth_in_flight, self.synth_in_flight)

    def synth_done(self, record: dict):
        self.synth_in_flight -= 1
        self.outcomes[record["outcome"]] = self.outcomes.get(record["outcome"], 0) + 1
        if record["work"] > 0:
            self.max_slowdown = max(self.max_slowdown, record["slowdown"])
        self.recent.append(record)

    def snapshot(self) -> dict:
        return {"connections_open": self.connections_open,
                "connections_total": self.connections_total,
                "requests_in_flight": self.requests_in_flight,
                "max_requests_in_flight": self.max_requests_in_flight,
                "requests_total": self.requests_total,
                "synth_in_flight": self.synth_in_flight,
                "max_synth_in_flight": self.max_synth_in_flight,
                "synth_total": self.synth_total, "synth_rejected": self.synth_rejected,
                "outcomes": dict(self.outcomes), "crashes": self.crashes,
                "max_slowdown": round(self.max_slowdown, 4), "recent": list(self.recent)}


class Synthesis:
    """One synthesis on the GPU.  `fate` says how it ends; handlers set `outcome` when they
    end it on purpose (failed, hung, reset), else it is ok, or gone/crashed on an exception."""

    def __init__(self, server: "SimServer", conn: "Conn", job, fate):
        self.server, self.conn, self.job, self.fate = server, conn, job, fate
        self.outcome: str | None = None

    async def compute(self, audio_seconds: float) -> None:
        """The GPU time for `audio_seconds` of audio, shared with the other jobs; ends early
        (Done) if the client leaves."""
        gpu = self.server.gpu
        await self.conn.guard(gpu.compute(self.job, gpu.work_for(audio_seconds)))

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


class SimServer:
    kind = "sim"
    ROUTES: list = []
    GPU_DEFAULTS: dict = {}

    def __init__(self, gpu: GPUOptions | None = None, keepalive: float = KEEPALIVE):
        self.opts = gpu or GPUOptions(**self.GPU_DEFAULTS)
        self.gpu = GPU(self.opts)
        self.keepalive = keepalive
        self.stats = Stats()
        self.host, self.port = "127.0.0.1", 0
        self.server: asyncio.AbstractServer | None = None
        self.conns: set[Conn] = set()
        self.down = False
        self.loaded_at = 0.0
        self.lock: asyncio.Semaphore | None = None   # a kind that serialises sets this
        self._restart_task: asyncio.Task | None = None
        self._stopping = False

    # --- life cycle -----------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.server = await asyncio.start_server(self._on_connect, host, port, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        self.loaded_at = asyncio.get_running_loop().time() + self.opts.load_time
        return self.server

    async def stop(self):
        self._stopping = True
        if self._restart_task is not None:
            self._restart_task.cancel()
        if self.server is not None:
            self.server.close()
        for c in list(self.conns):
            c.writer.transport.abort()
        tasks = [c.task for c in self.conns]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2)
            for t in pending:
                t.cancel()
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
        for c in list(self.conns):
            c.rst()
            if c.task is not me:
                c.task.cancel()
        self._restart_task = asyncio.create_task(self._restart())

    async def _restart(self):
        await asyncio.sleep(self.opts.restart_after)
        while True:
            try:
                self.server = await asyncio.start_server(self._on_connect, self.host, self.port,
                                                         backlog=1024)
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
        c = Conn(self, reader, writer)
        self.conns.add(c)
        try:
            await c.run()
        except (Done, OSError):
            pass  # the client went away, or we ended the connection on purpose
        except asyncio.CancelledError:
            pass  # a crash or stop(); returning normally keeps 3.11's stream callback quiet
        except Exception:
            traceback.print_exc()  # a bug in this server: make it loud
        finally:
            self.stats.request_done(c)
            self.stats.conn_closed(c)
            self.conns.discard(c)
            if not writer.transport.is_closing():
                writer.transport.abort()

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


class Conn:
    def __init__(self, server: SimServer, reader, writer):
        self.server, self.stats, self.reader, self.writer = server, server.stats, reader, writer
        self.task = asyncio.current_task()
        self.h = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        self.counted = self.in_flight = self.no_body = False
        self.method = "GET"

    async def run(self):
        try:
            for _ in range(MAX_REQUESTS_PER_CONN):
                req = await self.next_request()
                if req is None or type(req) is h11.ConnectionClosed:
                    break
                await self.dispatch(req)
                while self.h.their_state is h11.SEND_BODY:  # skip a body the handler left
                    await self.next_event()
                if self.h.our_state is not h11.DONE or self.h.their_state is not h11.DONE:
                    break
                self.h.start_next_cycle()
        except h11.RemoteProtocolError as e:
            if self.h.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                self.method = "GET"
                await self.respond_json(e.error_status_hint, {"detail": f"bad request: {e}"})
        await self.close_gracefully()

    async def next_request(self):
        """The next request head, or None when an idle keep-alive connection times out."""
        ev = self.h.next_event()
        if ev is h11.NEED_DATA:
            try:
                data = await asyncio.wait_for(self.reader.read(READ_SIZE), self.server.keepalive)
            except TimeoutError:
                return None
            self.h.receive_data(data)
            return await self.next_event()
        return ev

    async def next_event(self):
        for _ in range(MAX_READS_PER_EVENT):  # each pass reads more; at EOF h11 stops asking
            ev = self.h.next_event()
            if ev is not h11.NEED_DATA:
                return ev
            self.h.receive_data(await self.reader.read(READ_SIZE))
        raise h11.RemoteProtocolError("too many reads for one event", error_status_hint=400)

    async def dispatch(self, ev: h11.Request):
        req = Request(ev)
        self.method = req.method
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
        if self.h.they_are_waiting_for_100_continue:
            await self.send(h11.InformationalResponse(status_code=100, headers=[]))
        out, n = [], 0
        while self.h.their_state is h11.SEND_BODY:
            ev = await self.next_event()
            if type(ev) is h11.Data:
                n += len(ev.data)
                if discard:
                    continue
                if n > limit:
                    raise HTTPError(413, {"detail": f"Request body over {limit} bytes"})
                out.append(ev.data)
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
        self.no_body = self.method == "HEAD" or status in (204, 304)
        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
        return h11.Response(status_code=status, reason=reason,
                            headers=[("x-backend-port", str(self.server.port)), *headers])

    async def send(self, *events):
        """Write the events in one go, then drain: the drain is what keeps memory bounded."""
        if self.writer.is_closing():
            raise Done  # writing to a dead transport would only log warnings
        out = []
        for ev in events:
            if type(ev) is h11.Data and (self.no_body or not ev.data):
                continue
            out += self.h.send_with_data_passthrough(ev)
        self.writer.write(b"".join(out))
        await self.writer.drain()

    async def respond(self, status: int, body: bytes, ctype: str = "application/json",
                      headers=()):
        hs = [] if status in (204, 304) else [("content-type", ctype),
                                               ("content-length", str(len(body)))]
        await self.send(self.head(status, [*hs, *headers]), h11.Data(data=body),
                        h11.EndOfMessage())

    async def respond_json(self, status: int, obj, headers=()):
        await self.respond(status, orjson.dumps(obj), "application/json", headers)

    async def start_stream(self, status: int, headers):
        """A chunked answer (no Content-Length): follow with send_data() and end_stream()."""
        await self.send(self.head(status, headers))

    async def send_data(self, data: bytes):
        await self.send(h11.Data(data=data))

    async def end_stream(self):
        await self.send(h11.EndOfMessage())

    async def reset(self):
        """Cut the answer with an RST.  An RST throws away whatever is still queued, so first
        push everything to the kernel and wait, briefly, for the peer to acknowledge it."""
        self.writer.transport.set_write_buffer_limits(0)
        await self.writer.drain()
        for _ in range(100):
            if _unacked_bytes(self.writer) == 0:
                break
            await asyncio.sleep(0.01)
        self.rst()
        raise Done

    async def abort_stream(self):
        """End a started answer early with a plain FIN and no last chunk, as uvicorn does when
        a streaming generator raises: the client sees an incomplete body."""
        await self.writer.drain()
        self.writer.close()
        raise Done

    def rst(self):
        transport = self.writer.transport
        try:  # SO_LINGER (on, 0 s) turns close() into an RST
            transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, AttributeError):
            pass  # already closed: nothing left to reset
        transport.abort()

    async def close_gracefully(self):
        # Half-close, then read until the client's FIN: closing with unread input sends an RST,
        # which can destroy an answer the client has not read yet.
        try:
            if not self.writer.is_closing() and self.writer.can_write_eof():
                self.writer.write_eof()
                async with asyncio.timeout(LINGER):
                    while await self.reader.read(READ_SIZE):  # bounded by LINGER
                        pass
        except OSError:  # includes TimeoutError
            pass
        self.writer.close()


def _unacked_bytes(writer) -> int:
    try:  # Linux TIOCOUTQ/SIOCOUTQ: bytes the peer has not acknowledged yet
        import fcntl, termios
        fd = writer.transport.get_extra_info("socket").fileno()
        return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (ImportError, OSError, AttributeError):
        return 0


class SimThread:
    """Run a simulated server on its own event loop in a daemon thread, for synchronous tests:
    `with SimThread(ChatterboxServer, gpu=GPUOptions(load_time=0)) as t: t.port`."""

    def __init__(self, cls, host: str = "127.0.0.1", port: int = 0, **kwargs):
        self._cls, self._kwargs, self._addr = cls, kwargs, (host, port)
        self.server: SimServer | None = None
        self._ready, self._loop, self._error = threading.Event(), None, None

    port = property(lambda self: self.server.port)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, name=f"sim-{self._cls.kind}",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error:
            raise RuntimeError(f"simulated server did not start: {self._error!r}")
        return self

    def __exit__(self, *exc):
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self):
        async def main():
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            try:
                self.server = self._cls(**self._kwargs)
                await self.server.start(*self._addr)
            except Exception as e:
                self._error = e
                return
            finally:
                self._ready.set()
            await self._stop.wait()
            await self.server.stop()

        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(main())


async def _serve(server: SimServer, args):
    await server.start(args.host, args.port)
    if args.port_file:  # write-then-rename so a reader never sees a partial file
        tmp = f"{args.port_file}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{server.port}\n")
        os.replace(tmp, args.port_file)
    print(f"listening on {args.host}:{server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def run_main(cls, module: str, doc: str, argv=None):
    p = argparse.ArgumentParser(prog=f"python -m backends.{module}",
                                description=doc.strip().splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="0 picks a free port")
    p.add_argument("--port-file", help="write the bound port here (atomically)")
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
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(_serve(server, args))
    return 0
