"""bench.concurrency --replicas N: N balancer replicas in front of one simulated fleet.

The question a user running two or three balancers asks: do the GPUs stay
within their limits?  Each run starts N `python -m lb` processes (callers
spread over them, caller i on replica i mod N) against the same fleet as the
one-balancer runs, servers crashing past --oom-at, and reports per run:
the callers' latency, every server's own peak of syntheses at once and its
crashes (its /_stats), and, with [cluster], the cost per call of the Redis
round trip (slot acquisition p50 / p99, the replicas' worst) and the races
lost.  "shared" runs share slots through a redis-server started here;
"alone" runs have no [cluster], so each replica holds each server to the
whole limit by itself (--no-cluster: only those).
"""
from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from pathlib import Path

from bench.callers import Load, summarize_calls
from bench.fleet import (fleet_stats, http_json, recovery_timeout, reset_fleet, start_fleet,
                         wait_ready)
from bench.processes import HOST, BenchError, Services, free_port
from bench.progress import Progress, Step
from bench.proxies import lb_config
from bench.runs import run_load
from bench.world import real_per_wall

POLICY = "least_conn"


def start_redis(services: Services):
    if shutil.which("redis-server") is None:
        raise BenchError("redis-server is not installed: apt-get install -y redis-server "
                         "(or run --replicas N --no-cluster)")
    port = free_port()
    svc = services.start("redis", ["redis-server", "--port", str(port), "--bind", HOST,
                                   "--save", "", "--appendonly", "no"])
    services.wait_log(svc, r"Ready to accept connections")
    svc.port = port
    return svc


def start_replicas(services: Services, tmp: Path, fleet, args, redis_port: int | None,
                   configs: dict) -> list:
    text = lb_config(fleet, args, POLICY)
    mode = "shared" if redis_port else "alone"
    if redis_port:
        text += ("[cluster]\n" f'redis_url = "redis://{HOST}:{redis_port}/0"\n'
                 f'fleet = "bench-{int(time.time() * 1000)}"\n'   # fresh keys every run
                 f"replicas = {args.replicas}\n")
    conf = tmp / f"lb-replicas-{mode}.toml"
    conf.write_text(text)
    configs.setdefault(conf.name, text)
    replicas = [services.start(f"lb-{mode}-{i}", [sys.executable, "-m", "lb", "-c", str(conf)],
                               stop_signal=signal.SIGINT) for i in range(args.replicas)]
    for svc in replicas:
        svc.port = int(services.wait_log(svc, r"listening on [\d.]+:(\d+)").group(1))
    return replicas


