"""bench.throughput's load clients: wrk, or a closed-loop Python client when wrk is missing.

Both drive the two workloads (WORKLOADS) against any target for a whole number of seconds
and return the same Result, so the measurement loop and the report need not know which
one ran.  wrk is preferred: the Python client is held back by the GIL and, for small
requests, says more about itself than about the proxies.  Every run is bounded: wrk, or
the client's threads, get RUN_GRACE seconds past the duration, then the run fails.
"""
from __future__ import annotations

import http.client
import math
import re
import subprocess
import threading
import time
from dataclasses import dataclass

from bench.processes import HOST, BenchError, pdeathsig, tool_version

RUN_GRACE = 30.0          # a load run may overrun its duration by this much, then it's killed
WORKLOADS = ("small", "large")


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
                             stdin=subprocess.DEVNULL, preexec_fn=pdeathsig)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish within {duration + RUN_GRACE:.0f} s: "
                         f"{' '.join(argv)}") from None
    if out.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited with {out.returncode}:\n{out.stdout}"
                         f"{out.stderr}")
    return parse_wrk(out.stdout)


def percentile(sorted_values: list[float], pct: float) -> float | None:
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
    return Result(rps=len(every) / seconds, p50_ms=percentile(every, 50),
                  p99_ms=percentile(every, 99), requests=len(every), errors=sum(errors),
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


def make_client(use_wrk: bool, connections: int, large_connections: int) -> Client:
    """The client to use, described for the header."""
    if use_wrk:
        wrk_version = tool_version(["wrk", "--version"], r"wrk (?:debian/)?(\S+)")
        return Client("wrk", f"wrk {wrk_version} "
                             f"(-t1 -c{connections} --latency; large: "
                             f"-t1 -c{large_connections})")
    return Client("python", f"Python closed-loop client, {connections} threads with "
                            f"keep-alive http.client connections (wrk not on PATH: the "
                            f"client itself may be the bottleneck)")
