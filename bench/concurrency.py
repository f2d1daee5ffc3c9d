"""How many concurrent voice-agent calls can a fleet serve, at what latency, under each policy?

Run it:   python -m bench.concurrency [--concurrency 10,20,40] [--policies ...]
                                      [--duration S] [--backends N --slots S --oom-at M]
                                      [--spillover] [--seed N] [--no-haproxy]
          python -m bench.concurrency --lb http://HOST:PORT     (measure a running balancer)

With no --lb it starts, on 127.0.0.1, a simulated fleet of Chatterbox GPU servers
(backends.chatterbox: --slots calls at full speed, a crash past --oom-at at once, down for
10 s plus 10 s of model loading), the fake Cartesia, and for each run a fresh balancer
(`python -m lb`, max_concurrency = slots, the Cartesia fallback on) -- and HAProxy configured
as an expert would (balance leastconn, maxconn = slots, a queue) when it is installed.  The
whole simulated world runs --time-scale times real time (default 0.05: 20x faster).

Each caller is a voice agent in a closed loop: POST /synthesize-json with a sentence, GET the
audio_url, "play" it (sleep its duration), think, repeat.  Per (policy, concurrency) it reports
calls completed, p50/p95/p99 latency and time to the first audio byte, errors the callers saw,
backend crashes, retries and calls served by Cartesia; then writes results.json and
latency.png to bench/results/concurrency-<timestamp>/.  Every process started here is
stopped at the end, also on Ctrl-C, SIGTERM or an error; every wait is bounded.
See bench/README.md.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import http.client
import io
import json
import math
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import ssl as _ssl
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import orjson

from bench.throughput import (HOST, BenchError, Service, Services, Stop, _Parser, free_port, make_tmp,
                              tool_version)

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"

# --- the simulated world, in real-world seconds (scaled by --time-scale when run)
CHARS_PER_SECOND = 15.0      # speaking rate of backends.chatterbox and the fake Cartesia
RESTART_AFTER = 10.0         # a crashed server is down this long (systemd RestartSec=10) ...
LOAD_TIME = 10.0             # ... then loads its model this long (real servers: 10-60 s)
THINK = (0.5, 2.0)           # a caller's pause between playing one sentence and the next call
CARTESIA_RTF = 0.1           # the fake Cartesia makes audio 10x faster than real time
CARTESIA_CONCURRENCY = 3     # the plan's simultaneous requests (Pro); the lb is told the same
# The balancer's and HAProxy's time settings that belong to the GPU world (scaled too):
QUEUE_TIMEOUT = 10.0         # lb balancer.queue_timeout / HAProxy timeout queue
FIRST_BYTE = 60.0            # lb timeouts.first_byte / HAProxy timeout server
PROBE_INTERVAL = 2.0         # lb health.active.interval / HAProxy check inter
PROBE_TIMEOUT = 1.0
SLOW_START = 10.0            # lb balancer.slow_start / HAProxy slowstart
BASE_EJECTION = 10.0         # lb health.passive.base_ejection
MAX_EJECTION = 120.0

DEFAULT_CONCURRENCY = (10, 20, 40)
LB_POLICIES = ("random", "least_conn", "p2c", "round_robin")
NO_LIMIT = "random-nolimit"  # the balancer's random policy with no per-backend limit
ALL_POLICIES = (*LB_POLICIES, NO_LIMIT)
DEFAULT_POLICIES = ("random", "least_conn", "p2c", NO_LIMIT)
LABELS = {NO_LIMIT: "random, no limit", "haproxy": "haproxy"}
DEFAULT_DURATION_SIM = 3.0   # measured seconds per run, simulated fleet (wall clock)
DEFAULT_DURATION_LB = 30.0   # ... with --lb (a real fleet runs in real time)
DEFAULT_TIME_SCALE = 0.05
DEFAULT_RTF = 1.0
KEY_ENV = "TTS_LB_BENCH_CARTESIA_KEY"
VOICE_ID = "a0e99841-438c-4a64-b679-ae501e7d6091"
READY_TIMEOUT = 30.0         # extra seconds a backend may take to come back between runs
SYNTH_PATH = "/synthesize-json"

# What voice agents say: 30 to 180 characters, 2 to 12 s of speech at 15 characters a second.
SENTENCES = (
    "Sure, I can help you with that.",
    "Let me check that for you, one moment please.",
    "Your appointment is confirmed for Tuesday at three in the afternoon.",
    "I'm sorry, I didn't quite catch that. Could you say it again?",
    "Thanks for calling. How can I help you today?",
    "Your order shipped yesterday and should arrive by Friday, tracking details are in your email.",
    "I found two flights that match: one leaves at eight fifteen, the other at ten forty.",
    "To reset your password, open the settings page, choose security, and follow the link "
    "we send to your email address.",
    "Great, I've updated your address.",
    "The total comes to forty two dollars and fifty cents, including tax.",
    "Is there anything else I can help you with today?",
    "I can transfer you to a specialist, but the wait is currently about ten minutes. Would "
    "you like me to do that, or should I schedule a callback for later this afternoon instead?",
    "Okay, I've cancelled the subscription. You won't be charged again.",
    "Our store is open from nine to six on weekdays and from ten to four on Saturdays.",
    "Just to confirm, you'd like a large pizza with mushrooms and olives, delivered to your "
    "home address, is that right?",
    "Got it.",
    "I see three open tickets on your account. The oldest one is about a billing question "
    "from last month, and the other two are about the mobile app.",
    "Please hold while I look that up.",
    "Your balance is one hundred and twelve dollars. The next payment is due on the fifth.",
    "That's all set. Have a wonderful day!",
)


# --------------------------------------------------------------------------- arguments

def _int_in(lo: int, hi: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a whole number, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{what} must be from {lo} to {hi}, got {value}")
        return value
    return parse


def _float_in(lo: float, hi: float, what: str, *, lo_open: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
            bound = f"more than {lo:g}" if lo_open else f"at least {lo:g}"
            raise argparse.ArgumentTypeError(f"{what} must be {bound} and at most {hi:g}, "
                                             f"got {text}")
        return value
    return parse


def _levels(text: str) -> tuple[int, ...]:
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise argparse.ArgumentTypeError(f"--concurrency wants a comma-separated list of caller "
                                         f"counts like 10,20,40, got {text!r}")
    out = []
    for t in items:
        try:
            n = int(t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--concurrency: {t!r} is not a whole number "
                                             f"(want e.g. 10,20,40)") from None
        if not 1 <= n <= 2000:
            raise argparse.ArgumentTypeError(f"--concurrency: each level must be from 1 to 2000 "
                                             f"callers, got {n}")
        if n in out:
            raise argparse.ArgumentTypeError(f"--concurrency: {n} is listed twice")
        out.append(n)
    if len(out) > 20:
        raise argparse.ArgumentTypeError("--concurrency: at most 20 levels")
    return tuple(out)


def _policies(text: str) -> tuple[str, ...]:
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise argparse.ArgumentTypeError(f"--policies wants a comma-separated list from "
                                         f"{', '.join(ALL_POLICIES)}, got {text!r}")
    out = []
    for t in items:
        if t == "haproxy":
            raise argparse.ArgumentTypeError("--policies: haproxy is not a balancer policy; it "
                                             "runs beside them when installed (--no-haproxy "
                                             "leaves it out)")
        if t not in ALL_POLICIES:
            raise argparse.ArgumentTypeError(f"--policies: unknown policy {t!r}; choose from "
                                             f"{', '.join(ALL_POLICIES)}")
        if t in out:
            raise argparse.ArgumentTypeError(f"--policies: {t} is listed twice")
        out.append(t)
    return tuple(out)


def _lb_url(text: str) -> tuple[str, str, int]:
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--lb: cannot parse {text!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"--lb wants http://HOST:PORT (or https://), got {text!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise argparse.ArgumentTypeError(f"--lb wants scheme://host:port only, no path, got {text!r}")
    if port == 0:
        raise argparse.ArgumentTypeError(f"--lb: port 0 cannot be connected to, in {text!r}")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


FLEET_OPTIONS = ("policies", "backends", "slots", "oom_at", "spillover", "rtf", "no_haproxy")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m bench.concurrency",
                description="Closed-loop voice-agent calls at several concurrency levels against "
                            "a simulated GPU fleet behind tts-lb (each policy) and HAProxy, or "
                            "against a running balancer (--lb). See bench/README.md.")
    p.add_argument("--lb", metavar="URL", type=_lb_url,
                   help="measure this running balancer (e.g. a real fleet) instead of starting "
                        "a simulated one; only --concurrency, --duration, --seed, "
                        "--time-scale and --results apply then")
    p.add_argument("--concurrency", type=_levels, default=DEFAULT_CONCURRENCY, metavar="N,N,...",
                   help="concurrent callers per run (default 10,20,40)")
    p.add_argument("--policies", type=_policies, default=None, metavar="P,P,...",
                   help=f"balancer policies to run, from {', '.join(ALL_POLICIES)} "
                        f"({NO_LIMIT}: random with no per-backend limit, what apps do today) "
                        f"(default {','.join(DEFAULT_POLICIES)})")
    p.add_argument("--duration", type=_float_in(0, 3600, "--duration"), default=None,
                   metavar="SECONDS",
                   help=f"measured wall-clock seconds per run, after a warm-up (default "
                        f"{DEFAULT_DURATION_SIM:g}; {DEFAULT_DURATION_LB:g} with --lb)")
    p.add_argument("--backends", type=_int_in(1, 64, "--backends"), default=None, metavar="N",
                   help="simulated GPU servers (default 5)")
    p.add_argument("--slots", type=_int_in(1, 64, "--slots"), default=None, metavar="S",
                   help="calls one server computes at full speed; also the balancer's and "
                        "HAProxy's per-server limit (default 4)")
    p.add_argument("--oom-at", type=_int_in(0, 10_000, "--oom-at"), default=None, metavar="M",
                   help="a server crashes (out of memory) when asked for more than M "
                        "syntheses at once; 0: never (default 6)")
    p.add_argument("--rtf", type=_float_in(0, 100, "--rtf"), default=None, metavar="X",
                   help=f"GPU seconds per second of audio at full speed (default {DEFAULT_RTF:g})")
    p.add_argument("--spillover", action="store_true",
                   help="fallback.cartesia.spillover: calls that waited past the queue timeout "
                        "go to Cartesia instead of failing")
    p.add_argument("--no-haproxy", action="store_true", help="leave HAProxy out")
    p.add_argument("--seed", type=_int_in(0, 2**63 - 1, "--seed"), default=None, metavar="N",
                   help="seed for the callers' sentences, think times and start times "
                        "(default: a random one, printed)")
    p.add_argument("--time-scale", type=_float_in(0, 1, "--time-scale"), default=None,
                   metavar="F",
                   help=f"the simulated world runs at F x real time: GPU work, crash downtime, "
                        f"playing and thinking, and the GPU-related timeouts (default "
                        f"{DEFAULT_TIME_SCALE:g}; 1 with --lb, where only playing and thinking "
                        f"are ours to scale)")
    p.add_argument("--results", metavar="DIR",
                   help="write results.json and latency.png here (default "
                        "bench/results/concurrency-<timestamp>/)")
    args = p.parse_args(argv)

    args.ignored = []
    if args.lb is not None:
        args.ignored = [f"--{name.replace('_', '-')}" for name in FLEET_OPTIONS
                        if getattr(args, name) not in (None, False)]
    args.policies = args.policies or DEFAULT_POLICIES
    args.backends = args.backends if args.backends is not None else 5
    args.slots = args.slots if args.slots is not None else 4
    args.oom_at = args.oom_at if args.oom_at is not None else 6
    args.rtf = args.rtf if args.rtf is not None else DEFAULT_RTF
    if args.duration is None:
        args.duration = DEFAULT_DURATION_LB if args.lb else DEFAULT_DURATION_SIM
    if args.time_scale is None:
        args.time_scale = 1.0 if args.lb else DEFAULT_TIME_SCALE
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 1_000_000)
    if args.results is not None:
        path = Path(args.results).expanduser()
        if path.exists() and not path.is_dir():
            p.error(f"--results {args.results}: exists and is not a directory")
        if not path.resolve().parent.is_dir():
            p.error(f"--results {args.results}: directory {path.resolve().parent} does not exist")
    return args


# --------------------------------------------------------------------------- the callers

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
    except TimeoutError:
        call.error = "timeout"
    except asyncio.IncompleteReadError:
        call.error = "connection closed mid-answer"
    except ConnectionRefusedError:
        call.error = "connection refused"
    except (ConnectionError, OSError) as exc:
        call.error = f"connection: {type(exc).__name__}"
    except ProtocolError as exc:
        call.error = f"protocol: {exc}"
    conn.close()
    return call


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
        conn = HTTPConn(load.scheme, load.host, load.port, ctx)
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


def summarize_calls(calls: list[Call], duration: float) -> dict:
    ok = [c for c in calls if c.ok]
    lat = sorted(c.latency for c in ok)
    ttfa = sorted(c.ttfa for c in ok)
    # Beyond the GPU's own full-speed work: queueing, time-slicing, retries, the proxy.
    extra = sorted(c.latency - c.ideal for c in ok if c.ideal is not None and not c.cartesia)
    errors: dict[str, int] = {}
    for c in calls:
        if not c.ok:
            errors[c.error] = errors.get(c.error, 0) + 1

    def ms(values):
        return {f"p{p}": (None if (v := _percentile(values, p)) is None else round(v * 1e3, 1))
                for p in (50, 95, 99)} | {
            "mean": round(sum(values) / len(values) * 1e3, 1) if values else None,
            "max": round(values[-1] * 1e3, 1) if values else None}

    return {"started": len(calls), "completed": len(ok), "errors": len(calls) - len(ok),
            "errors_by_kind": dict(sorted(errors.items())),
            "calls_per_s": round(len(ok) / duration, 2) if duration > 0 else None,
            "served_by_cartesia": sum(1 for c in ok if c.cartesia),
            "latency_ms": ms(lat), "ttfa_ms": ms(ttfa),
            "extra_ms": ms(extra) if any(c.ideal is not None for c in calls) else None}


# --------------------------------------------------------------------------- progress

WIDTH = 100   # of the progress line


class Progress:
    """A one-line bar on a terminal (stderr), else a line per run and every 10 s."""

    def __init__(self, total_runs: int, est_run_s: float, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.total, self.est = total_runs, est_run_s
        self.done = 0
        self.label = ""
        self.run_started = time.monotonic()
        self.last_line = 0.0
        self.shown = False

    def start_run(self, label: str):
        self.label = label
        self.run_started = time.monotonic()
        if self.tty:
            self.tick()
        else:
            self._line(f"[{self.done + 1}/{self.total}] {label}")
            self.last_line = time.monotonic()

    def tick(self):
        now = time.monotonic()
        in_run = min(1.0, (now - self.run_started) / self.est) if self.est > 0 else 0.0
        frac = min(1.0, (self.done + in_run) / self.total) if self.total else 1.0
        left = max(0.0, (self.total - self.done - in_run) * self.est)
        if self.tty:
            width = 28
            filled = int(frac * width)
            bar = "#" * filled + "." * (width - filled)
            text = (f"[{bar}] {frac * 100:3.0f}%  run {min(self.done + 1, self.total)}/"
                    f"{self.total}  {self.label}  ~{left:.0f} s left")[:WIDTH]
            self.stream.write("\r" + text.ljust(WIDTH))
            self.stream.flush()
            self.shown = True
        elif now - self.last_line >= 10:
            self._line(f"  ... {self.label}: {now - self.run_started:.0f} s into the run, "
                       f"~{left:.0f} s left in all")
            self.last_line = now

    def end_run(self, summary: str):
        self.done += 1
        if self.tty:
            self.note(f"{self.label}: {summary}")
        else:
            self._line(f"    {summary}")

    def note(self, msg: str):
        if self.tty and self.shown:
            self.stream.write("\r" + " " * WIDTH + "\r")
            self.shown = False
        self._line(msg)
        if self.tty and self.done < self.total and self.label:
            self.tick()

    def _line(self, msg: str):
        self.stream.write(f"bench: {msg}\n")
        self.stream.flush()

    def close(self):
        if self.tty and self.shown:
            self.stream.write("\r" + " " * WIDTH + "\r")
            self.stream.flush()
            self.shown = False


# --------------------------------------------------------------------------- the fleet

def _http_json(host: str, port: int, path: str, timeout: float = 3.0) -> dict | None:
    """GET path -> JSON object, or None when it cannot be had (down, not JSON, not 200)."""
    try:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            return None
        doc = json.loads(body)
        return doc if isinstance(doc, dict) else None
    except (OSError, http.client.HTTPException, ValueError):
        return None


def _secs(x: float) -> str:
    """A TOML float with enough precision."""
    return repr(round(float(x), 4))


@dataclass
class Fleet:
    backends: list[Service]
    cartesia: Service
    slots: int
    oom_at: int

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.backends]


def start_fleet(services: Services, args) -> Fleet:
    s = args.time_scale
    common = ["--slots", str(args.slots), "--oom-at", str(args.oom_at),
              "--restart-after", _secs(RESTART_AFTER * s), "--load-time", _secs(LOAD_TIME * s),
              "--rtf", repr(args.rtf * s), "--chars-per-second", repr(CHARS_PER_SECOND)]
    sims = [services.start(f"chatterbox{i}",
                           [sys.executable, "-m", "backends.chatterbox", "--host", HOST,
                            "--port", "0", *common, "--seed", str(args.seed + i)])
            for i in range(args.backends)]
    cart = services.start("cartesia", [sys.executable, "-m", "backends.cartesia", "--host", HOST,
                                       "--port", "0", "--api-key-env", KEY_ENV,
                                       "--concurrency", str(CARTESIA_CONCURRENCY),
                                       "--rtf", repr(CARTESIA_RTF * s),
                                       "--chars-per-second", repr(CHARS_PER_SECOND)])
    for svc in [*sims, cart]:  # all started at once; now wait for each
        svc.port = int(services.wait_log(svc, r"listening on [\d.]+:(\d+)").group(1))
    fleet = Fleet(sims, cart, args.slots, args.oom_at)
    wait_ready(fleet, LOAD_TIME * s + READY_TIMEOUT)
    return fleet


def wait_ready(fleet: Fleet, timeout: float) -> None:
    """Every backend answers /_stats with ready: true (a crashed one restarts and loads)."""
    deadline = time.monotonic() + timeout
    for svc in fleet.backends:
        while True:
            if svc.proc.poll() is not None:
                raise BenchError(f"{svc.name} exited with code {svc.proc.returncode}; its log:\n"
                                 f"{svc.log_tail()}")
            doc = _http_json(HOST, svc.port, "/_stats")
            if doc and doc.get("ready") and doc.get("requests_in_flight", 0) == 0:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{svc.name} was not ready again within {timeout:.0f} s; its "
                                 f"log:\n{svc.log_tail()}")
            time.sleep(0.05)


def reset_fleet(fleet: Fleet) -> None:
    for svc in fleet.backends:
        if _http_json(HOST, svc.port, "/_stats/reset") is None:
            raise BenchError(f"{svc.name}: GET /_stats/reset failed")
    if _http_json(HOST, fleet.cartesia.port, "/_reset") is None:
        raise BenchError("fake Cartesia: GET /_reset failed")


def fleet_stats(fleet: Fleet) -> dict:
    per = []
    for svc in fleet.backends:
        doc = _http_json(HOST, svc.port, "/_stats") or {}
        per.append({"port": svc.port, "crashes": doc.get("crashes"),
                    "requests": doc.get("requests_total"),
                    "syntheses": doc.get("synth_total"),
                    "max_requests_in_flight": doc.get("max_requests_in_flight"),
                    "max_gpu_in_flight": doc.get("max_gpu_in_flight"),
                    "max_slowdown": doc.get("max_slowdown"),
                    "rejected_loading": doc.get("synth_rejected"),
                    "outcomes": doc.get("outcomes")})
    cart = _http_json(HOST, fleet.cartesia.port, "/_stats") or {}
    return {
        "crashes": sum(b["crashes"] or 0 for b in per),
        "peak_gpu_in_flight": max((b["max_gpu_in_flight"] or 0 for b in per), default=0),
        "per_backend": per,
        "cartesia": {k: cart.get(k) for k in ("requests", "max_in_flight", "by_status",
                                              "characters_billed")},
    }


# --------------------------------------------------------------------------- the proxies

def lb_config(fleet: Fleet, args, policy: str) -> str:
    s = args.time_scale
    limit = 100_000 if policy == NO_LIMIT else fleet.slots
    lb_policy = "random" if policy == NO_LIMIT else policy
    lines = [
        "# written by bench/concurrency.py: the simulated fleet's times are scaled by "
        f"{args.time_scale:g}",
        "[listen]", f'address = "{HOST}:0"',
        "[log]", "access = false", 'level = "info"',
        "[timeouts]", f"first_byte = {_secs(FIRST_BYTE * s)}",
        "[pool]", f"max_idle = {max(32, 2 * fleet.slots)}",
        "[balancer]", f'policy = "{lb_policy}"', f"max_concurrency = {limit}",
        "queue_limit = 1024", f"queue_timeout = {_secs(QUEUE_TIMEOUT * s)}",
        f"slow_start = {_secs(SLOW_START * s)}",
        "[health.passive]", f"base_ejection = {_secs(BASE_EJECTION * s)}",
        f"max_ejection = {_secs(MAX_EJECTION * s)}",
        "[health.active]", f"interval = {_secs(max(0.1, PROBE_INTERVAL * s))}",
        f"timeout = {_secs(max(0.25, PROBE_TIMEOUT * s))}",
        "[fallback.cartesia]", "enabled = true", f'url = "http://{HOST}:{fleet.cartesia.port}"',
        f'api_key_env = "{KEY_ENV}"', f"max_concurrency = {CARTESIA_CONCURRENCY}",
        f"spillover = {'true' if args.spillover else 'false'}",
        "[fallback.cartesia.voices]", f'default = "{VOICE_ID}"',
    ]
    for i, port in enumerate(fleet.ports):
        lines += ["[[backend]]", f'name = "gpu{i}"', f'url = "http://{HOST}:{port}"',
                  'health_path = "/health"']
    lines += ["[[route]]", f'path = "{SYNTH_PATH}"', 'kind = "chatterbox"',
              "[[route]]", 'path = "/synthesize"', 'kind = "chatterbox"']
    return "\n".join(lines) + "\n"


def haproxy_config(fleet: Fleet, args, port: int, sock: Path) -> str:
    s = args.time_scale
    inter = max(0.1, PROBE_INTERVAL * s)
    ms = lambda x: f"{max(1, round(x * 1000))}ms"  # noqa: E731
    servers = "\n".join(f"    server gpu{i} {HOST}:{p} cookie gpu{i}"
                        for i, p in enumerate(fleet.ports))
    tracked = "\n".join(f"    server gpu{i} {HOST}:{p} cookie gpu{i} track gpus/gpu{i}"
                        for i, p in enumerate(fleet.ports))
    return f"""\
