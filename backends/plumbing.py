"""The plumbing shared by the simulated servers (echo.py, cartesia.py, simserver.py's kinds).

  * Server and Conn: an asyncio + h11 server's life cycle (start, stop, one task per
    connection) and a connection's request loop, reads, writes (every write awaits drain:
    backpressure), waits that notice a client leaving, RST and graceful close.  A server
    subclasses Server and writes new_conn(); its Conn subclass writes dispatch(req).
  * ServerThread: a server on its own event loop in a daemon thread, for synchronous tests.
  * cli_parser() and serve_until_signal(): the `python -m backends.<name>` command line
    (--host, --port, --port-file; prints "listening on HOST:PORT" once listening, exits on
    SIGTERM/SIGINT).
"""
from __future__ import annotations

import argparse, asyncio, os, signal, socket, struct, threading, traceback
from http import HTTPStatus

import h11
import orjson

READ_SIZE = 65536
LINGER = 2.0                  # how long a graceful close waits for the client's FIN
MAX_REQUESTS_PER_CONN = 10**9
MAX_READS_PER_EVENT = 100_000  # h11 caps heads at 16 KiB: only a pathological peer gets here


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


class Done(Exception):
    """This connection is over: the client went away, or we closed or reset it on purpose."""


class Server:
    """Listens, runs one new_conn(reader, writer) per connection, and stops."""
    ssl = None  # an ssl.SSLContext serves HTTPS

    def __init__(self):
        self.port = 0
        self.server: asyncio.Server | None = None
        self._conns: set[Conn] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
        self.server = await self.listen(host, port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.server

    async def listen(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._on_connect, host, port, backlog=1024,
                                          ssl=self.ssl,
                                          ssl_handshake_timeout=10 if self.ssl else None)

    async def stop(self):
        if self.server is None:
            return
        self.server.close()
        await self.end_conns()
        await self.server.wait_closed()

    async def end_conns(self):
        # Aborting the transports wakes every handler (they all await a read or a drain).
        for c in list(self._conns):
            c.writer.transport.abort()
        tasks = [c.task for c in self._conns]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2)
            for t in pending:
                t.cancel()

    def new_conn(self, reader, writer) -> Conn:
        raise NotImplementedError

    def conn_ended(self, c: Conn):
        """Settle c's counters: it is over, however it ended."""

    async def _on_connect(self, reader, writer):
        c = self.new_conn(reader, writer)
        self._conns.add(c)
        try:
            await c.run()
        except (Done, OSError):  # resets, broken pipes, timeouts, TLS errors
            pass  # the client went away, or we ended the connection on purpose: not an error
        except asyncio.CancelledError:  # only stop() (or a simulated crash) cancels us:
            pass  # returning normally keeps 3.11's stream callback quiet
        except Exception:
            traceback.print_exc()  # a bug in this server: make it loud
        finally:
            self.conn_ended(c)
            self._conns.discard(c)
            if not writer.transport.is_closing():
                writer.transport.abort()


