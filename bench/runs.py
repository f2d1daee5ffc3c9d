"""The runs of bench.concurrency: the plan, each (level, target) run, and its result row.

Every run is planned before the first one starts (bench.progress shows the plan's
fraction, which must only move forward); a run waits for a ready fleet, starts a fresh
proxy, drives the callers, stops the proxy, and reads the counters.
"""
from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

from bench.callers import Load, drive, summarize_calls
from bench.fleet import fleet_stats, recovery_timeout, reset_fleet, start_fleet, wait_ready
from bench.progress import Progress, Step
from bench.proxies import (check_haproxy, diff_counters, haproxy_stats, lb_stats, start_haproxy,
                           start_lb)
from bench.report import short_summary
from bench.processes import HOST, BenchError, Services
from bench.world import (CHARS_PER_SECOND, LABELS, LOAD_TIME, SENTENCES, call_timeout,
                         mean_cycle, real_per_wall)

# Wall seconds the steps around the measured window take on a 2-core machine (measured):
# what the progress estimates add to the warm-up and the window.
PROCESS_START_S = 0.25       # a Python process, to its "listening on" line
PROXY_START_S = {"lb": 0.45, "haproxy": 0.2}
AROUND_RUN_S = 0.2           # wait for a ready fleet, reset it, stop the proxy, read stats


def fleet_targets(args, tmp: Path, not_run: dict) -> list[str]:
    """The balancer's policies, then HAProxy when it runs and accepts its config."""
    targets = list(args.policies)
    if "haproxy" not in not_run:
        problem = check_haproxy(tmp, args)
        if problem:
            not_run["haproxy"] = problem
            print(f"bench: leaving HAProxy out: {problem}", file=sys.stderr, flush=True)
        else:
            targets.append("haproxy")
    return targets


def run_label(target: str, callers: int) -> str:
    return f"{LABELS.get(target, target)}, {callers} callers"


def run_estimate(args, proxy: str | None) -> float:
    """Wall seconds of one run: the proxy's start, warm-up, window, the last calls, the rest."""
    audio = sum(len(t) for t in SENTENCES) / len(SENTENCES) / CHARS_PER_SECOND
    rtf = args.rtf if args.lb is None else 1.0
    last_call = audio * rtf * args.time_scale     # a call under way when the window closes
    return ((PROXY_START_S[proxy] if proxy else 0.0) + mean_cycle(args, rtf) + args.duration
            + last_call + AROUND_RUN_S)


def fleet_plan(args, targets: list[str]) -> list[Step]:
    start = Step("starting the simulated fleet",
                 PROCESS_START_S * (args.backends + 1) + LOAD_TIME * args.time_scale, run=False)
    return [start] + [Step(run_label(t, n), run_estimate(args, "haproxy" if t == "haproxy"
                                                          else "lb"))
                      for n in args.concurrency for t in targets]


def run_load(args, scheme, host, port, callers, progress: Progress, ports=()) -> Load:
    load = Load(scheme, host, port, callers, args.duration, ports=ports,
                warmup=mean_cycle(args, args.rtf if not args.lb else 1.0),
                scale=args.time_scale, seed=args.seed, call_timeout=call_timeout(args),
                gpu_s_per_char=(None if args.lb else
                                args.rtf * args.time_scale / CHARS_PER_SECOND))
    asyncio.run(drive(load, progress.tick))
    return load


def bench_fleet(args, services: Services, tmp: Path, configs: dict, progress_holder: list,
                not_run: dict) -> list[dict]:
    targets = fleet_targets(args, tmp, not_run)
    progress = Progress(fleet_plan(args, targets))
    progress_holder.append(progress)
    progress.begin("starting the simulated fleet")
    fleet = start_fleet(services, args, progress.tick)
    progress.end()
    rows = []
    for callers in args.concurrency:          # targets interleaved: drift hits all alike
        for target in targets:
            progress.begin(run_label(target, callers))
            wait_ready(fleet, recovery_timeout(args), progress.tick)
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
                wait_ready(fleet, recovery_timeout(args), progress.tick)
            except BenchError as exc:
                progress.note(f"warning: {exc}")
            row = make_row(target, callers, load, proxy, fleet_stats(fleet), real_per_wall(args))
            rows.append(row)
            progress.end(short_summary(row))
    progress.close()
    return rows


def make_row(target: str, callers: int, load: Load, proxy: dict | None, fl: dict | None,
             real_per_wall: float) -> dict:
    calls = summarize_calls(load.calls, load.duration, real_per_wall)
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
    progress = Progress([Step(f"{n} callers", run_estimate(args, None))
                         for n in args.concurrency])
    progress_holder.append(progress)
    rows = []
    for callers in args.concurrency:
        progress.begin(f"{callers} callers")
        before = lb_stats(host, port) if scheme == "http" else None
        load = run_load(args, scheme, host, port, callers, progress)
        after = lb_stats(host, port) if scheme == "http" else None
        proxy = (diff_counters(after, before) if after is not None and before is not None
                 else None)
        if proxy is not None:  # per-backend lists are snapshots, not counters over the run
            proxy["backends"] = after["backends"]
        row = make_row("lb", callers, load, proxy, None, real_per_wall(args))
        row["label"] = "balancer"   # the URL is in the header
        if proxy is None:
            row["calls"]["note"] = "no /lb-stats: retries unknown"
        rows.append(row)
        progress.end(short_summary(row))
    progress.close()
    return rows