# written by bench/concurrency.py: HAProxy as an expert would set it up for this fleet
# (the simulated fleet's times are scaled by {s:g}).
global
    maxconn 4096
    stats socket {sock} mode 600 level user

defaults
    mode http
    option http-keep-alive
    timeout connect 2s
    timeout client 60s
    timeout server {ms(FIRST_BYTE * s)}      # the GPU answers in one go: first byte = whole call
    timeout queue {ms(QUEUE_TIMEOUT * s)}       # a call waits this long for a free slot, then 503
    timeout check {ms(max(0.25, PROBE_TIMEOUT * s))}
    retries 1                  # two tries in all, like the balancer's retry.attempts = 2
    option redispatch 1        # ... the second on another server
    retry-on conn-failure empty-response response-timeout 502 503 504

frontend tts
    bind {HOST}:{port}
    use_backend audio if {{ path_beg /audio/ }}
    default_backend gpus

# Synthesis: least connections, at most `slots` calls per server, the rest queued.
backend gpus
    balance leastconn
    # The audio file lives on the server that made it: a cookie names it, scoped to /audio
    # (the last Path wins) so that a client's next POST is not pinned to the same server.
    cookie TTSSRV insert indirect nocache httponly attr "Path=/audio"
    option httpchk GET /health
    http-check expect status 200
    default-server check inter {ms(inter)} fall 3 rise 2 slowstart {ms(SLOW_START * s)} maxconn {fleet.slots} observe layer4 error-limit 3 on-error mark-down
{servers}

