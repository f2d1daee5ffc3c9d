"""Throughput benchmark: a fast backend directly, through tts-lb, and through HAProxy.

Run it:   python -m bench.throughput [--duration 5] [--connections 50] [--repeat 3]
                                     [--http httptools|h11|both] [--workloads small,large,streams]
                                     (also: tunnel,tcp; not in the default)
                                     [--skip-haproxy] [--json [PATH]] [--profile]

Everything runs on 127.0.0.1.  One backend is started (nginx when it is on PATH,
else backends.echo), then one balancer per HTTP engine (`python -m lb --http ENGINE`;
--http both, the default, measures httptools and h11 side by side) and HAProxy (nbthread 1,
to match the single-process balancer) in front of it.  Three workloads are
measured against each target:

  small   keep-alive GET / ("ok\\n"), --connections connections:
          requests/s, p50 and p99 latency
  large   keep-alive GET of a --body-mib MiB body, over --large-connections
          connections, for the whole run: MiB/s
  streams --streams concurrent chunked responses from a bench.streams backend (its own
          balancers and HAProxy in front of it), a chunk every --stream-interval-ms:
          the delay each proxy adds to a chunk, p50 and p99 (bench.throughput_streams)
  tunnel  bulk bytes both ways and 64-byte round trips through a WebSocket-style upgrade
          tunnel, beside HAProxy mode tcp and a bench.bulk_server backend directly: MiB/s,
          added round-trip p50/p99 (bench.throughput_tunnel)
  tcp     the same through a [[tcp]] listener (no upgrade head)

The load comes from wrk when it is on PATH (`wrk -t1 -cN -dDs --latency`), else
from a closed-loop Python client (threads with http.client).  Each cell is run
--repeat times, interleaving the targets, and the median is reported.
--profile adds one extra small-request run per engine against a balancer started under
cProfile and prints its top functions.  Every process started here is stopped
at the end, also on Ctrl-C, SIGTERM or an error; every run is bounded in time.
See bench/README.md.

This module is the entry point, the header and the measurement loop.  The parts:
bench.throughput_args (options), bench.processes (starting and stopping every process,
shared with bench.concurrency), bench.throughput_targets (the backend, lb, HAProxy),
bench.throughput_clients (wrk and the Python client), bench.throughput_streams and
bench.streams (the streams workload), bench.throughput_profile (--profile)
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

from bench.processes import BenchError, Services, Stop, log, make_tmp, tool_version
from bench.throughput_args import parse_args   # the tests check the options with it too
from bench.throughput_clients import WORKLOADS, Client, Result, make_client
from bench.throughput_profile import run_profile
from bench.throughput_report import (compare_tunnel, format_ms, format_table, format_tunnel_table,
                                     ratios, summarize, summarize_tunnel, write_json)
from bench.throughput_streams import (StreamRun, added_delays, format_streams_table, run_round,
                                      sanity_check_streams, shown, start_stream_targets,
                                      summarize_streams)
from bench.throughput_targets import (Backend, lb_target, sanity_check, start_echo,
                                      start_haproxy, start_lb, start_nginx, target_order)
from bench.throughput_tunnel import (ECHO_BYTES, ECHO_ROUNDS, TUNNEL_WORKLOADS, Target,
                                     run_cell, sanity_check_tunnels, shown as shown_tunnel,
                                     start_tunnel_targets)

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
    http_workloads = [wl for wl in WORKLOADS if wl in args.workloads]
    not_run: dict[str, str] = {}
    if args.skip_haproxy:
        not_run["haproxy"] = "--skip-haproxy"
    elif not shutil.which("haproxy"):
        not_run["haproxy"] = "haproxy not on PATH: apt-get install -y haproxy"
    with_haproxy = "haproxy" not in not_run

    backend = client = None
    ports: dict[str, int] = {}        # small/large targets, in front of nginx (or echo)
    stream_ports: dict[str, int] = {}  # streams targets, in front of bench.streams
    if http_workloads:
        use_nginx = args.backend == "nginx" or (args.backend == "auto" and shutil.which("nginx"))
        use_wrk = args.client == "wrk" or (args.client == "auto" and shutil.which("wrk"))
        client = make_client(use_wrk, args.connections, args.large_connections)
        log("starting the backend")
        backend = (start_nginx(services, tmp, args.body_mib << 20) if use_nginx
                   else start_echo(services, args.body_mib << 20))
        ports["direct"] = backend.port
        for engine in args.engines:
            log(f"starting lb --http {engine}")
            ports[lb_target(engine)] = start_lb(services, tmp, backend.port, args.connections,
                                                engine).port
        if with_haproxy:
            log("starting haproxy")
            ports["haproxy"] = start_haproxy(services, tmp, backend.port)[0].port
    if "streams" in args.workloads:
        log("starting the streams backend and its proxies")
        stream_ports = start_stream_targets(services, tmp, args, with_haproxy)
    tunnel_targets: dict[str, dict[str, Target]] = {}   # tunnel/tcp: in front of bulk_server
    if any(wl in TUNNEL_WORKLOADS for wl in args.workloads):
        log("starting the bulk backend and its proxies")
        tunnel_targets = start_tunnel_targets(services, tmp, args, with_haproxy)

    meta = _meta(args, backend, client, not_run)
    print(_header(args, meta), flush=True)

    if http_workloads:
        for target in ports:
            sanity_check(target, ports[target], backend, args.body_mib << 20)
    if stream_ports:
        sanity_check_streams(stream_ports, args.stream_chunk_bytes)
    if tunnel_targets:
        sanity_check_tunnels(tunnel_targets)
    log("sanity checks passed; warming up")
    for target in ports:
        client.small(ports[target], backend.small_path, args.connections, WARMUP_SECONDS)

    runs = _measure(args, backend, client, ports, stream_ports, tunnel_targets)
    summary: dict[str, dict] = {wl: {t: summarize(r) for t, r in runs[wl].items()}
                                for wl in http_workloads}
    rat = ratios(summary, args.engines)
    if http_workloads:
        print()
        print(format_table(summary, rat, meta, not_run, args.engines, args.workloads),
              flush=True)
    added = None
    if stream_ports:
        summary["streams"] = {t: summarize_streams(r) for t, r in runs["streams"].items()}
        added = added_delays(summary["streams"])
        print()
        print(format_streams_table(summary["streams"], added, meta, args.engines, not_run),
              flush=True)

    compared = {}
    for wl in tunnel_targets:
        summary[wl] = {t: summarize_tunnel(r) for t, r in runs[wl].items()}
        compared[wl] = compare_tunnel(summary[wl])
        print()
        print(format_tunnel_table(wl, summary[wl], compared[wl], meta, not_run), flush=True)

    profile = None
    if args.profile:
        profile = run_profile(args, services, tmp, backend, client)

    if args.json:
        write_json(args.json, meta=meta, summary=summary, rat=rat, runs=runs, not_run=not_run,
                   profile=profile, streams_added=added, tunnel_compared=compared or None)
    return 0


def _meta(args: argparse.Namespace, backend: Backend | None, client: Client | None,
          not_run: dict[str, str]) -> dict:
    haproxy_version = (None if "haproxy" in not_run
                       else tool_version(["haproxy", "-v"], r"version (\S+)"))
    return {
        "engines": args.engines, "workloads": args.workloads,
        "backend": backend and backend.kind,
        "backend_description": backend and backend.description,
        "client": client and client.kind, "client_description": client and client.description,
        "haproxy": (f"HAProxy {haproxy_version}, nbthread 1 (single-threaded to match the "
                    f"single-process lb), mode http, keep-alive, http-reuse always"
                    if haproxy_version else f"not run ({not_run.get('haproxy')})"),
        "haproxy_tcp": (f"HAProxy {haproxy_version}, nbthread 1, mode tcp, timeouts only; one "
                        f"instance for tunnel and tcp (the upgrade head and the 101 pass "
                        f"through it as bytes)"
                        if haproxy_version and any(wl in TUNNEL_WORKLOADS for wl in args.workloads)
                        else None),
        "duration_s": args.duration, "repeat": args.repeat, "connections": args.connections,
        "large_connections": args.large_connections, "body_mib": args.body_mib,
        "small_path": backend and backend.small_path, "large_path": backend and backend.large_path,
        "streams": {"streams": args.streams, "chunks": args.stream_chunks,
                    "interval_ms": args.stream_interval_ms, "chunk_bytes": args.stream_chunk_bytes},
        "tunnel": {"connections": args.tunnel_connections, "echo_rounds": ECHO_ROUNDS,
                   "echo_bytes": ECHO_BYTES},
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "machine": platform.platform(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _header(args: argparse.Namespace, meta: dict) -> str:
    lines = ["tts-lb throughput benchmark (127.0.0.1 only)"]
    if meta["backend"]:
        lines.append(f"  backend : {meta['backend_description']}")
    idle = [f"pool.max_idle {max(32, args.connections * 2)}"] if meta["backend"] else []
    if "streams" in args.workloads:
        idle.append(f"{max(32, args.streams * 2)} for streams")
    tunnels = [wl for wl in TUNNEL_WORKLOADS if wl in args.workloads]
    lines.append(f"  lb      : python -m lb --http {{{','.join(args.engines)}}}, one balancer per "
                 f"engine, single process (uvloop), access log off"
                 + "".join(f", {i}" for i in idle))
    if tunnels:
        own = args.engines if "tunnel" in tunnels else args.engines[:1]
        lines.append(f"            for {'/'.join(tunnels)}: balancers of their own "
                     f"({', '.join(lb_target(e) for e in own)}) in front of the bulk server, "
                     f"max_concurrency 1000, other limits and timeouts at their defaults"
                     + (f"; tcp's lb row is a [[tcp]] listener of the "
                        f"{lb_target(args.engines[0])} process (no HTTP engine touches a "
                        f"TCP splice)" if "tcp" in tunnels else ""))
    if meta["backend"] or "streams" in args.workloads or not meta["haproxy_tcp"]:
        lines.append(f"  haproxy : {meta['haproxy']}"
                     + ("; for streams also option http-no-delay"
                        if "streams" in args.workloads and "not run" not in meta["haproxy"]
                        else ""))
    if meta["haproxy_tcp"]:
        lines.append(f"  haproxy : {meta['haproxy_tcp']}")
    if meta["client"]:
        lines.append(f"  client  : {meta['client_description']}")
    if tunnels:
        t = meta["tunnel"]
        lines.append(f"  tunnels : bench.bulk_server backend (asyncio, uvloop; sink, source, "
                     f"echo); client: threads with blocking sockets in this process, "
                     f"{t['connections']} connections each way, then {t['echo_bytes']} B round "
                     f"trips on one connection")
    if "streams" in args.workloads:
        s = meta["streams"]
        lines.append(f"  streams : bench.streams backend and asyncio client (separate processes): "
                     f"{s['streams']} streams x {s['chunks']} chunks of {s['chunk_bytes']} B, "
                     f"{s['interval_ms']} ms apart, starts spread over one interval")
    each = [f"{args.duration} s each"] if meta["backend"] else []
    if tunnels:
        each.append(f"{'/'.join(tunnels)}: {args.duration} s up, {args.duration} s down, "
                    f"then the round trips")
    if "streams" in args.workloads:
        each.append("streams: one round each")
    lines.append(f"  runs    : {', '.join(each)}; {args.repeat} per cell (targets interleaved), "
                 f"median reported; {meta['cpus']} CPUs shared by client, proxy and backend")
    return "\n".join(lines)


def _measure(args: argparse.Namespace, backend: Backend | None, client: Client | None,
             ports: dict[str, int], stream_ports: dict[str, int],
             tunnel_targets: dict[str, dict[str, Target]]) -> dict[str, dict[str, list]]:
    """Every run: runs[workload][target] = [Result, StreamRun or TunnelRun, one per repeat]."""
    runs: dict[str, dict[str, list]] = {
        wl: ({t: [] for t in tunnel_targets[wl]} if wl in TUNNEL_WORKLOADS else
             {t: [] for t in target_order(args.engines)
              if t in (stream_ports if wl == "streams" else ports)})
        for wl in args.workloads}
    for i in range(args.repeat):
        for wl in args.workloads:     # targets interleaved: drift in machine load hits all alike
            for target in runs[wl]:
                r: Result | StreamRun
                if wl == "streams":
                    r = run_round(stream_ports[target], args.streams, args.stream_chunks,
                                  args.stream_interval_ms, args.stream_chunk_bytes)
                    text = shown(r)
                elif wl in TUNNEL_WORKLOADS:
                    r = run_cell(tunnel_targets[wl][target], args.tunnel_connections,
                                 args.duration)
                    text = shown_tunnel(r)
                elif wl == "small":
                    r = client.small(ports[target], backend.small_path, args.connections,
                                     args.duration)
                    text = (f"{r.rps:,.0f} req/s, p50 {format_ms(r.p50_ms)}, "
                            f"p99 {format_ms(r.p99_ms)}")
                else:
                    r = client.large(ports[target], backend.large_path, args.large_connections,
                                     args.duration)
                    text = f"{r.mib_s:,.1f} MiB/s ({r.requests} bodies completed)"
                if wl in WORKLOADS and r.errors:
                    text += f", {r.errors} errors"
                log(f"run {i + 1}/{args.repeat} {wl:<7} {target:<12} {text}")
                runs[wl][target].append(r)
    return runs


if __name__ == "__main__":
    sys.exit(main())
