"""Throughput benchmark: a fast backend directly, through tts-lb, and through HAProxy.

Run it:   python -m bench.throughput [--duration 5] [--connections 50] [--repeat 3]
                                     [--skip-haproxy] [--json PATH] [--profile]

Everything runs on 127.0.0.1.  One backend is started (nginx when it is on PATH,
else backends.echo), then the balancer (`python -m lb`) and HAProxy (nbthread 1,
to match the single-process balancer) in front of it.  Two workloads are
measured against each of the three targets:

  small   keep-alive GET / ("ok\\n"), --connections connections:
          requests/s, p50 and p99 latency
  large   keep-alive GET of a --body-mib MiB body, over --large-connections
          connections, for the whole run: MiB/s

The load comes from wrk when it is on PATH (`wrk -t1 -cN -dDs --latency`), else
from a closed-loop Python client (threads with http.client).  Each cell is run
--repeat times, interleaving the targets, and the median is reported.
--profile adds one extra small-request run against a balancer started under
cProfile and prints its top functions.  Every process started here is stopped
at the end, also on Ctrl-C, SIGTERM or an error; every run is bounded in time.
See bench/README.md.
"""
from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import pstats
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
START_TIMEOUT = 20.0      # a service must be ready within this
STOP_TIMEOUT = 10.0       # after the stop signal, before SIGKILL
PROFILE_STOP_TIMEOUT = 60.0  # cProfile writes its file on the way out
RUN_GRACE = 30.0          # a load run may overrun its duration by this much, then it's killed
WARMUP_SECONDS = 1
TOP_N = 25
TMP_PREFIX = "tts-lb-bench-"
TARGETS = ("direct", "lb", "haproxy")
WORKLOADS = ("small", "large")


class BenchError(Exception):
    """Something went wrong that the user should read about; exit code 1."""


class Stop(BaseException):
    """SIGTERM/SIGHUP received: unwind like Ctrl-C so everything gets stopped."""


# --------------------------------------------------------------------------- arguments

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse already exits 2; make the message say how to get help
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n(see --help)\n")


def _int_range(lo: int, hi: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{what} must be between {lo} and {hi}, got {value}")
        return value
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m bench.throughput",
                description="Measure a fast local backend directly, through tts-lb and through "
                            "HAProxy, on 127.0.0.1 (see bench/README.md).")
    p.add_argument("--duration", type=_int_range(1, 600, "--duration"), default=5,
                   metavar="SECONDS", help="seconds per run (whole seconds, wrk's unit; default 5)")
    p.add_argument("--connections", type=_int_range(1, 1000, "--connections"), default=50,
                   metavar="N", help="keep-alive connections for the small-request workload "
                                     "(default 50)")
    p.add_argument("--repeat", type=_int_range(1, 50, "--repeat"), default=3, metavar="N",
                   help="runs per target and workload; the median is reported (default 3)")
    p.add_argument("--skip-haproxy", action="store_true", help="do not measure HAProxy")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--profile", action="store_true",
                   help="also run the balancer under cProfile during one small-request run and "
                        f"print the top {TOP_N} functions by cumulative and by own time")
    p.add_argument("--profile-out", metavar="PATH",
                   help="with --profile: keep the raw cProfile file at PATH (pstats format)")
    p.add_argument("--body-mib", type=_int_range(1, 4096, "--body-mib"), default=100,
                   metavar="MIB", help="size of the large streamed body in MiB (default 100)")
    p.add_argument("--large-connections", type=_int_range(1, 64, "--large-connections"),
                   default=4, metavar="N",
                   help="connections for the large-body workload (default 4)")
    p.add_argument("--backend", choices=("auto", "nginx", "echo"), default="auto",
                   help="auto: nginx if on PATH, else backends.echo (default auto)")
    p.add_argument("--client", choices=("auto", "wrk", "python"), default="auto",
                   help="auto: wrk if on PATH, else the Python client (default auto)")
    args = p.parse_args(argv)

    if args.backend == "nginx" and not shutil.which("nginx"):
        p.error("--backend nginx: nginx is not on PATH (apt-get install -y nginx)")
    if args.client == "wrk" and not shutil.which("wrk"):
        p.error("--client wrk: wrk is not on PATH (apt-get install -y wrk)")
    if args.profile_out and not args.profile:
        p.error("--profile-out needs --profile")
    for opt in ("json", "profile_out"):
        path = getattr(args, opt)
        if path is not None:
            parent = Path(path).expanduser().resolve().parent
            if not parent.is_dir():
                p.error(f"--{opt.replace('_', '-')} {path}: directory {parent} does not exist")
            if Path(path).is_dir():
                p.error(f"--{opt.replace('_', '-')} {path}: is a directory")
    return args