def _worst(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def bench_replicas(args, services: Services, tmp: Path, configs: dict,
                   progress_holder: list) -> list[dict]:
    modes = ["alone"] if args.no_cluster else ["shared", "alone"]
    plan = [Step("starting the simulated fleet", 2.0)] + [
        Step(f"{args.replicas} replicas {m}, {n} callers", args.duration + 3.0)
        for n in args.concurrency for m in modes]
    progress = Progress(plan)
    progress_holder.append(progress)
    progress.begin("starting the simulated fleet")
    fleet = start_fleet(services, args, progress.tick)
    redis = start_redis(services) if "shared" in modes else None
    progress.end()
    rows = []
    for callers in args.concurrency:
        for mode in modes:
            progress.begin(f"{args.replicas} replicas {mode}, {callers} callers")
            wait_ready(fleet, recovery_timeout(args), progress.tick)
            reset_fleet(fleet)
            replicas = start_replicas(services, tmp, fleet, args,
                                      redis.port if mode == "shared" else None, configs)
            try:
                if mode == "shared":   # every replica claiming through Redis before calls come
                    _wait_shared(replicas)
                load = run_load(args, "http", HOST, replicas[0].port, callers, progress,
                                ports=tuple(r.port for r in replicas))
                stats = [http_json(HOST, r.port, "/lb-stats") or {} for r in replicas]
            finally:
                for svc in replicas:
                    services.stop(svc)
            try:
                wait_ready(fleet, recovery_timeout(args), progress.tick)
            except BenchError as exc:
                progress.note(f"warning: {exc}")
            row = _row(mode, callers, load, stats, fleet_stats(fleet), args)
            rows.append(row)
            progress.end(f"crashes {row['backend_crashes']}, server peaks "
                         f"{row['server_peaks']}")
    progress.close()
    return rows


def _wait_shared(replicas: list, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        modes = [(http_json(HOST, r.port, "/lb-stats") or {}).get("cluster", {}).get("mode")
                 for r in replicas]
        if all(m == "shared" for m in modes):
            return
        time.sleep(0.1)
    raise BenchError(f"the replicas did not all share slots within {timeout:g} s")


def _row(mode: str, callers: int, load: Load, stats: list[dict], fl: dict, args) -> dict:
    clusters = [s.get("cluster") or {} for s in stats]
    acquire = [c.get("acquire_ms") or {} for c in clusters]
    return {
        "target": f"replicas-{mode}", "replicas": args.replicas, "concurrency": callers,
        "calls": summarize_calls(load.calls, load.duration, real_per_wall(args)),
        "backend_crashes": fl["crashes"],
        "server_peaks": [b["max_gpu_in_flight"] for b in fl["per_backend"]],   # syntheses
        "slot_acquire_ms": None if mode == "alone" else {
            "count": sum(a.get("count", 0) for a in acquire),
            "p50": _worst([a.get("p50") for a in acquire]),
            "p99": _worst([a.get("p99") for a in acquire])},
        "lost_races": None if mode == "alone" else sum(c.get("lost_races", 0) for c in clusters),
        "queue_mean_wait_s": [(s.get("queue") or {}).get("mean_wait_s") for s in stats],
        "fleet_stats": fl,
    }


def format_replicas(rows: list[dict], limit: int, oom_at: int) -> str:
    head = (f"{'run':<22} {'callers':>7} {'calls/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'errors':>6} {'crashes':>7}  {'server peaks (limit ' + str(limit) + ')':<28} "
            f"{'slot p50/p99 ms':>16} {'lost races':>10}")
    out = [head, "-" * len(head)]
    for r in rows:
        c, a = r["calls"], r["slot_acquire_ms"]
        lat = c["latency_ms"]
        slot = f"{a['p50']}/{a['p99']}" if a else "-"
        out.append(
            f"{r['replicas']} replicas {r['target'].split('-')[1]:<11} {r['concurrency']:>7} "
            f"{c['calls_per_s'] or 0:>8} {lat['p50'] or '-':>8} {lat['p99'] or '-':>8} "
            f"{c['errors']:>6} {r['backend_crashes']:>7}  "
            f"{','.join(str(p) for p in r['server_peaks']):<28} "
            f"{slot:>16} "
            f"{r['lost_races'] if r['lost_races'] is not None else '-':>10}")
    out.append(f"(server peaks: each server's own most syntheses at once; past {oom_at} it "
               "crashes. latency: wall-clock ms of whole calls.)" if oom_at else "")
    return "\n".join(out)


def run(args, services: Services, tmp: Path, out_dir: Path, progress_holder: list) -> int:
    configs: dict[str, str] = {}
    print(f"tts-lb concurrency benchmark: {args.replicas} balancer replicas, callers spread "
          f"over them; {args.backends} simulated servers x {args.slots} slots, out of memory "
          f"past {args.oom_at}; {args.duration:g} s per run; seed {args.seed}", flush=True)
    rows = bench_replicas(args, services, tmp, configs, progress_holder)
    print()
    print(format_replicas(rows, args.slots, args.oom_at))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"results": rows}, indent=2))
    for name, text in configs.items():
        (out_dir / name).write_text(text)
    print(f"results: {out_dir}/ (results.json, the configs used)", flush=True)
    return 0