# Audio fetches are not GPU work: no maxconn, pinned by the cookie, health from gpus.
backend audio
    cookie TTSSRV indirect nocache
    option persist
{tracked}
"""


def start_lb(services: Services, tmp: Path, fleet: Fleet, args, policy: str,
             configs: dict[str, str]) -> Service:
    text = lb_config(fleet, args, policy)
    conf = tmp / f"lb-{policy}.toml"
    conf.write_text(text)
    configs.setdefault(f"lb-{policy}.toml", text)
    svc = services.start(f"lb-{policy}", [sys.executable, "-m", "lb", "-c", str(conf)],
                         stop_signal=signal.SIGINT)
    svc.port = int(services.wait_log(svc, r"listening on [\d.]+:(\d+)").group(1))
    return svc


def start_haproxy(services: Services, tmp: Path, fleet: Fleet, args,
                  configs: dict[str, str]) -> tuple[Service, Path]:
    for attempt in range(3):  # the free port could be taken between probe and bind: retry
        port = free_port()
        sock = tmp / f"haproxy-{port}.sock"
        text = haproxy_config(fleet, args, port, sock)
        conf = tmp / "haproxy.cfg"
        conf.write_text(text)
        configs["haproxy.cfg"] = text
        svc = services.start("haproxy", ["haproxy", "-db", "-f", str(conf)])
        try:
            services.wait_port(svc, port)
        except BenchError:
            if svc.proc.poll() is not None and attempt < 2:
                services.stop(svc)
                continue
            raise
        svc.port = port
        return svc, sock
    raise AssertionError("unreachable")


def check_haproxy(tmp: Path, fleet: Fleet, args) -> str | None:
    """`haproxy -c` on the config, once: None if fine, else why it was refused."""
    conf = tmp / "haproxy-check.cfg"
    conf.write_text(haproxy_config(fleet, args, free_port(), tmp / "check.sock"))
    try:
        out = subprocess.run(["haproxy", "-c", "-f", str(conf)], capture_output=True, text=True,
                             timeout=15, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"haproxy -c failed: {exc}"
    if out.returncode != 0:
        lines = [ln for ln in (out.stdout + out.stderr).splitlines() if "ALERT" in ln]
        return "haproxy refused its config: " + (lines[0] if lines else f"exit {out.returncode}")
    return None


def haproxy_stats(sock: Path) -> dict:
    """`show stat` on the stats socket: retries, redispatches, queue peak, 5xx answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(sock))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError as exc:
        return {"error": f"stats socket: {exc}"}
    text = data.decode("latin-1").lstrip("# ")
    rows = list(csv.DictReader(io.StringIO(text)))

    def num(row, key):
        try:
            return int(row.get(key) or 0)
        except ValueError:
            return 0
    out = {"servers": []}
    for row in rows:
        if row.get("pxname") == "gpus" and row.get("svname") == "BACKEND":
            out.update(retries=num(row, "wretr"), redispatches=num(row, "wredis"),
                       queue_peak=num(row, "qmax"), sessions_peak=num(row, "smax"),
                       responses_5xx=num(row, "hrsp_5xx"), requests=num(row, "stot"))
        elif row.get("pxname") == "gpus" and row.get("svname") not in ("FRONTEND", "BACKEND"):
            out["servers"].append({"name": row.get("svname"), "requests": num(row, "stot"),
                                   "peak": num(row, "smax"), "queue_peak": num(row, "qmax"),
                                   "retries": num(row, "wretr"), "status": row.get("status")})
        elif row.get("pxname") == "audio" and row.get("svname") == "BACKEND":
            out["audio_responses_4xx"] = num(row, "hrsp_4xx")
            out["audio_responses_5xx"] = num(row, "hrsp_5xx")
    return out