# --------------------------------------------------------------------------- processes

def _pdeathsig():
    """Child side (preexec_fn): die with SIGTERM if the benchmark itself is killed."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


try:
    import ctypes
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _PRCTL = None


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    log_path: Path
    stop_signal: int = signal.SIGTERM
    port: int = 0
    returncode: int | None = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in text.splitlines()[-lines:]) or "    (empty log)"


class Services:
    """Starts services in their own sessions and stops every one of them, newest first."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.running: list[Service] = []

    def start(self, name: str, argv: list[str], *, stop_signal=signal.SIGTERM) -> Service:
        log_path = self.tmp / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_pdeathsig)
        svc = Service(name, proc, log_path, stop_signal)
        self.running.append(svc)
        return svc

    def wait_log(self, svc: Service, pattern: str, timeout: float = START_TIMEOUT) -> re.Match:
        """Wait until the service's log matches `pattern` (a regex)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            try:
                match = rx.search(svc.log_path.read_text(errors="replace"))
            except OSError:
                match = None
            if match:
                return match
            self._check_alive(svc)
            if time.monotonic() > deadline:
                raise BenchError(f"{svc.name} did not start within {timeout:.0f} s; its log:\n"
                                 f"{svc.log_tail()}")
            time.sleep(0.05)

    def wait_port(self, svc: Service, port: int, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((HOST, port), timeout=0.5).close()
                return
            except OSError:
                pass
            self._check_alive(svc)
            if time.monotonic() > deadline:
                raise BenchError(f"{svc.name} did not accept connections on {HOST}:{port} "
                                 f"within {timeout:.0f} s; its log:\n{svc.log_tail()}")
            time.sleep(0.05)

    @staticmethod
    def _check_alive(svc: Service) -> None:
        if svc.proc.poll() is not None:
            raise BenchError(f"{svc.name} exited with code {svc.proc.returncode} while starting; "
                             f"its log:\n{svc.log_tail()}")

    def stop(self, svc: Service, timeout: float = STOP_TIMEOUT) -> int:
        """Signal the service's process group, wait, SIGKILL if needed. Returns the exit code."""
        if svc in self.running:
            self.running.remove(svc)
        proc = svc.proc
        if proc.poll() is None:
            _killpg(proc.pid, svc.stop_signal)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"bench: {svc.name} ignored signal {svc.stop_signal} for {timeout:.0f} s: "
                      "killing it", file=sys.stderr)
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        _killpg(proc.pid, signal.SIGKILL)  # anything it left behind in its group
        svc.returncode = proc.returncode
        return proc.returncode

    def stop_all(self) -> None:
        for svc in reversed(list(self.running)):
            try:
                code = self.stop(svc)
                if code not in (0, -svc.stop_signal):  # haproxy -db dies of SIGTERM: fine
                    print(f"bench: note: {svc.name} exited with code {code} when stopped",
                          file=sys.stderr)
            except Exception as exc:  # keep stopping the others
                print(f"bench: could not stop {svc.name} (pid {svc.proc.pid}): {exc}",
                      file=sys.stderr)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)  # the group of a child started with start_new_session=True
    except (ProcessLookupError, PermissionError):
        pass


