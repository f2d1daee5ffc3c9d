"""`[cluster]`: this process joins its fleet's shared slots in Redis.

Built once, at start (a reload that changes [cluster] is told it needs a
restart): the Redis client, the slot scripts (shared_slots), this
process's holders and degraded mode (fleet_slots), and the events from the
fleet's other balancers (fleet_events).  Until Redis first answers, and
whenever it stops answering, every backend is held to its static share
here, so a replica that starts while Redis is down is still safe.
"""

from __future__ import annotations

import asyncio

from ..config_model import Cluster
from ..scheduling.fleet_events import FleetEvents
from ..scheduling.fleet_slots import FleetSlots
from ..scheduling.scheduler import Scheduler
from ..scheduling.shared_slots import SharedSlots

CONNECT_TIMEOUT = 1.0     # seconds: a Redis that takes longer to accept is unreachable
SOCKET_TIMEOUT = 2.0      # any one command; slot claims are bounded by cluster.timeout


class ClusterService:
    def __init__(self, cfg: Cluster, loop: asyncio.AbstractEventLoop, scheduler: Scheduler,
                 by_name):
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        self.cfg = cfg
        # No retries inside the library: a failed call is ours to count, and
        # to answer by going degraded.
        self.client = aioredis.from_url(
            cfg.redis_url, socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=SOCKET_TIMEOUT, retry=Retry(NoBackoff(), 0),
            health_check_interval=0, client_name="tts-lb")
        self.slots = SharedSlots(self.client, cfg.fleet, cfg.lease)
        self.gate = FleetSlots(cfg, self.slots, loop, backends=lambda: scheduler.backends,
                               wake=scheduler.dispatch, waiting=lambda: scheduler.queued)
        self.events = FleetEvents(self.client, self.slots, scheduler, loop, by_name)
        scheduler.gate = self.gate

    @property
    def shared(self) -> bool:
        return self.gate.shared

    def start(self) -> None:
        self.gate.start()
        self.events.start()

    def stop(self) -> None:
        self.events.stop()
        self.gate.stop()

    def set_admin(self, name: str, state: str) -> None:
        self.gate.set_admin(name, state)

    def snapshot(self) -> dict:
        return self.gate.snapshot() | {"events_received": self.events.received}


OFF = {"mode": "off"}


def metrics(family, cluster: dict) -> None:
    """The cluster's families for /metrics (`family` as endpoints.metrics has it)."""
    mode = cluster["mode"]
    family("cluster_degraded", "gauge",
           "1 while Redis cannot be reached and each backend is held to its static share "
           "here (0: slots shared, or no [cluster]).", [("", int(mode == "degraded"))])
    family("cluster_mode", "gauge", "How this process takes backend slots.",
           [(f'{{mode="{m}"}}', int(mode == m)) for m in ("off", "shared", "degraded")])
    if mode == "off":
        return
    acquire = cluster["acquire_ms"]
    family("cluster_slot_acquire_seconds", "summary",
           "Redis round trip to take a backend slot, over recent calls.",
           [('{quantile="0.5"}', acquire["p50"] / 1000), ('{quantile="0.99"}', acquire["p99"] / 1000),
            ("_count", acquire["count"])])
    family("cluster_lost_races_total", "counter",
           "Slots the fleet filled between this process's pick and its claim (picked again).",
           [("", cluster["lost_races"])])
    family("cluster_redis_errors_total", "counter", "Redis calls that failed or timed out.",
           [("", cluster["redis_errors"])])
    family("cluster_degraded_total", "counter", "Times this process went degraded.",
           [("", cluster["degraded_total"])])