def lb_stats(host: str, port: int) -> dict | None:
    doc = _http_json(host, port, "/lb-stats", timeout=5)
    if not doc or "backends" not in doc:
        return None
    fb = doc.get("fallback", {}) or {}
    return {
        "retries": (doc.get("retry") or {}).get("retries"),
        "retry_by_reason": (doc.get("retry") or {}).get("by_reason"),
        "fallback_by_reason": fb.get("by_reason"),
        "fallback_outcomes": fb.get("outcomes"),
        "queue": doc.get("queue"),
        "by_status": (doc.get("requests") or {}).get("by_status"),
        "backends": [{k: b.get(k) for k in ("name", "requests", "peak_in_flight", "state",
                                            "errors")} for b in doc["backends"]],
    }


def _diff(after, before):
    """Counters of a long-running balancer over one run (numbers and dicts of numbers)."""
    if isinstance(after, dict):
        before = before if isinstance(before, dict) else {}
        return {k: _diff(v, before.get(k)) for k, v in after.items()}
    if isinstance(after, (int, float)) and not isinstance(after, bool):
        return after - (before if isinstance(before, (int, float)) else 0)
    return after


# --------------------------------------------------------------------------- runs

def call_timeout(args) -> float:
    # A call may queue, then take a whole first_byte timeout; bounded either way.
    return max(10.0, (QUEUE_TIMEOUT + 2 * FIRST_BYTE) * args.time_scale + 5)


