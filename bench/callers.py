"""The callers of bench.concurrency: voice agents in a closed loop, and what their calls took.

Each caller POSTs a sentence to /synthesize-json, GETs the audio_url, "plays" the audio
(sleeps its duration x the time scale), thinks, and repeats, on its own keep-alive HTTP/1.1
connection.  Raw asyncio streams rather than a client library, so that 40+ callers on a
2-core machine measure the proxy, not the client.
"""
from __future__ import annotations

import asyncio
import math
import random
import ssl as _ssl
from dataclasses import dataclass, field

import orjson

from bench.world import CHARS_PER_SECOND, SENTENCES, SYNTH_PATH, THINK


@dataclass
class Call:
    started: float               # loop time
    ok: bool = False
    error: str = ""
    latency: float = 0.0         # whole call: POST sent to the last audio byte
    ttfa: float = 0.0            # to the first byte of the audio body
    audio_s: float = 0.0
    cartesia: bool = False       # the balancer's Cartesia fallback answered it
    ideal: float | None = None   # the GPU's own work for this sentence at full speed


class ProtocolError(Exception):
    pass


class _Stale(Exception):
    """A reused keep-alive connection was closed before any answer came."""


class HTTPConn:
    """One keep-alive HTTP/1.1 connection, asyncio streams; just enough for this bench."""

    def __init__(self, scheme: str, host: str, port: int, ssl_ctx):
        self.scheme, self.host, self.port, self.ssl = scheme, host, port, ssl_ctx
        self.stale_retries = 0
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used = 0    # requests sent on the current connection
        shown = f"[{host}]" if ":" in host else host
        self.host_header = (shown if port == (443 if scheme == "https" else 80)
                            else f"{shown}:{port}")

    async def _open(self):
        self.reader, self.writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.ssl, limit=1 << 16)
        self.used = 0

    def close(self):
        if self.writer is not None:
            self.writer.transport.abort()
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: tuple = (), keep_body: bool = True):
        """(status, headers {lower name: [values]}, body or byte count, first body byte time)."""
        if self.writer is None:
            await self._open()
        try:
            return await self._exchange(method, path, body, headers, keep_body)
        except _Stale:
            # A reused keep-alive connection the other side had closed (nothing came back):
            # once more on a new connection, as HTTP clients do.
            self.close()
            self.stale_retries += 1
            await self._open()
            return await self._exchange(method, path, body, headers, keep_body)
        except BaseException:
            self.close()
            raise

    async def _exchange(self, method, path, body, headers, keep_body):
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host_header}",
                 "User-Agent: tts-lb-bench-concurrency"]
        if method == "POST":
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        self.used += 1
        reader = self.reader
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if self.used > 1 and not getattr(exc, "partial", b""):
                raise _Stale from exc
            raise
        except asyncio.LimitOverrunError:
            raise ProtocolError("response head over 64 KiB") from None
        loop = asyncio.get_running_loop()
        status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {status_line[:80]!r}")
        status = int(parts[1])
        hdrs: dict[str, list[str]] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            hdrs.setdefault(name.strip().lower(), []).append(value.strip())
        close = (parts[0] == "HTTP/1.0" or
                 any("close" in v.lower() for v in hdrs.get("connection", [])))
        got = bytearray() if keep_body else None
        count, first = 0, None
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            pass
        elif any("chunked" in v.lower() for v in hdrs.get("transfer-encoding", [])):
            while True:
                size_line = await reader.readuntil(b"\r\n")
                try:
                    size = int(size_line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size {size_line[:40]!r}") from None
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass  # trailers
                    break
                data = await reader.readexactly(size)
                if first is None:
                    first = loop.time()
                count += size
                if got is not None:
                    got += data
                await reader.readexactly(2)
        elif "content-length" in hdrs:
            try:
                left = int(hdrs["content-length"][0])
            except ValueError:
                raise ProtocolError("bad Content-Length") from None
            while left > 0:
                data = await reader.read(min(left, 1 << 16))
                if not data:
                    raise asyncio.IncompleteReadError(b"", left)
                if first is None:
                    first = loop.time()
                left -= len(data)
                count += len(data)
                if got is not None:
                    got += data
        else:  # until the server closes
            close = True
            while data := await reader.read(1 << 16):
                if first is None:
                    first = loop.time()
                count += len(data)
                if got is not None:
                    got += data
        if close:
            self.close()
        return status, hdrs, (bytes(got) if got is not None else count), first


@dataclass
class Load:
    """One run's callers and what they saw."""
    scheme: str
    host: str
    port: int
    callers: int
    duration: float
    warmup: float
    scale: float
    seed: int
    call_timeout: float
    gpu_s_per_char: float | None = None   # simulated fleet: full-speed GPU seconds a character
    ports: tuple[int, ...] = ()  # several balancers: caller i calls ports[i % len] (else port)
    calls: list[Call] = field(default_factory=list)
    started: int = 0
    stale_retries: int = 0       # requests resent on a new connection (see HTTPConn)
    window: tuple[float, float] = (0.0, 0.0)


async def _one_call(conn: HTTPConn, text: str, timeout: float) -> Call:
    loop = asyncio.get_running_loop()
    call = Call(started=loop.time())
    try:
        async with asyncio.timeout(timeout):
            status, hdrs, body, _ = await conn.request(
                "POST", SYNTH_PATH, orjson.dumps({"text": text}))
            if status != 200:
                call.error = f"synthesize {status}"
                return call
            call.cartesia = "cartesia" in [v.lower() for v in hdrs.get("x-tts-fallback", [])]
            try:
                doc = orjson.loads(body)
                url = doc["audio_url"]
                if not isinstance(url, str) or not url.startswith("/"):
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                call.error = "synthesize: no audio_url"
                return call
            # A cookie the proxy set (HAProxy's server persistence) goes with the audio GET,
            # as a cookie jar would send it (the bench's HAProxy scopes it to /audio).
            cookies = [c.split(";", 1)[0] for c in hdrs.get("set-cookie", [])]
            extra = (("Cookie", "; ".join(cookies)),) if cookies else ()
            status, hdrs, nbytes, first = await conn.request("GET", url, headers=extra,
                                                             keep_body=False)
            end = loop.time()
            if status != 200:
                call.error = f"audio {status}"
                return call
            if nbytes <= 44 or first is None:
                call.error = "audio: empty"
                return call
            call.ok = True
            call.latency = end - call.started
            call.ttfa = first - call.started
            duration = doc.get("duration")
            call.audio_s = (float(duration) if isinstance(duration, (int, float)) and duration > 0
                            else (nbytes - 44) / 48000)
            return call
    except CALL_ERRORS as exc:
        call.error = call_error(exc)
    conn.close()
    return call


CALL_ERRORS = (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError,
               ProtocolError)


def call_error(exc: BaseException) -> str:
    """How a failed call is reported (one of CALL_ERRORS)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed mid-answer"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ProtocolError):
        return f"protocol: {exc}"
    return f"connection: {type(exc).__name__}"


async def drive(load: Load, tick=None) -> None:
    """Run `load.callers` closed-loop callers; calls started inside the measured window count."""
    loop = asyncio.get_running_loop()
    ctx = None
    if load.scheme == "https":
        ctx = _ssl.create_default_context()
    t0 = loop.time()
    w0, w1 = t0 + load.warmup, t0 + load.warmup + load.duration
    load.window = (w0, w1)
    rngs = [random.Random(f"{load.seed}:{load.callers}:{i}") for i in range(load.callers)]

    async def caller(i: int):
        rng = rngs[i]
        port = load.ports[i % len(load.ports)] if load.ports else load.port
        conn = HTTPConn(load.scheme, load.host, port, ctx)
        try:
            # Random phase: callers join over the warm-up, not all at once.
            await asyncio.sleep(rng.uniform(0, load.warmup))
            while loop.time() < w1:
                text = rng.choice(SENTENCES)
                load.started += 1
                call = await _one_call(conn, text, load.call_timeout)
                if load.gpu_s_per_char is not None:
                    call.ideal = len(text) * load.gpu_s_per_char
                if w0 <= call.started < w1:
                    load.calls.append(call)
                play = call.audio_s if call.ok else len(text) / CHARS_PER_SECOND
                await asyncio.sleep((play + rng.uniform(*THINK)) * load.scale)
        finally:
            load.stale_retries += conn.stale_retries
            conn.close()

    tasks = [asyncio.create_task(caller(i)) for i in range(load.callers)]
    ticker = None
    if tick is not None:
        async def ticking():
            while True:
                tick()
                await asyncio.sleep(0.25)
        ticker = asyncio.create_task(ticking())
    try:
        # Bounded: callers stop starting calls at w1; a call under way ends within its timeout.
        done, pending = await asyncio.wait(
            tasks, timeout=load.warmup + load.duration + load.call_timeout + 10)
        for t in pending:
            t.cancel()
        for t in done:
            if t.exception() is not None:
                raise t.exception()
    finally:
        for t in tasks:
            t.cancel()
        if ticker is not None:
            ticker.cancel()
        await asyncio.gather(*tasks, *([ticker] if ticker else []), return_exceptions=True)


def _percentile(sorted_values: list[float], pct: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))  # nearest rank
    return sorted_values[rank - 1]


def summarize_calls(calls: list[Call], duration: float, real_per_wall: float = 1.0) -> dict:
    """Counts and percentiles of one run's calls.

    *_ms are the wall-clock milliseconds measured; *_real_s the same in real-world seconds
    (x real_per_wall: 1 / time scale for the simulated fleet, which runs that much faster)."""
    ok = [c for c in calls if c.ok]
    lat = sorted(c.latency for c in ok)
    ttfa = sorted(c.ttfa for c in ok)
    # Beyond the GPU's own full-speed work: queueing, time-slicing, retries, the proxy.
    extra = sorted(c.latency - c.ideal for c in ok if c.ideal is not None and not c.cartesia)
    errors: dict[str, int] = {}
    for c in calls:
        if not c.ok:
            errors[c.error] = errors.get(c.error, 0) + 1

    def stats(values, unit: float, digits: int):
        return {f"p{p}": (None if (v := _percentile(values, p)) is None
                          else round(v * unit, digits)) for p in (50, 95, 99)} | {
            "mean": round(sum(values) / len(values) * unit, digits) if values else None,
            "max": round(values[-1] * unit, digits) if values else None}

    has_extra = any(c.ideal is not None for c in calls)
    return {"started": len(calls), "completed": len(ok), "errors": len(calls) - len(ok),
            "errors_by_kind": dict(sorted(errors.items())),
            "calls_per_s": round(len(ok) / duration, 2) if duration > 0 else None,
            "served_by_cartesia": sum(1 for c in ok if c.cartesia),
            "latency_ms": stats(lat, 1e3, 1), "ttfa_ms": stats(ttfa, 1e3, 1),
            "extra_ms": stats(extra, 1e3, 1) if has_extra else None,
            "latency_real_s": stats(lat, real_per_wall, 4),
            "ttfa_real_s": stats(ttfa, real_per_wall, 4),
            "extra_real_s": stats(extra, real_per_wall, 4) if has_extra else None}
