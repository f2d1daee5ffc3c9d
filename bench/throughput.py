"""Throughput benchmark: a fast backend directly, through tts-lb, and through HAProxy.

Run it:   python -m bench.throughput [--duration 5] [--connections 50] [--repeat 3]
                                     [--skip-haproxy] [--json [PATH]] [--profile]

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

This module is the entry point, the header and the measurement loop.  The parts:
bench.throughput_args (options), bench.processes (starting and stopping every process,
shared with bench.concurrency), bench.throughput_targets (the backend, lb, HAProxy),
bench.throughput_clients (wrk and the Python client), bench.throughput_profile (--profile)
and bench.throughput_report (medians, ratios, the table, the JSON).  The names other code
imported from here before the split are re-exported below, so that it keeps working.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path

from bench.processes import BenchError, Services, Stop, log, make_tmp
from bench.throughput_args import parse_args   # the tests check the options with it too
from bench.throughput_clients import WORKLOADS, Result, make_client
from bench.throughput_profile import run_profile
from bench.throughput_report import format_ms, format_table, ratios, summarize, write_json
from bench.throughput_targets import (TARGETS, sanity_check, start_echo, start_haproxy, start_lb,
                                      start_nginx)

WARMUP_SECONDS = 1


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


def _bench(args: argparse.Namespace, services: Services, tmp: Path) -> int:
    body_bytes = args.body_mib << 20
    use_nginx = args.backend == "nginx" or (args.backend == "auto" and shutil.which("nginx"))
    use_wrk = args.client == "wrk" or (args.client == "auto" and shutil.which("wrk"))
    not_run: dict[str, str] = {}
    if args.skip_haproxy:
        not_run["haproxy"] = "--skip-haproxy"
    elif not shutil.which("haproxy"):
        not_run["haproxy"] = "haproxy not on PATH: apt-get install -y haproxy"
    client = make_client(use_wrk, args.connections, args.large_connections)

    log("starting the backend")
    backend = (start_nginx(services, tmp, body_bytes) if use_nginx
               else start_echo(services, body_bytes))
    ports = {"direct": backend.port}
    log("starting lb")
    ports["lb"] = start_lb(services, tmp, backend, args.connections).port
    haproxy_version = None
    if "haproxy" not in not_run:
        log("starting haproxy")
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
    log("sanity checks passed; warming up")
    for target in targets:
        client.small(ports[target], backend.small_path, args.connections, WARMUP_SECONDS)

    runs: dict[str, dict[str, list[Result]]] = {wl: {t: [] for t in targets} for wl in WORKLOADS}
    for i in range(args.repeat):
        for wl in WORKLOADS:          # targets interleaved: drift in machine load hits all alike
            for target in targets:
                if wl == "small":
                    r = client.small(ports[target], backend.small_path, args.connections,
                                     args.duration)
                    shown = (f"{r.rps:,.0f} req/s, p50 {format_ms(r.p50_ms)}, "
                             f"p99 {format_ms(r.p99_ms)}")
                else:
                    r = client.large(ports[target], backend.large_path, args.large_connections,
                                     args.duration)
                    shown = f"{r.mib_s:,.1f} MiB/s ({r.requests} bodies completed)"
                if r.errors:
                    shown += f", {r.errors} errors"
                log(f"run {i + 1}/{args.repeat} {wl:<5} {target:<7} {shown}")
                runs[wl][target].append(r)

    summary = {wl: {t: summarize(runs[wl][t]) for t in targets} for wl in WORKLOADS}
    rat = ratios(summary)
    print()
    print(format_table(summary, rat, meta, not_run), flush=True)

    profile = None
    if args.profile:
        profile = run_profile(args, services, tmp, backend, client)

    if args.json:
        write_json(args.json, meta=meta, summary=summary, rat=rat, runs=runs, not_run=not_run,
                   profile=profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