def mean_cycle(args, rtf: float) -> float:
    audio = sum(len(t) for t in SENTENCES) / len(SENTENCES) / CHARS_PER_SECOND
    return (audio * (1 + rtf) + sum(THINK) / 2) * args.time_scale


def run_load(args, scheme, host, port, callers, progress) -> Load:
    load = Load(scheme, host, port, callers, args.duration,
                warmup=mean_cycle(args, args.rtf if not args.lb else 1.0),
                scale=args.time_scale, seed=args.seed, call_timeout=call_timeout(args),
                gpu_s_per_char=(None if args.lb else
                                args.rtf * args.time_scale / CHARS_PER_SECOND))
    asyncio.run(drive(load, progress.tick))
    return load


def _short(row: dict) -> str:
    c, lat = row["calls"], row["calls"]["latency_ms"]
    text = (f"{c['completed']} calls, p50 {_fmt(lat['p50'])} ms, p99 {_fmt(lat['p99'])} ms, "
            f"{c['errors']} errors")
    if row.get("backend_crashes"):
        text += f", {row['backend_crashes']} crashes"
    return text


def bench_fleet(args, services: Services, tmp: Path, configs: dict, progress_holder: list,
                not_run: dict) -> list[dict]:
    _log("starting the simulated fleet")
    fleet = start_fleet(services, args)
    targets = list(args.policies)
    if "haproxy" not in not_run:
        problem = check_haproxy(tmp, fleet, args)
        if problem:
            not_run["haproxy"] = problem
            _log(f"leaving HAProxy out: {problem}")
        else:
            targets.append("haproxy")
    progress = Progress(len(targets) * len(args.concurrency),
                        mean_cycle(args, args.rtf) * 2 + args.duration + 1.0)
    progress_holder.append(progress)
    rows = []
    for callers in args.concurrency:          # targets interleaved: drift hits all alike
        for target in targets:
            label = LABELS.get(target, target)
            progress.start_run(f"{label}, {callers} callers")
            wait_ready(fleet, (RESTART_AFTER + LOAD_TIME) * args.time_scale + READY_TIMEOUT)
            reset_fleet(fleet)
            sock = None
            if target == "haproxy":
                svc, sock = start_haproxy(services, tmp, fleet, args, configs)
            else:
                svc = start_lb(services, tmp, fleet, args, target, configs)
            try:
                load = run_load(args, "http", HOST, svc.port, callers, progress)
                proxy = haproxy_stats(sock) if sock else lb_stats(HOST, svc.port)
            finally:
                services.stop(svc)
            # Counters of a crashed server survive its restart: wait for it, then read.
            try:
                wait_ready(fleet, (RESTART_AFTER + LOAD_TIME) * args.time_scale + READY_TIMEOUT)
            except BenchError as exc:
                progress.note(f"warning: {exc}")
            fl = fleet_stats(fleet)
            row = make_row(target, callers, load, proxy, fl)
            rows.append(row)
            progress.end_run(_short(row))
    progress.close()
    return rows