def make_tmp() -> Path:
    """A fresh temp dir holding our pid; dirs left by a killed run (dead pid) are removed."""
    base = Path(tempfile.gettempdir())
    for old in base.glob(TMP_PREFIX + "*"):
        try:
            pid = int((old / "bench.pid").read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)  # its benchmark is gone (SIGKILL?)
        except (OSError, ValueError):
            pass  # not ours to judge: no pid file yet, or someone else's
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    (tmp / "bench.pid").write_text(f"{os.getpid()}\n")
    return tmp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def tool_version(argv: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    match = re.search(pattern, out.stdout + out.stderr)
    return match.group(1) if match else "?"


# --------------------------------------------------------------------------- backends

@dataclass
class Backend:
    kind: str         # "nginx" or "echo"
    description: str
    port: int
    small_path: str
    large_path: str


def start_nginx(services: Services, tmp: Path, body_bytes: int) -> Backend:
    root = tmp / "nginx"
    www = root / "www"
    www.mkdir(parents=True)
    (www / "ok.txt").write_bytes(b"ok\n")
    _write_big_file(www / "big.bin", body_bytes)
    version = tool_version(["nginx", "-v"], r"nginx/(\S+)")
    for attempt in range(3):  # the free port could be taken between probe and bind: retry
        port = free_port()
        conf = root / "nginx.conf"
        conf.write_text(f"""\
daemon off;
master_process off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/err.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 75s;
    keepalive_requests 100000000;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen {HOST}:{port} backlog=4096;
        root {www};
        location = / {{ default_type text/plain; return 200 "ok\\n"; }}
        location = /big.bin {{ }}
        location / {{ return 404; }}
    }}
}}
""")
        svc = services.start("nginx", ["nginx", "-p", str(root), "-e", str(root / "err.log"),
                                       "-c", str(conf)], stop_signal=signal.SIGTERM)
        try:
            services.wait_port(svc, port)
        except BenchError:
            if svc.proc.poll() is not None and attempt < 2:
                services.stop(svc)
                continue
            raise
        svc.port = port
        return Backend("nginx", f"nginx {version} (1 worker, master_process off; static "
                                f"'ok\\n' and a {_mib(body_bytes)} file)",
                       port, "/", "/big.bin")
    raise AssertionError("unreachable")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


def _write_big_file(path: Path, size: int) -> None:
    block = (b"0123456789abcdefghijklmnopqrstuvwxyz\n" * 28340)[:1 << 20]
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(block[:min(left, len(block))])
            left -= len(block)


def start_echo(services: Services, body_bytes: int) -> Backend:
    svc = services.start("echo", [sys.executable, "-m", "backends.echo", "--host", HOST,
                                  "--port", "0"])
    match = services.wait_log(svc, r"listening on [\d.]+:(\d+)")
    svc.port = int(match.group(1))
    return Backend("echo", "backends.echo (pure Python; likely the bottleneck, so lb/direct "
                           "understates the balancer's cost)",
                   svc.port, "/", f"/bytes?n={body_bytes}")


def start_lb(services: Services, tmp: Path, backend: Backend, connections: int,
             profile_path: Path | None = None) -> Service:
    name = "lb-profiled" if profile_path else "lb"
    conf = tmp / f"{name}.toml"
    conf.write_text(f"""\
# written by bench/throughput.py
[listen]
address = "{HOST}:0"

[pool]
max_idle = {max(32, connections * 2)}   # keep every upstream connection the load needs

[log]
access = false
level = "info"

[balancer]
max_concurrency = {max(1000, connections * 2)}   # the data plane, not the GPU limit, is measured

[[backend]]
name = "bench"
url = "http://{HOST}:{backend.port}"
""")
    if profile_path is None:
        argv = [sys.executable, "-m", "lb", "-c", str(conf)]
    else:  # cProfile writes its file when lb returns: stop it with SIGINT, which lb handles
        argv = [sys.executable, "-m", "cProfile", "-o", str(profile_path), "-m", "lb",
                "-c", str(conf)]
    svc = services.start(name, argv, stop_signal=signal.SIGINT)
    match = services.wait_log(svc, r"listening on [\d.]+:(\d+)")
    svc.port = int(match.group(1))
    return svc


def start_haproxy(services: Services, tmp: Path, backend: Backend) -> tuple[Service, str]:
    version = tool_version(["haproxy", "-v"], r"version (\S+)")
    for attempt in range(3):
        port = free_port()
        conf = tmp / "haproxy.cfg"
        conf.write_text(f"""\
# written by bench/throughput.py: HTTP mode, keep-alive both sides, single-threaded
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 60s

frontend bench_in
    bind {HOST}:{port}
    default_backend bench_out

backend bench_out
    server backend1 {HOST}:{backend.port}
""")
        svc = services.start("haproxy", ["haproxy", "-db", "-f", str(conf)])
        try:
            services.wait_port(svc, port)
        except BenchError:
            if svc.proc.poll() is not None and attempt < 2:
                services.stop(svc)
                continue
            raise
        svc.port = port
        return svc, version
    raise AssertionError("unreachable")


def sanity_check(name: str, port: int, backend: Backend, body_bytes: int) -> None:
    """One small and one full large request, checked, before measuring anything."""
    try:
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        conn.request("GET", backend.small_path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200 or body != b"ok\n":
            raise BenchError(f"{name}: GET {backend.small_path} answered {resp.status} "
                             f"{body[:100]!r}, expected 200 'ok\\n'")
        conn.request("GET", backend.large_path)
        resp = conn.getresponse()
        total, buf = 0, bytearray(1 << 20)
        deadline = time.monotonic() + 60
        while (n := resp.readinto(buf)):
            total += n
            if time.monotonic() > deadline:
                raise BenchError(f"{name}: the large body took more than 60 s")
        if resp.status != 200 or total != body_bytes:
            raise BenchError(f"{name}: GET {backend.large_path} answered {resp.status} with "
                             f"{total} bytes, expected 200 with {body_bytes}")
        conn.close()
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"{name}: sanity check on {HOST}:{port} failed: {exc!r}") from None


# --------------------------------------------------------------------------- load clients

@dataclass
class Result:
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    mib_s: float | None = None
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0


_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_SIZE_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def parse_wrk(text: str) -> Result:
    """wrk 4's report -> Result (latencies in ms; sizes use wrk's binary units)."""
    def one(pattern: str) -> re.Match | None:
        return re.search(pattern, text, re.MULTILINE)

    def latency(pct: str) -> float | None:
        m = one(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m|h)\s*$")
        return float(m.group(1)) * _TIME_UNITS[m.group(2)] if m else None

    rps = one(r"^Requests/sec:\s+([\d.]+)")
    transfer = one(r"^Transfer/sec:\s+([\d.]+)([KMGT]?B)")
    total = one(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)")
    if rps is None or total is None:
        raise BenchError(f"could not parse wrk's output:\n{text}")
    r = Result(rps=float(rps.group(1)), p50_ms=latency("50"), p99_ms=latency("99"),
               requests=int(total.group(1)),
               seconds=float(total.group(2)) * _TIME_UNITS[total.group(3)] / 1e3)
    if transfer:
        r.mib_s = float(transfer.group(1)) * _SIZE_UNITS[transfer.group(2)] / (1 << 20)
    socket_errors = one(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
    if socket_errors:
        r.errors += sum(int(g) for g in socket_errors.groups())
    non2xx = one(r"Non-2xx or 3xx responses: (\d+)")
    if non2xx:
        r.errors += int(non2xx.group(1))
    return r


def run_wrk(url: str, connections: int, duration: int, *, latency: bool,
            timeout_s: int | None = None) -> Result:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s"]
    if timeout_s is not None:
        argv.append(f"--timeout={timeout_s}s")
    if latency:
        argv.append("--latency")
    argv.append(url)
    try:  # subprocess.run kills wrk on timeout and on any exception (Ctrl-C included)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + RUN_GRACE,
                             stdin=subprocess.DEVNULL, preexec_fn=_pdeathsig)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish within {duration + RUN_GRACE:.0f} s: "
                         f"{' '.join(argv)}") from None
    if out.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited with {out.returncode}:\n{out.stdout}"
                         f"{out.stderr}")
    return parse_wrk(out.stdout)


