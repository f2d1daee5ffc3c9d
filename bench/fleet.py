"""The simulated fleet of bench.concurrency: Chatterbox GPU servers and the fake Cartesia.

Started once per bench, on 127.0.0.1, through bench.throughput's Services (own sessions,
parent-death signal, stopped at the end whatever happens); waited on and read over HTTP.
"""
from __future__ import annotations

import http.client
import json
import sys
import time
from dataclasses import dataclass

from bench.processes import HOST, BenchError, Service, Services
from bench.world import (CARTESIA_CONCURRENCY, CARTESIA_RTF, CHARS_PER_SECOND, KEY_ENV,
                         LOAD_TIME, READY_TIMEOUT, RESTART_AFTER)


def http_json(host: str, port: int, path: str, timeout: float = 3.0) -> dict | None:
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


def secs(x: float) -> str:
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


def start_fleet(services: Services, args, tick=None) -> Fleet:
    s = args.time_scale
    common = ["--slots", str(args.slots), "--oom-at", str(args.oom_at),
              "--restart-after", secs(RESTART_AFTER * s), "--load-time", secs(LOAD_TIME * s),
              "--rtf", repr(args.rtf * s), "--chars-per-second", repr(CHARS_PER_SECOND),
              # The tone, not espeak-ng speech: speaking each file on the CPU would bill the
              # 2-core machine, not the simulated GPU, and show up as the proxies' latency.
              "--tone"]
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
    wait_ready(fleet, LOAD_TIME * s + READY_TIMEOUT, tick)
    return fleet


def recovery_timeout(args) -> float:
    """How long a crashed server may take to be back: down, loading, and some slack."""
    return (RESTART_AFTER + LOAD_TIME) * args.time_scale + READY_TIMEOUT


def wait_ready(fleet: Fleet, timeout: float, tick=None) -> None:
    """Every backend answers /_stats with ready: true (a crashed one restarts and loads)."""
    deadline = time.monotonic() + timeout
    for svc in fleet.backends:
        while True:
            if tick is not None:
                tick()
            if svc.proc.poll() is not None:
                raise BenchError(f"{svc.name} exited with code {svc.proc.returncode}; its log:\n"
                                 f"{svc.log_tail()}")
            doc = http_json(HOST, svc.port, "/_stats")
            if doc and doc.get("ready") and doc.get("requests_in_flight", 0) == 0:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{svc.name} was not ready again within {timeout:.0f} s; its "
                                 f"log:\n{svc.log_tail()}")
            time.sleep(0.05)


def reset_fleet(fleet: Fleet) -> None:
    for svc in fleet.backends:
        if http_json(HOST, svc.port, "/_stats/reset") is None:
            raise BenchError(f"{svc.name}: GET /_stats/reset failed")
    if http_json(HOST, fleet.cartesia.port, "/_reset") is None:
        raise BenchError("fake Cartesia: GET /_reset failed")


def fleet_stats(fleet: Fleet) -> dict:
    per = []
    for svc in fleet.backends:
        doc = http_json(HOST, svc.port, "/_stats") or {}
        per.append({"port": svc.port, "crashes": doc.get("crashes"),
                    "requests": doc.get("requests_total"),
                    "syntheses": doc.get("synth_total"),
                    "max_requests_in_flight": doc.get("max_requests_in_flight"),
                    "max_gpu_in_flight": doc.get("max_gpu_in_flight"),
                    "max_slowdown": doc.get("max_slowdown"),
                    "rejected_loading": doc.get("synth_rejected"),
                    "outcomes": doc.get("outcomes")})
    cart = http_json(HOST, fleet.cartesia.port, "/_stats") or {}
    return {
        "crashes": sum(b["crashes"] or 0 for b in per),
        "peak_gpu_in_flight": max((b["max_gpu_in_flight"] or 0 for b in per), default=0),
        "per_backend": per,
        "cartesia": {k: cart.get(k) for k in ("requests", "max_in_flight", "by_status",
                                              "characters_billed")},
    }