class Conn:
    """One HTTP/1.1 connection.  self.method is the current request's method (bytes)."""

    def __init__(self, reader, writer, h: h11.Connection | None = None):
        self.reader, self.writer = reader, writer
        self.task = asyncio.current_task()
        self.h = h or h11.Connection(h11.SERVER)
        self.method, self.no_body = b"GET", False

    async def run(self):
        try:
            for _ in range(MAX_REQUESTS_PER_CONN):
                req = await self.next_request()
                if req is None:
                    break  # close gracefully
                if type(req) is h11.ConnectionClosed:
                    return  # the client closed first: _on_connect aborts the transport
                await self.dispatch(req)
                if not await self.next_cycle():
                    break  # Connection: close, HTTP/1.0, ...
                self.h.start_next_cycle()
        except h11.RemoteProtocolError as e:
            if self.h.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                self.method = b"GET"
                await self.bad_request(e)
        await self.close_gracefully()

    async def next_request(self):
        """The next request head, h11.ConnectionClosed, or None to close (gracefully)."""
        return await self.next_event()

    async def dispatch(self, req: h11.Request):
        raise NotImplementedError

    async def next_cycle(self) -> bool:
        """After an answer: whether the connection can carry another request."""
        while self.h.their_state is h11.SEND_BODY:  # skip any body the handler left unread
            await self.next_event()
        return self.h.our_state is h11.DONE and self.h.their_state is h11.DONE

    async def bad_request(self, e: h11.RemoteProtocolError):
        await self.respond(e.error_status_hint, f"bad request: {e}\n".encode())

    # --- reading ------------------------------------------------------------------------------

    async def next_event(self):
        for _ in range(MAX_READS_PER_EVENT):  # each pass reads more; at EOF h11 stops asking
            ev = self.h.next_event()
            if ev is not h11.NEED_DATA:
                return ev
            self.h.receive_data(await self.reader.read(READ_SIZE))
        raise h11.RemoteProtocolError("too many reads for one event", error_status_hint=400)

    async def continue_100(self):
        if self.h.they_are_waiting_for_100_continue:
            await self.send(h11.InformationalResponse(status_code=100, headers=[]))

    async def body_data(self) -> bytes | None:
        """The next piece of the request body, None at its end (sends 100 Continue first to a
        client that waits for it)."""
        await self.continue_100()
        while self.h.their_state is h11.SEND_BODY:  # one event per pass, ends at EndOfMessage
            ev = await self.next_event()
            if type(ev) is h11.Data:
                return ev.data
        return None

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

    # --- writing ------------------------------------------------------------------------------

    def head(self, status: int, headers) -> h11.Response:
        self.no_body = self.method == b"HEAD" or status in (204, 304)
        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
        return h11.Response(status_code=status, reason=reason, headers=headers)

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

    async def respond(self, status: int, body: bytes, ctype: str = "text/plain", headers=()):
        hs = [] if status in (204, 304) else [("content-type", ctype),
                                               ("content-length", str(len(body)))]
        await self.send(self.head(status, [*hs, *headers]), h11.Data(data=body),
                        h11.EndOfMessage())

    async def respond_json(self, status: int, obj, headers=()):
        await self.respond(status, orjson.dumps(obj), "application/json", headers)

    # --- ending -------------------------------------------------------------------------------

    async def reset(self):
        """Cut the answer with an RST.  An RST throws away whatever is still queued, so first
        push everything to the kernel (a zero high-water mark makes drain() wait for an empty
        buffer) and wait, briefly, for the peer to acknowledge it."""
        self.writer.transport.set_write_buffer_limits(0)
        await self.writer.drain()
        for _ in range(100):
            if _unacked_bytes(self.writer) == 0:
                break
            await asyncio.sleep(0.01)
        self.rst()
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
        # Half-close, then read until the client's FIN: closing a socket that still has unread
        # input sends an RST, which can destroy a response the client has not read yet.
        # (TLS cannot half-close: can_write_eof() is False there, so we just close.)
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


class ServerThread:
    """Run a server on its own event loop in a daemon thread, for synchronous tests:
    `with ServerThread(server=s) as t: t.port`.  Pass the server, or make= to build it on that
    loop (then any exception doing so is __enter__'s RuntimeError, not just OSError)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, name: str, what: str,
                 server=None, make=None):
        self.server, self._make, self._addr = server, make, (host, port)
        self._name, self._what = name, what
        self._catch = Exception if make else OSError
        self._ready, self._loop, self._error = threading.Event(), None, None

    port = property(lambda self: self.server.port)
    stats = property(lambda self: self.server.stats)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error:
            raise RuntimeError(f"{self._what} did not start: {self._error!r}")
        return self

    def __exit__(self, *exc):
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self):
        async def main():
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            try:
                if self._make:
                    self.server = self._make()
                await self.server.start(*self._addr)
            except self._catch as e:
                self._error = e
                return
            finally:
                self._ready.set()
            await self._stop.wait()
            await self.server.stop()

        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(main())


def cli_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """`python -m backends.<module>`'s parser, with --host, --port and --port-file."""
    p = argparse.ArgumentParser(prog=f"python -m backends.{module}",
                                description=doc.strip().splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="0 picks a free port")
    p.add_argument("--port-file", help="write the bound port here (atomically)")
    return p


def serve_until_signal(make, args: argparse.Namespace, note: str = "") -> None:
    """Build a server with make() on a new event loop, start it on args.host:args.port, write
    args.port_file, print "listening on HOST:PORT" + note, and serve until SIGTERM/SIGINT."""
    async def main():
        server = make()
        await server.start(args.host, args.port)
        if args.port_file:  # write-then-rename so a reader never sees a partial file
            tmp = f"{args.port_file}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(f"{server.port}\n")
            os.replace(tmp, args.port_file)
        print(f"listening on {args.host}:{server.port}{note}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop()

    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(main())
