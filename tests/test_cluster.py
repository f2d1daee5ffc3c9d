"""[cluster] (issue 12) with real processes on 127.0.0.1: balancer replicas
(some with two workers) sharing backend slots through one redis-server, in
front of simulated GPU servers that crash with CUDA OOM one call above
their limit.  Each server's own /_stats is the judge of concurrency.

Killed replicas and a Redis that stops are in test_cluster_failures.py.
"""

from __future__ import annotations

import http.client

from cluster_kit import (BALANCER, LIMIT, Callers, backends, cluster, cluster_modes, gpus, mean_queue_wait,
                         redis_server, replica_snapshots, server_peaks, start_redis,
                         starving, trouble_lines)
from conftest import wait_until

__all__ = ["gpus", "redis_server", "start_redis"]   # fixtures, used by name

WORKERS = (2, 2, 1)       # three replicas, two of them with two workers
CALLERS, CALLS = 60, 5    # 300 calls: ~3 s of work for 5 servers x 4 slots


def start_replicas(start_lb, sims, redis=None) -> list:
    sections = {"cluster": cluster(redis, len(WORKERS))} if redis else {}
    return [start_lb(backends(sims), listen={"workers": w}, balancer=BALANCER, **sections)
            for w in WORKERS]


def test_replicas_sharing_slots_never_put_more_than_the_limit_on_a_server(
        start_lb, gpus, redis_server):
    sims = gpus(5)
    replicas = start_replicas(start_lb, sims, redis_server)
    wait_until(lambda: all(cluster_modes(lb, w) == {"shared"}
                           for lb, w in zip(replicas, WORKERS)), 3,
               what="every process sharing slots")
    load = Callers([lb.port for lb in replicas], CALLERS, CALLS)
    load.join(40)
    peaks = server_peaks(sims)
    print("\nservers (port, peak, crashes, syntheses):", peaks)
    assert load.failures() == [], (load.failures()[:10], trouble_lines(replicas))
    assert load.answered() == CALLERS * CALLS
    assert all(p["peak"] <= LIMIT and p["crashes"] == 0 for p in peaks), peaks
    assert max(p["peak"] for p in peaks) == LIMIT, peaks   # the load did fill them
    waits = []
    for i, (lb, workers) in enumerate(zip(replicas, WORKERS)):
        snaps = replica_snapshots(lb, workers)
        waits.append(mean_queue_wait(snaps))
        acquire = [s["cluster"]["acquire_ms"] for s in snaps.values()]
        print(f"replica {i} ({workers} worker(s)): mean queue wait {waits[-1]:.3f} s, "
              f"answered {len(load.by_port(lb.port))}, acquire_ms {acquire}, "
              f"lost_races {[s['cluster']['lost_races'] for s in snaps.values()]}")
        assert load.by_port(lb.port) == [200] * (len(load.by_port(lb.port)))
        assert len(load.by_port(lb.port)) == CALLERS // len(WORKERS) * CALLS
    assert starving(waits) == [], waits


def test_without_cluster_replicas_overload_the_servers(start_lb, gpus):
    """The danger [cluster] removes: three replicas each holding a server to
    its own share of the limit put up to 12 calls on a server of limit 4."""
    sims = gpus(5)
    replicas = start_replicas(start_lb, sims)
    load = Callers([lb.port for lb in replicas], CALLERS, 1)   # one wave is enough
    load.join(40)
    peaks = server_peaks(sims)
    print("\nwithout [cluster], servers (port, peak, crashes, syntheses):", peaks)
    assert any(p["peak"] > LIMIT for p in peaks), peaks
    assert sum(p["crashes"] for p in peaks) >= 1, peaks


def _admin(port: int, name: str, action: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", f"/lb/backends/{name}/{action}")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _b0_states(lb, workers: int) -> set[str]:
    return {b["state"] for s in replica_snapshots(lb, workers).values()
            for b in s["backends"] if b["name"] == "b0"}


def _syntheses(sim) -> int:
    return sim.stats()["synth_total"]


def test_a_drain_through_one_replica_applies_to_all(start_lb, gpus, redis_server):
    sims = gpus(3)
    replicas = start_replicas(start_lb, sims, redis_server)
    ports = [lb.port for lb in replicas]
    drained = sims[0]
    assert _admin(replicas[2].port, "b0", "drain") == 200
    # the spec: every replica within about a second (3 s here, not to be flaky)
    wait_until(lambda: all(_b0_states(lb, w) <= {"draining", "drained"}
                           for lb, w in zip(replicas, WORKERS)), 3,
               what="b0 draining on every worker of every replica")
    before = _syntheses(drained)
    load = Callers(ports, 30, 4)
    load.join(40)
    assert load.failures() == [], (load.failures()[:10], trouble_lines(replicas))
    assert _syntheses(drained) == before, "a drained server got new calls"
    assert sum(_syntheses(s) for s in sims[1:]) >= 30 * 4
    assert _admin(replicas[0].port, "b0", "ready") == 200
    wait_until(lambda: all(not _b0_states(lb, w) & {"draining", "drained"}
                           for lb, w in zip(replicas, WORKERS)), 3,
               what="b0 ready again on every worker of every replica")
    load = Callers(ports, 30, 4)
    load.join(40)
    assert load.failures() == [], (load.failures()[:10], trouble_lines(replicas))
    assert _syntheses(drained) > before, "`ready` did not bring the server back"