def _percentile(sorted_values: list[float], pct: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))  # nearest rank
    return sorted_values[rank - 1]


def _run_threads(workers: list[threading.Thread], stop: threading.Event, duration: float):
    for t in workers:
        t.start()
    try:
        deadline = time.monotonic() + duration + RUN_GRACE
        for t in workers:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in workers):
            raise BenchError(f"the Python client did not finish within {duration + RUN_GRACE:.0f} s")
    finally:
        stop.set()  # on Ctrl-C too: every worker checks it between requests/chunks


def py_small(port: int, path: str, connections: int, duration: float) -> Result:
    """Closed loop: each thread sends GET path on its keep-alive connection, waits, repeats."""
    stop = threading.Event()
    start = time.perf_counter()
    end = start + duration
    latencies: list[list[float]] = []
    errors, finished = [0] * connections, [start] * connections

    def worker(i: int):
        lats: list[float] = []
        latencies.append(lats)
        conn = None
        while not stop.is_set():
            t0 = time.perf_counter()
            if t0 >= end:
                break
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(HOST, port, timeout=10)
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                t1 = time.perf_counter()
                lats.append(t1 - t0)
                finished[i] = t1
                if resp.status != 200:
                    errors[i] += 1
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                errors[i] += 1
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    _run_threads([threading.Thread(target=worker, args=(i,), daemon=True)
                  for i in range(connections)], stop, duration)
    every = sorted(x * 1e3 for lats in latencies for x in lats)
    seconds = max(max(finished) - start, 1e-9)
    return Result(rps=len(every) / seconds, p50_ms=_percentile(every, 50),
                  p99_ms=_percentile(every, 99), requests=len(every), errors=sum(errors),
                  seconds=seconds)