def make_row(target: str, callers: int, load: Load, proxy: dict | None, fl: dict | None) -> dict:
    calls = summarize_calls(load.calls, load.duration)
    retries = (proxy or {}).get("retries")
    # Calls the fallback served, as the callers saw them (x-tts-fallback), in the window.
    cartesia = None if target == "haproxy" else calls["served_by_cartesia"]
    return {
        "target": target, "label": LABELS.get(target, target),
        "kind": "haproxy" if target == "haproxy" else ("external" if target == "lb" else "tts-lb"),
        "concurrency": callers,
        "calls": calls | {"keepalive_resends": load.stale_retries},
        "backend_crashes": fl["crashes"] if fl else None,
        "peak_gpu_in_flight": fl["peak_gpu_in_flight"] if fl else None,
        "retries": retries,
        "cartesia_calls": cartesia,
        "proxy_stats": proxy,
        "fleet_stats": fl,
    }


def bench_external(args, progress_holder: list) -> list[dict]:
    scheme, host, port = args.lb
    try:  # a wrong URL should say so, not fill a table with errors
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise BenchError(f"cannot connect to {scheme}://{host}:{port}: {exc}") from None
    progress = Progress(len(args.concurrency),
                        mean_cycle(args, 1.0) * 2 + args.duration + 1.0)
    progress_holder.append(progress)
    rows = []
    for callers in args.concurrency:
        progress.start_run(f"{callers} callers")
        before = lb_stats(host, port) if scheme == "http" else None
        load = run_load(args, scheme, host, port, callers, progress)
        after = lb_stats(host, port) if scheme == "http" else None
        proxy = _diff(after, before) if after is not None and before is not None else None
        if proxy is not None:  # per-backend lists are snapshots, not counters over the run
            proxy["backends"] = after["backends"]
        row = make_row("lb", callers, load, proxy, None)
        row["label"] = "balancer"   # the URL is in the header
        if proxy is None:
            row["calls"]["note"] = "no /lb-stats: retries unknown"
        rows.append(row)
        progress.end_run(_short(row))
    progress.close()
    return rows


# --------------------------------------------------------------------------- report

def _fmt(v, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: list[dict]) -> str:
    head1 = (f"{'':<18} {'':>7} {'':>5} {'':>6}  {'latency (ms)':^20}  "
             f"{'first audio byte':^20}  {'extra':>5}")
    head2 = (f"{'target':<18} {'callers':>7} {'calls':>5} {'errors':>6}  "
             f"{'p50':>6} {'p95':>6} {'p99':>6}  {'p50':>6} {'p95':>6} {'p99':>6}  "
             f"{'p95':>5}  {'crashes':>7} {'retries':>7} {'cartesia':>8} {'peak':>4}")
    lines = [head1, head2, "-" * len(head2)]
    last = None
    several = len({r["label"] for r in rows}) > 1
    for r in sorted(rows, key=lambda r: r["concurrency"]):
        if several and last is not None and r["concurrency"] != last:
            lines.append("")
        last = r["concurrency"]
        c, lat, tt = r["calls"], r["calls"]["latency_ms"], r["calls"]["ttfa_ms"]
        extra = (c.get("extra_ms") or {}).get("p95")
        lines.append(
            f"{r['label'][:18]:<18} {r['concurrency']:>7} {c['completed']:>5} {c['errors']:>6}  "
            f"{_fmt(lat['p50']):>6} {_fmt(lat['p95']):>6} {_fmt(lat['p99']):>6}  "
            f"{_fmt(tt['p50']):>6} {_fmt(tt['p95']):>6} {_fmt(tt['p99']):>6}  "
            f"{_fmt(extra):>5}  "
            f"{_fmt(r['backend_crashes'], 'd'):>7} {_fmt(r['retries'], 'd'):>7} "
            f"{_fmt(r['cartesia_calls'], 'd'):>8} {_fmt(r['peak_gpu_in_flight'], 'd'):>4}")
    return "\n".join(lines)


