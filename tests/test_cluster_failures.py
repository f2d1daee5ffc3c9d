"""[cluster] (issue 12) when things fail, with real processes on 127.0.0.1:
a replica killed with SIGKILL mid-load (its slots expire within the lease
and the others use them), and Redis stopped mid-load (every process falls
back to its static share, no call fails, shared slots resume when Redis is
back on the same port).  The servers' own /_stats judge concurrency.
"""

from __future__ import annotations

import signal
import time
import urllib.request

import pytest

from cluster_kit import (BALANCER, FLEET, LIMIT, Callers, backends, cluster, cluster_modes,
                         gpus, health, redis_server, server_peaks, start_redis,
                         trouble_lines)
from conftest import Balancer, lb_config, wait_until
from test_sim_tts import call

redis = pytest.importorskip("redis")

__all__ = ["gpus", "redis_server", "start_redis"]   # fixtures, used by name
LEASE = 2.0
CALL_TIMEOUT_MARGIN = 25.0     # callers still in a call when stopped finish within


@pytest.fixture
def start_victim(tmp_path, http_engine):
    """A one-process replica started outside start_lb, whose teardown
    requires a clean exit: this one is SIGKILLed.  Killed by pid at the end."""
    started: list[Balancer] = []

    def start(backend_list: list, **sections) -> Balancer:
        path = tmp_path / f"victim{len(started)}.toml"
        path.write_text(lb_config(backend_list, **sections))
        started.append(Balancer(path, http=http_engine))
        return started[-1]

    yield start
    for balancer in started:
        if balancer.proc.poll() is None:
            balancer.proc.kill()
        balancer.stop()


def live_holders(client, sims) -> dict[str, int]:
    """Holders whose lease has not run out, per backend, in Redis's clock
    (a raw ZCARD still counts expired members until a script drops them)."""
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    return {f"b{i}": client.zcount(f"{FLEET}:slots:b{i}", now_ms + 1, "+inf")
            for i in range(len(sims))}


def reset_servers(sims) -> None:
    for s in sims:
        assert call(s.port, "GET", "/_stats/reset")[0] == 200


def test_a_killed_replicas_slots_expire_and_the_others_use_them(
        start_lb, start_victim, gpus, redis_server):
    sims = gpus(3)
    sections = {"cluster": cluster(redis_server, 3, lease=LEASE), "balancer": BALANCER}
    victim = start_victim(backends(sims), **sections)
    survivors = [start_lb(backends(sims), listen={"workers": 2}, **sections),
                 start_lb(backends(sims), **sections)]
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=5)
    doomed = Callers([victim.port], 12, 200)
    kept = Callers([lb.port for lb in survivors], 30, 200)
    try:
        wait_until(lambda: victim.stats()["backends"] and
                   sum(b["in_flight"] for b in victim.stats()["backends"]) >= 3, 10,
                   what="the victim holding slots")
        victim.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        victim.proc.wait(5)
        doomed.stop()
        time.sleep(LEASE + 1.0)        # the lease and a second: what the spec allows
        reset_servers(sims)            # from here on only the survivors' calls count
        served_before = kept.answered()
        wait_until(lambda: kept.answered() > served_before + 60, 15, what="survivors' calls")
        peaks = server_peaks(sims)
        kept.stop()
        kept.join(CALL_TIMEOUT_MARGIN)
        doomed.join(CALL_TIMEOUT_MARGIN)
        holders = live_holders(client, sims)
    finally:
        kept.stop()
        doomed.stop()
        client.close()
    print(f"\nafter SIGKILL at +{time.monotonic() - killed_at:.1f}s: servers {peaks}, "
          f"live holders {holders}")
    assert kept.failures() == [], (kept.failures()[:10], trouble_lines(survivors))
    assert all(p["peak"] <= LIMIT and p["crashes"] == 0 for p in peaks), peaks
    # 30 callers for 12 slots: with the victim's slots free, every server fills.
    assert all(p["peak"] == LIMIT for p in peaks), peaks
    assert holders == {f"b{i}": 0 for i in range(len(sims))}, holders


def degraded_lines(lb) -> int:
    return sum("cluster: degraded" in line for line in lb.output().splitlines())


def cluster_log(replicas) -> list[list[str]]:
    """Each replica's "cluster:" log lines, for failure messages."""
    return [[line for line in lb.output().splitlines() if "cluster:" in line]
            for lb in replicas]


def metrics(lb) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{lb.port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_redis_stopped_mid_load_degrades_to_the_static_share_and_recovers(
        start_lb, gpus, start_redis, redis_server):
    """Two replicas, limit 4: the static share is 2 a replica (1 for each of
    the first replica's two workers), 4 a server in all."""
    sims = gpus(3)
    workers = (2, 1)
    sections = {"cluster": cluster(redis_server, len(workers)), "balancer": BALANCER}
    replicas = [start_lb(backends(sims), listen={"workers": w}, **sections) for w in workers]
    pairs = list(zip(replicas, workers))
    wait_until(lambda: all(cluster_modes(lb, w) == {"shared"} for lb, w in pairs), 3,
               what="every process sharing slots")
    load = Callers([lb.port for lb in replicas], 24, 400)
    try:
        wait_until(lambda: load.answered() >= 24, 10, what="calls under way")
        redis_server.stop()
        wait_until(lambda: all(health(lb).get("cluster") == "degraded" for lb in replicas)
                   and all(cluster_modes(lb, w) == {"degraded"} for lb, w in pairs), 5,
                   what="every process degraded")
        assert all("tts_lb_cluster_degraded 1" in metrics(lb) for lb in replicas)
        time.sleep(0.5)               # calls begun while shared (0.2 s each) are done
        reset_servers(sims)
        served = load.answered()
        wait_until(lambda: load.answered() > served + 60, 15, what="calls while degraded")
        degraded_peaks = server_peaks(sims)
        degraded_counts = [degraded_lines(lb) for lb in replicas]   # before our own teardown
        start_redis(redis_server.port)           # a fresh redis-server on the same port
        try:
            wait_until(lambda: all(cluster_modes(lb, w) == {"shared"} for lb, w in pairs), 10,
                       what="every process sharing again")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: modes {[cluster_modes(lb, w) for lb, w in pairs]}"
                                 f"; {cluster_log(replicas)}") from None
        assert all(health(lb).get("cluster") == "shared" for lb in replicas)
        served = load.answered()
        wait_until(lambda: load.answered() > served + 30, 15, what="calls shared again")
        load.stop()
        load.join(CALL_TIMEOUT_MARGIN)
        final = server_peaks(sims)
    finally:
        load.stop()
    print(f"\ndegraded: servers {degraded_peaks}; at the end {final}\n{cluster_log(replicas)}")
    assert load.failures() == [], (load.failures()[:10], trouble_lines(replicas))
    assert all(p["peak"] <= LIMIT and p["crashes"] == 0 for p in degraded_peaks), degraded_peaks
    assert all(p["peak"] <= LIMIT and p["crashes"] == 0 for p in final), final
    assert degraded_counts == list(workers), cluster_log(replicas)
    assert all("cluster: shared slots again" in lb.output() for lb in replicas)
