"""bench.throughput's streams workload: how much delay a proxy adds to each streamed chunk.

A bench.streams backend (its own process, loopback) answers each request with
--stream-chunks chunks --stream-interval-ms apart, each carrying its send time.  A round is
one bench.streams client process opening --streams requests at once to one target; every
chunk's delay is its arrival time minus its send time, on CLOCK_MONOTONIC, which is one
clock for every process on a Linux machine.  The targets: the backend directly (the
baseline: loopback, the kernel and the client's own event loop), one balancer per engine
and HAProxy, each in front of the same backend.  What a proxy adds is its delay minus the
direct delay, per percentile (p50, p99), from the medians of --repeat rounds.  The target
line is p99 added <= 1 ms: streamed TTS audio must not pick up jitter in the balancer.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.processes import ROOT, BenchError, Services, pdeathsig
from bench.throughput_clients import RUN_GRACE, percentile
from bench.throughput_report import format_ms
from bench.throughput_targets import lb_target, start_haproxy, start_lb, target_order

TARGET_P99_ADDED_MS = 1.0
SANITY = {"streams": 5, "chunks": 3, "interval_ms": 10}   # also the warm-up of each target


@dataclass
class StreamRun:
    """One round against one target.  Delays in ms over every chunk that arrived."""
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    received: int = 0          # chunks that arrived, in order, with their send time
    expected: int = 0          # streams x chunks
    errors: int = 0            # streams that failed (framing, status, closed, timed out)
    error_samples: list[str] = field(default_factory=list)
    seconds: float = 0.0       # the round, client process start to exit


def start_streams_backend(services: Services) -> int:
    svc = services.start("streams-backend", [sys.executable, "-m", "bench.streams", "serve",
                                             "--port", "0"])
    return int(services.wait_log(svc, r"listening on [\d.]+:(\d+)").group(1))


def start_stream_targets(services: Services, tmp: Path, args, with_haproxy: bool
                         ) -> dict[str, int]:
    """The streams backend and, in front of it, a balancer per engine and HAProxy: their ports.
    These are apart from the small/large targets because those front nginx."""
    ports = {"direct": start_streams_backend(services)}
    for engine in args.engines:
        ports[lb_target(engine)] = start_lb(services, tmp, ports["direct"], args.streams,
                                            engine, name=f"{lb_target(engine)}-streams").port
    if with_haproxy:
        ports["haproxy"] = start_haproxy(services, tmp, ports["direct"], name="haproxy-streams",
                                         streaming=True)[0].port
    return ports


def round_timeout(chunks: int, interval_ms: int) -> float:
    """The spread of the starts (one interval), the stream itself, and a grace."""
    return interval_ms / 1e3 * (chunks + 1) + RUN_GRACE


def run_round(port: int, streams: int, chunks: int, interval_ms: int, chunk_bytes: int
              ) -> StreamRun:
    """One bench.streams client process: `streams` requests at once to 127.0.0.1:port."""
    timeout = round_timeout(chunks, interval_ms)
    argv = [sys.executable, "-m", "bench.streams", "client", "--port", str(port),
            "--streams", str(streams), "--chunks", str(chunks), "--interval-ms", str(interval_ms),
            "--chunk-bytes", str(chunk_bytes), "--timeout", str(timeout)]
    started = time.monotonic()
    try:  # the client gives up by itself at `timeout`; this bound is for a client that hangs
        out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout + 15,
                             stdin=subprocess.DEVNULL, preexec_fn=pdeathsig)
    except subprocess.TimeoutExpired:
        raise BenchError(f"the streams client did not finish within {timeout + 15:.0f} s") from None
    if out.returncode != 0:
        raise BenchError(f"the streams client exited with {out.returncode}:\n{out.stderr[-2000:]}")
    run = run_from_client(json.loads(out.stdout))
    run.seconds = time.monotonic() - started
    return run


def run_from_client(doc: dict) -> StreamRun:
    """The client's JSON (delays in ns) -> StreamRun (percentiles in ms)."""
    delays = sorted(d / 1e6 for d in doc["delays_ns"])
    return StreamRun(p50_ms=percentile(delays, 50), p99_ms=percentile(delays, 99),
                     max_ms=delays[-1] if delays else None, received=doc["received"],
                     expected=doc["expected"], errors=doc["errors"],
                     error_samples=doc["error_samples"])