def legend(fleet_mode: bool, oom_at: int) -> str:
    out = [
        "callers  concurrent callers.  calls: calls that started in the measured window and got "
        "their audio;",
        "         errors: calls that failed for the caller (a non-200 answer, a reset, a timeout).",
        "latency  the whole call, POST to the last audio byte; first audio byte: call start to the "
        "first byte",
        "         of the audio body.  Percentiles over the calls done.",
    ]
    if fleet_mode:
        out += [
            "extra    latency beyond the GPU's own full-speed work for that sentence: queueing, "
            "time-slicing,",
            "         retries, the proxy (calls Cartesia served left out).",
            "crashes  backend out-of-memory crashes; peak: most syntheses one server held at once "
            + (f"(it crashes past {oom_at})." if oom_at else "(no OOM crash: --oom-at 0)."),
            "retries  the proxy's own retries; cartesia: calls done by the Cartesia fallback "
            "(HAProxy has none: -).",
            "         crashes, retries and peak count the whole run, warm-up included.",
        ]
    else:
        out += [
            "retries  from the balancer's /lb-stats over the run, when it has one (one worker's "
            "view if it runs",
            "         several); cartesia: calls answered with x-tts-fallback.  crashes and peak "
            "are unknown here.",
        ]
    return "\n".join(out)


def observations(rows: list[dict], slots: int, oom_at: int) -> list[str]:
    """What the table says, in words: crashes, overloads, errors, Cartesia's share."""
    notes = []
    at = lambda r: f"{r['label']} at {r['concurrency']}"  # noqa: E731
    crashed = [r for r in rows if r["backend_crashes"]]
    if crashed:
        notes.append("backend crashes: " + ", ".join(
            f"{at(r)} callers: {r['backend_crashes']}" for r in crashed))
        clean = sorted({r["label"] for r in rows} - {r["label"] for r in crashed})
        if clean:
            notes.append("no crash at any level: " + ", ".join(clean))
    elif rows:
        notes.append("no backend crashed in any run")
    over = [r for r in rows if (r["peak_gpu_in_flight"] or 0) > slots]
    if over:
        notes.append(f"more than {slots} syntheses at once on one server (time-sliced, all "
                     f"slower): " + ", ".join(f"{at(r)} (peak {r['peak_gpu_in_flight']})"
                                             for r in over))
    for r in rows:
        servers = (r["proxy_stats"] or {}).get("servers") if r["target"] == "haproxy" else None
        high = [s for s in servers or [] if s["peak"] > slots]
        if high:
            notes.append(f"{at(r)}: HAProxy's own stats show "
                         + ", ".join(f"{s['name']} with {s['peak']}" for s in high)
                         + f" sessions at once, above maxconn {slots}")
    erred = [r for r in rows if r["calls"]["errors"]]
    if erred:
        notes.append("callers saw errors: " + "; ".join(
            f"{at(r)}: " + ", ".join(f"{n} {k}" for k, n in r["calls"]["errors_by_kind"].items())
            for r in erred))
    spilled = [r for r in rows if r["cartesia_calls"]]
    if spilled:
        notes.append("Cartesia served " + ", ".join(
            f"{r['cartesia_calls']} of {r['calls']['completed']} calls for {at(r)}"
            for r in spilled))
    return notes