def py_large(port: int, path: str, connections: int, duration: float) -> Result:
    """Each thread GETs the large body over and over, reading 1 MiB at a time, until the end."""
    stop = threading.Event()
    start = time.perf_counter()
    end = start + duration
    got, done, errors = [0] * connections, [0] * connections, [0] * connections

    def worker(i: int):
        buf = bytearray(1 << 20)
        conn = None
        while not stop.is_set() and time.perf_counter() < end:
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(HOST, port, timeout=10)
                conn.request("GET", path)
                resp = conn.getresponse()
                if resp.status != 200:
                    errors[i] += 1
                while (n := resp.readinto(buf)):
                    got[i] += n
                    if stop.is_set() or time.perf_counter() >= end:
                        break
                else:
                    done[i] += 1
                    if not resp.will_close:
                        continue
                conn.close()  # stopped mid-body, or the server closes: new connection
                conn = None
            except (OSError, http.client.HTTPException):
                errors[i] += 1
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    _run_threads([threading.Thread(target=worker, args=(i,), daemon=True)
                  for i in range(connections)], stop, duration)
    seconds = max(time.perf_counter() - start, 1e-9)
    return Result(mib_s=sum(got) / seconds / (1 << 20), requests=sum(done),
                  errors=sum(errors), seconds=seconds)


@dataclass
class Client:
    kind: str  # "wrk" or "python"
    description: str

    def small(self, port: int, path: str, connections: int, duration: int) -> Result:
        if self.kind == "wrk":
            return run_wrk(f"http://{HOST}:{port}{path}", connections, duration, latency=True)
        return py_small(port, path, connections, duration)

    def large(self, port: int, path: str, connections: int, duration: int) -> Result:
        if self.kind == "wrk":
            # A 100 MiB response takes longer than wrk's default 2 s timeout through a slow
            # proxy; the timeout only counts (it aborts nothing), so raise it.
            return run_wrk(f"http://{HOST}:{port}{path}", connections, duration, latency=False,
                           timeout_s=duration + 60)
        return py_large(port, path, connections, duration)


# --------------------------------------------------------------------------- profile

def _short_path(filename: str) -> str:
    if filename == "~" or filename.startswith("<"):
        return filename if filename != "~" else ""
    path = Path(filename)
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        pass
    text = str(path)
    for marker in ("site-packages/", "dist-packages/"):
        if marker in text:
            return text.split(marker, 1)[1]
    stdlib = sysconfig.get_paths()["stdlib"]
    if text.startswith(stdlib + os.sep):
        return "stdlib/" + text[len(stdlib) + 1:]
    return text