def sanity_check_streams(ports: dict[str, int], chunk_bytes: int) -> None:
    """A few short streams through every target, every chunk there, before measuring."""
    for target, port in ports.items():
        r = run_round(port, chunk_bytes=chunk_bytes, **SANITY)
        if r.errors or r.received != r.expected:
            raise BenchError(f"{target}: streams sanity check on port {port}: {r.received} of "
                             f"{r.expected} chunks, {r.errors} failed streams: "
                             f"{'; '.join(r.error_samples)}")


def shown(r: StreamRun) -> str:
    text = (f"chunk delay p50 {format_ms(r.p50_ms)}, p99 {format_ms(r.p99_ms)}, "
            f"max {format_ms(r.max_ms)}, {r.received}/{r.expected} chunks")
    if r.errors:
        text += f", {r.errors} failed streams ({'; '.join(r.error_samples)})"
    return text


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize_streams(runs: list[StreamRun]) -> dict:
    return {"p50_ms": _median([r.p50_ms for r in runs]),
            "p99_ms": _median([r.p99_ms for r in runs]),
            "max_ms": _median([r.max_ms for r in runs]),
            "received": sum(r.received for r in runs), "expected": sum(r.expected for r in runs),
            "errors": sum(r.errors for r in runs), "p99_ms_runs": [r.p99_ms for r in runs]}


def added_delays(summary: dict[str, dict]) -> dict[str, dict]:
    """Each proxy's median p50/p99 chunk delay minus the direct one's (ms; noise can make a
    small one negative)."""
    direct = summary.get("direct")
    out = {}
    for target, s in summary.items():
        if target == "direct" or direct is None:
            continue
        out[target] = {f"{p}_added_ms": (s[f"{p}_ms"] - direct[f"{p}_ms"]
                                         if s[f"{p}_ms"] is not None
                                         and direct[f"{p}_ms"] is not None else None)
                       for p in ("p50", "p99")}
    return out


def _added_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return ("-" if value < 0 else "+") + format_ms(abs(value))


def format_streams_table(summary: dict, added: dict, meta: dict, engines: list[str],
                         not_run: dict[str, str]) -> str:
    w = 9
    s = meta["streams"]
    lines = [f"streams: {s['streams']} concurrent streams x {s['chunks']} chunks of "
             f"{s['chunk_bytes']} B, {s['interval_ms']} ms apart; per-chunk delay = arrival - "
             f"send (CLOCK_MONOTONIC)"]
    head = (f"{'target':<13} {'p50':>{w}} {'p99':>{w}} {'max':>{w}} {'added p50':>{w + 1}} "
            f"{'added p99':>{w + 1}} {'chunks':>13} {'failed':>6}  p99 runs (min..max)")
    lines += [head, "-" * len(head)]
    for target in target_order(engines):
        row = summary.get(target)
        if row is None:
            lines.append(f"{target:<13} not run ({not_run.get(target, 'skipped')})")
            continue
        add = added.get(target, {})
        p99s = [v for v in row["p99_ms_runs"] if v is not None]
        spread = f"{format_ms(min(p99s))}..{format_ms(max(p99s))}" if len(p99s) > 1 else ""
        lines.append(f"{target:<13} {format_ms(row['p50_ms']):>{w}} "
                     f"{format_ms(row['p99_ms']):>{w}} {format_ms(row['max_ms']):>{w}} "
                     f"{_added_ms(add.get('p50_added_ms')):>{w + 1}} "
                     f"{_added_ms(add.get('p99_added_ms')):>{w + 1}} "
                     f"{str(row['received']) + '/' + str(row['expected']):>13} "
                     f"{row['errors']:>6}  {spread}")
    verdicts = []
    for engine in engines:
        p99 = added.get(lb_target(engine), {}).get("p99_added_ms")
        verdict = "-" if p99 is None else ("met" if p99 <= TARGET_P99_ADDED_MS else "NOT met")
        verdicts.append(f"{lb_target(engine)} {_added_ms(p99)} {verdict}")
    if "haproxy" in added:
        verdicts.append(f"(haproxy {_added_ms(added['haproxy']['p99_added_ms'])})")
    lines.append(f"target: p99 added <= {format_ms(TARGET_P99_ADDED_MS)}: " + ", ".join(verdicts))
    return "\n".join(lines)