def write_plot(rows: list[dict], path: Path, title: str) -> str | None:
    """latency.png: p50/p95/p99 latency and p95 first audio byte per target and concurrency;
    points with crashes, errors or a large Cartesia share are labelled so."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no latency.png"
    targets = []
    for r in rows:
        if r["label"] not in targets:
            targets.append(r["label"])
    levels = sorted({r["concurrency"] for r in rows})
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    panels = [("latency_ms", "p50", "latency p50"), ("latency_ms", "p95", "latency p95"),
              ("latency_ms", "p99", "latency p99"), ("ttfa_ms", "p95", "first audio byte p95")]
    for ax, (what, pct, name) in zip(axes.flat, panels):
        for t in targets:
            pts = sorted((r["concurrency"], r["calls"][what][pct], r) for r in rows
                         if r["label"] == t and r["calls"][what][pct] is not None)
            if not pts:
                continue
            style = "--" if t == "haproxy" else "-"
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=t)
            for x, y, r in pts:  # a point that is not the fleet's doing says so
                why = []
                if r["backend_crashes"]:
                    why.append(f"{r['backend_crashes']} crashes")
                done = r["calls"]["completed"]
                if r["cartesia_calls"] and done and r["cartesia_calls"] / done >= 0.1:
                    why.append(f"{r['cartesia_calls'] * 100 // done}% Cartesia")
                if r["calls"]["errors"]:
                    why.append(f"{r['calls']['errors']} errors")
                if why:
                    last = x == max(levels)
                    ax.annotate(", ".join(why), (x, y), textcoords="offset points",
                                xytext=(-4 if last else 4, 6), ha="right" if last else "left",
                                fontsize=7, color=line.get_color())
        ax.set_title(name)
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("concurrent callers")
    for ax in axes.flat:
        ax.set_xticks(levels)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------- main

def _log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _on_signal(signum, _frame):
    raise Stop(signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    tmp = make_tmp()
    services = Services(tmp)
    progress_holder: list[Progress] = []
    try:
        return _bench(args, services, tmp, progress_holder)
    except BenchError as exc:
        _close(progress_holder)
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _close(progress_holder)
        print("\nbench: interrupted; stopping everything", file=sys.stderr)
        return 130
    except Stop as exc:
        _close(progress_holder)
        print(f"\nbench: got signal {exc.args[0]}; stopping everything", file=sys.stderr)
        return 128 + exc.args[0]
    finally:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip this
        try:
            services.stop_all()
        finally:
            signal.signal(signal.SIGINT, old)
            shutil.rmtree(tmp, ignore_errors=True)


def _wrap(line: str, width: int = 110) -> str:
    """A header line "  key      : text" wrapped under its text."""
    if len(line) <= width or " : " not in line:
        return line
    key, _, text = line.partition(" : ")
    return textwrap.fill(text, width, initial_indent=key + " : ",
                         subsequent_indent=" " * (len(key) + 3), break_on_hyphens=False)


def _close(holder: list) -> None:
    for p in holder:
        p.close()


def _bench(args, services: Services, tmp: Path, progress_holder: list) -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results_dir = (Path(args.results).expanduser() if args.results
                   else RESULTS_DIR / f"concurrency-{stamp}")
    configs: dict[str, str] = {}   # written beside the results at the end
    s = args.time_scale
    speed = f"{1 / s:g}x real time" if s < 1 else "real time"
    not_run: dict[str, str] = {}
    haproxy_version = None
    if args.lb is None:
        if args.no_haproxy:
            not_run["haproxy"] = "--no-haproxy"
        elif not shutil.which("haproxy"):
            not_run["haproxy"] = "haproxy not on PATH: apt-get install -y haproxy"
        else:
            haproxy_version = tool_version(["haproxy", "-v"], r"version (\S+)")
    os.environ[KEY_ENV] = secrets.token_hex(16)  # for the fake Cartesia and the balancer alike

    audio = [len(t) / CHARS_PER_SECOND for t in SENTENCES]
    meta = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seed": args.seed,
        "time_scale": s, "duration_s": args.duration, "concurrency": list(args.concurrency),
        "warmup_s": round(mean_cycle(args, args.rtf if not args.lb else 1.0), 3),
        "call": {"synthesize": f"POST {SYNTH_PATH}", "sentences": len(SENTENCES),
                 "audio_s_min": round(min(audio), 2), "audio_s_max": round(max(audio), 2),
                 "audio_s_mean": round(sum(audio) / len(audio), 2), "think_s": list(THINK),
                 "timeout_s": round(call_timeout(args), 2)},
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "machine": platform.platform(),
    }
    header = ["tts-lb concurrency benchmark: closed-loop voice-agent callers"]
    if args.lb is None:
        meta.update(mode="simulated fleet", policies=list(args.policies), backends=args.backends,
                    slots=args.slots, oom_at=args.oom_at, rtf=args.rtf,
                    spillover=args.spillover,
                    haproxy=(f"HAProxy {haproxy_version}" if haproxy_version
                             else f"not run ({not_run['haproxy']})"))
        cycle_real = mean_cycle(args, args.rtf) / s
        busy = (sum(audio) / len(audio)) * args.rtf / cycle_real
        header += [
            f"  time     : the simulated world runs at {speed} (--time-scale {s:g}); latencies "
            f"below are wall-clock ms{f', x{1 / s:g} for real-world time' if s < 1 else ''}",
            f"  fleet    : {args.backends} x backends.chatterbox, {args.slots} slots each at "
            f"rtf {args.rtf:g} (GPU s per audio s), "
            + (f"out of memory past {args.oom_at} at once" if args.oom_at else "no OOM")
            + f", a crash = {RESTART_AFTER:g} s down + {LOAD_TIME:g} s loading (real-world)",
            f"  calls    : POST {SYNTH_PATH} (one of {len(SENTENCES)} sentences, "
            f"{min(audio):.1f}-{max(audio):.0f} s of audio), GET its audio_url, play it, think "
            f"{THINK[0]:g}-{THINK[1]:g} s, repeat; a caller keeps a GPU slot busy "
            f"~{busy * 100:.0f}% of the time at full speed, so {args.backends * args.slots} "
            f"slots fill at ~{args.backends * args.slots / busy:.0f} callers",
            f"  tts-lb   : python -m lb per run, max_concurrency {args.slots} (= slots; none for "
            f"'random, no limit'), queue {QUEUE_TIMEOUT:g} s, 2 attempts, passive + active "
            f"health, Cartesia fallback on (fake, {CARTESIA_CONCURRENCY} at once), spillover "
            f"{'on' if args.spillover else 'off'}",
            "  haproxy  : " + (f"HAProxy {haproxy_version}: balance leastconn, maxconn "
                                f"{args.slots} per server, queue (timeout queue "
                                f"{QUEUE_TIMEOUT:g} s), retries 1 + redispatch, httpchk "
                                "/health, audio GETs pinned by cookie; no fallback"
                                if haproxy_version else f"not run ({not_run['haproxy']})"),
        ]
    else:
        scheme, host, port = args.lb
        meta.update(mode="external balancer", lb=f"{scheme}://{host}:{port}")
        header += [
            f"  target   : {scheme}://{host}:{port} (already running; nothing else started)",
            f"  calls    : POST {SYNTH_PATH}, GET its audio_url, play it, think "
            f"{THINK[0]:g}-{THINK[1]:g} s, repeat; playing and thinking at {speed} "
            f"(--time-scale {s:g})",
        ]
        if args.ignored:
            header.append(f"  note     : ignored with --lb (they describe the simulated "
                          f"fleet): {', '.join(args.ignored)}")
    header.append(f"  runs     : {args.duration:g} s measured per run after a "
                  f"{meta['warmup_s']:g} s warm-up; seed {args.seed}; {os.cpu_count()} CPUs "
                  f"shared by everything")
    print("\n".join(_wrap(line) for line in header), flush=True)

    if args.lb is None:
        rows = bench_fleet(args, services, tmp, configs, progress_holder, not_run)
    else:
        rows = bench_external(args, progress_holder)

    print()
    print(format_table(rows))
    print()
    print(legend(args.lb is None, args.oom_at))
    notes = observations(rows, args.slots, args.oom_at) if args.lb is None else []
    for n in notes:
        print(textwrap.fill(n, 110, initial_indent="  * ", subsequent_indent="    "))
    for name, why in not_run.items():
        print(f"  * {name}: not run ({why})")

    doc = {"meta": meta, "not_run": not_run, "results": rows, "observations": notes}
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    for name, text in configs.items():
        (results_dir / name).write_text(text)
    title = (f"{args.backends} simulated GPU servers x {args.slots} slots, time x{s:g}"
             if args.lb is None else f"{meta['lb']}")
    problem = write_plot(rows, results_dir / "latency.png", f"tts-lb concurrency: {title}")
    print()
    if problem:
        print(f"note: {problem}")
    print(f"results: {results_dir}/ (results.json"
          + ("" if problem else ", latency.png")
          + (", the configs used" if args.lb is None else "") + ")", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