def _func_label(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    where = _short_path(filename)
    return f"{where}:{line}({name})" if where else name  # built-ins: "<built-in method ...>"


def profile_top(path: Path, n: int = TOP_N) -> dict[str, list[dict]]:
    stats = pstats.Stats(str(path), stream=open(os.devnull, "w"))
    rows = []
    for func, (cc, nc, tt, ct, _callers) in stats.stats.items():
        rows.append({"function": _func_label(func), "ncalls": nc, "primitive_calls": cc,
                     "tottime_s": tt, "cumtime_s": ct})
    return {"cumulative": sorted(rows, key=lambda r: -r["cumtime_s"])[:n],
            "tottime": sorted(rows, key=lambda r: -r["tottime_s"])[:n],
            "total_s": stats.total_tt}


def format_profile(rows: list[dict], title: str) -> str:
    out = [title, f"  {'ncalls':>10} {'tottime':>9} {'cumtime':>9} {'tt/call':>8}  function"]
    for r in rows:
        per = r["tottime_s"] / r["ncalls"] * 1e6 if r["ncalls"] else 0.0
        out.append(f"  {r['ncalls']:>10} {r['tottime_s']:>9.3f} {r['cumtime_s']:>9.3f} "
                   f"{per:>8.2f}  {r['function']}")
    return "\n".join(out)


# --------------------------------------------------------------------------- report

def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[Result]) -> dict:
    return {
        "rps": _median([r.rps for r in runs]),
        "p50_ms": _median([r.p50_ms for r in runs]),
        "p99_ms": _median([r.p99_ms for r in runs]),
        "mib_s": _median([r.mib_s for r in runs]),
        "errors": sum(r.errors for r in runs),
        "rps_runs": [r.rps for r in runs],
        "mib_s_runs": [r.mib_s for r in runs],
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(summary: dict) -> dict:
    out = {}
    for other in ("haproxy", "direct"):
        key = f"lb/{other}"
        lb, them = summary["small"].get("lb"), summary["small"].get(other)
        big_lb, big_them = summary["large"].get("lb"), summary["large"].get(other)
        out[key] = {
            "small_rps": _ratio(lb and lb["rps"], them and them["rps"]),
            "small_p50": _ratio(lb and lb["p50_ms"], them and them["p50_ms"]),
            "small_p99": _ratio(lb and lb["p99_ms"], them and them["p99_ms"]),
            "large_mib_s": _ratio(big_lb and big_lb["mib_s"], big_them and big_them["mib_s"]),
        }
    return out


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1e3:.0f} us"
    return f"{value:.2f} ms" if value < 100 else f"{value:.0f} ms"


def _spread(values: list[float | None], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return ""
    return f"{format(min(values), fmt)}..{format(max(values), fmt)}"


def format_table(summary: dict, rat: dict, meta: dict, not_run: dict[str, str]) -> str:
    lines = []
    w = 9
    head = (f"{'workload':<30} {'target':<8} {'req/s':>{w}} {'p50':>{w}} {'p99':>{w}} "
            f"{'MiB/s':>{w}} {'errors':>6}  runs (min..max)")
    lines += [head, "-" * len(head)]
    labels = {
        "small": f"small: GET / keep-alive, c={meta['connections']}",
        "large": f"large: GET {meta['body_mib']} MiB body, "
                 f"c={meta['large_connections']}",
    }
    for wl in WORKLOADS:
        first = True
        for target in TARGETS:
            label = labels[wl] if first else ""
            first = False
            s = summary[wl].get(target)
            if s is None:
                lines.append(f"{label:<30} {target:<8} not run ({not_run.get(target, 'skipped')})")
                continue
            if wl == "small":
                spread = _spread(s["rps_runs"], ".0f") + (" req/s" if len(s["rps_runs"]) > 1
                                                         else "")
                lines.append(f"{label:<30} {target:<8} {_num(s['rps'], ',.0f'):>{w}} "
                             f"{_ms(s['p50_ms']):>{w}} {_ms(s['p99_ms']):>{w}} {'-':>{w}} "
                             f"{s['errors']:>6}  {spread}")
            else:
                spread = _spread(s["mib_s_runs"], ".0f") + (" MiB/s" if len(s["mib_s_runs"]) > 1
                                                           else "")
                lines.append(f"{label:<30} {target:<8} {'-':>{w}} {'-':>{w}} {'-':>{w}} "
                             f"{_num(s['mib_s'], ',.1f'):>{w}} {s['errors']:>6}  {spread}")
    lines.append("")
    lines.append("ratios (medians; throughput: higher is better for lb, latency: lower is better)")
    lines.append(f"  {'':<22} {'lb/haproxy':>10} {'lb/direct':>10}")
    for key, label in (("small_rps", "small req/s"), ("small_p50", "small p50 latency"),
                       ("small_p99", "small p99 latency"), ("large_mib_s", "large MiB/s")):
        lines.append(f"  {label:<22} {_num(rat['lb/haproxy'][key], '.2f'):>10} "
                     f"{_num(rat['lb/direct'][key], '.2f'):>10}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def _on_signal(signum, _frame):
    raise Stop(signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    tmp = make_tmp()
    services = Services(tmp)
    try:
        return _bench(args, services, tmp)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench: interrupted; stopping everything", file=sys.stderr)
        return 130
    except Stop as exc:
        print(f"\nbench: got signal {exc.args[0]}; stopping everything", file=sys.stderr)
        return 128 + exc.args[0]
    finally:
        # Ctrl-C again while stopping would leave processes behind: ignore it meanwhile
        # (each stop is bounded, so this ends).
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            services.stop_all()
        finally:
            signal.signal(signal.SIGINT, old)
            shutil.rmtree(tmp, ignore_errors=True)


def _log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _bench(args: argparse.Namespace, services: Services, tmp: Path) -> int:
    body_bytes = args.body_mib << 20
    use_nginx = args.backend == "nginx" or (args.backend == "auto" and shutil.which("nginx"))
    use_wrk = args.client == "wrk" or (args.client == "auto" and shutil.which("wrk"))
    not_run: dict[str, str] = {}
    if args.skip_haproxy:
        not_run["haproxy"] = "--skip-haproxy"
    elif not shutil.which("haproxy"):
        not_run["haproxy"] = "haproxy not on PATH: apt-get install -y haproxy"

    if use_wrk:
        wrk_version = tool_version(["wrk", "--version"], r"wrk (?:debian/)?(\S+)")
        client = Client("wrk", f"wrk {wrk_version} "
                               f"(-t1 -c{args.connections} --latency; large: "
                               f"-t1 -c{args.large_connections})")
    else:
        client = Client("python", f"Python closed-loop client, {args.connections} threads with "
                                  f"keep-alive http.client connections (wrk not on PATH: the "
                                  f"client itself may be the bottleneck)")

    _log("starting the backend")
    backend = (start_nginx(services, tmp, body_bytes) if use_nginx
               else start_echo(services, body_bytes))
    ports = {"direct": backend.port}
    _log("starting lb")
    ports["lb"] = start_lb(services, tmp, backend, args.connections).port
    haproxy_version = None
    if "haproxy" not in not_run:
        _log("starting haproxy")
        svc, haproxy_version = start_haproxy(services, tmp, backend)
        ports["haproxy"] = svc.port
    targets = [t for t in TARGETS if t in ports]

    meta = {
        "backend": backend.kind, "backend_description": backend.description,
        "client": client.kind, "client_description": client.description,
        "haproxy": (f"HAProxy {haproxy_version}, nbthread 1 (single-threaded to match the "
                    f"single-process lb), mode http, keep-alive, http-reuse always"
                    if haproxy_version else f"not run ({not_run.get('haproxy')})"),
        "duration_s": args.duration, "repeat": args.repeat, "connections": args.connections,
        "large_connections": args.large_connections, "body_mib": args.body_mib,
        "small_path": backend.small_path, "large_path": backend.large_path,
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "machine": platform.platform(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    header = "\n".join([
        "tts-lb throughput benchmark (127.0.0.1 only)",
        f"  backend : {meta['backend_description']}",
        f"  lb      : python -m lb, single process (uvloop), access log off, "
        f"pool.max_idle {max(32, args.connections * 2)}",
        f"  haproxy : {meta['haproxy']}",
        f"  client  : {meta['client_description']}",
        f"  runs    : {args.duration} s each, {args.repeat} per cell (targets interleaved), "
        f"median reported; {meta['cpus']} CPUs shared by client, proxy and backend",
    ])
    print(header, flush=True)

    for target in targets:
        sanity_check(target, ports[target], backend, body_bytes)
    _log("sanity checks passed; warming up")
    for target in targets:
        client.small(ports[target], backend.small_path, args.connections, WARMUP_SECONDS)

    runs: dict[str, dict[str, list[Result]]] = {wl: {t: [] for t in targets} for wl in WORKLOADS}
    for i in range(args.repeat):
        for wl in WORKLOADS:
            for target in targets:
                if wl == "small":
                    r = client.small(ports[target], backend.small_path, args.connections,
                                     args.duration)
                    shown = (f"{r.rps:,.0f} req/s, p50 {_ms(r.p50_ms)}, p99 {_ms(r.p99_ms)}")
                else:
                    r = client.large(ports[target], backend.large_path, args.large_connections,
                                     args.duration)
                    shown = f"{r.mib_s:,.1f} MiB/s ({r.requests} bodies completed)"
                if r.errors:
                    shown += f", {r.errors} errors"
                _log(f"run {i + 1}/{args.repeat} {wl:<5} {target:<7} {shown}")
                runs[wl][target].append(r)

    summary = {wl: {t: summarize(runs[wl][t]) for t in targets} for wl in WORKLOADS}
    rat = ratios(summary)
    print()
    print(format_table(summary, rat, meta, not_run), flush=True)

    profile = None
    if args.profile:
        profile = run_profile(args, services, tmp, backend, client)

    if args.json:
        doc = {"meta": meta, "summary": summary, "ratios": rat,
               "runs": {wl: {t: [vars(r) for r in runs[wl][t]] for t in targets}
                        for wl in WORKLOADS},
               "not_run": not_run, "profile": profile}
        Path(args.json).expanduser().write_text(json.dumps(doc, indent=2) + "\n")
        _log(f"results written to {args.json}")
    return 0


def run_profile(args, services: Services, tmp: Path, backend: Backend, client: Client) -> dict:
    prof_path = tmp / "lb.prof"
    _log("starting lb under cProfile")
    svc = start_lb(services, tmp, backend, args.connections, profile_path=prof_path)
    r = client.small(svc.port, backend.small_path, args.connections, args.duration)
    _log(f"profiled run: {r.rps:,.0f} req/s; stopping lb with SIGINT so cProfile saves")
    code = services.stop(svc, timeout=PROFILE_STOP_TIMEOUT)
    if code != 0:
        print(f"bench: warning: the profiled lb exited with code {code} on SIGINT (expected 0); "
              f"its log:\n{svc.log_tail()}", file=sys.stderr)
    if not prof_path.exists():
        raise BenchError(f"cProfile wrote no profile (lb exit code {code}); its log:\n"
                         f"{svc.log_tail()}")
    if args.profile_out:
        shutil.copyfile(prof_path, Path(args.profile_out).expanduser())
        _log(f"raw profile kept at {args.profile_out} (python -m pstats {args.profile_out})")
    top = profile_top(prof_path)
    print()
    print(f"profile of lb under cProfile: small workload, {args.duration} s, "
          f"c={args.connections}: {r.rps:,.0f} req/s with profiling overhead; "
          f"lb exit code on SIGINT: {code}")
    print("(tottime/cumtime in seconds, tt/call in microseconds; uvloop's transport methods "
          "are invisible to cProfile, so a caller's tottime includes e.g. the write syscall)")
    print(format_profile(top["cumulative"], f"top {TOP_N} by cumulative time:"))
    print()
    print(format_profile(top["tottime"], f"top {TOP_N} by own time (tottime):"))
    return {"rps": r.rps, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "lb_exit_code": code, **top}


if __name__ == "__main__":
    sys.exit(main())
