"""Helpers for the [cluster] tests (issue 12) with real processes: a
redis-server on a free loopback port, simulated GPU servers (Chatterbox,
--oom-at just above the limit) and closed-loop callers in threads.

Imported by test_cluster.py and test_cluster_failures.py; the fixtures
here are re-exported there so pytest finds them.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import statistics
import threading
import time
from unittest import mock

import pytest

from conftest import get_json, wait_until
from test_operations import worker_stats
from test_sim_tts import Sim
from test_tcp_listener import RedisServer

LIMIT = 4                 # each server's max_concurrency in the balancer
OOM_AT = LIMIT + 1        # a server crashes when a call beyond this is admitted
FLEET = "t1"
TEXT = "x" * 30           # 2 s of audio at 15 chars/s: 0.2 s of GPU time at rtf 0.1
SIM_ARGS = ("--tone", "--load-time", "0", "--rtf", "0.1", "--slots", str(LIMIT),
            "--oom-at", str(OOM_AT), "--restart-after", "0.5")
CALL_TIMEOUT = 20.0       # per call; every load is bounded by calls and by this
BALANCER = {"queue_timeout": 30}


@pytest.fixture
def start_redis():
    """start_redis(port=None) -> a running RedisServer, on `port` if given
    (Redis back after a stop); all stopped at the end."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    started: list[RedisServer] = []

    def start(port: int | None = None) -> RedisServer:
        # RedisServer picks its port with test_tcp_listener.free_port: name ours instead.
        same_port = mock.patch("test_tcp_listener.free_port", return_value=port)
        with same_port if port else contextlib.nullcontext():
            started.append(RedisServer())
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def redis_server(start_redis) -> RedisServer:
    return start_redis()


@pytest.fixture
def gpus():
    """gpus(n) -> n running simulated Chatterbox servers; all stopped at the end."""
    started: list[Sim] = []

    def start(n: int) -> list[Sim]:
        for _ in range(n):
            started.append(Sim("chatterbox", *SIM_ARGS))
        return started[-n:]

    yield start
    for s in started:
        s.stop()
        s.proc.stdout.close()
        assert "Traceback" not in s.output(), s.output()


def backends(sims: list[Sim], limit: int = LIMIT) -> list[dict]:
    return [{"url": f"http://127.0.0.1:{s.port}", "max_concurrency": limit} for s in sims]


def cluster(redis: RedisServer, replicas: int, **keys) -> dict:
    """A [cluster] table naming `redis`, fleet FLEET."""
    return {"redis_url": f"redis://127.0.0.1:{redis.port}/0", "fleet": FLEET,
            "replicas": replicas, **keys}


def synthesize(port: int) -> int | str:
    """One POST /synthesize-json on a fresh connection (so calls spread over
    a replica's workers): its status, or the exception's repr."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CALL_TIMEOUT)
    try:
        conn.request("POST", "/synthesize-json", body=json.dumps({"text": TEXT}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException) as exc:
        return repr(exc)
    finally:
        conn.close()


class Callers:
    """`count` closed-loop callers in threads, caller i on ports[i % len]:
    each makes up to `calls` calls one after another, stopping early once
    stop() is called.  outcomes[i]: caller i's statuses (or errors)."""

    def __init__(self, ports: list[int], count: int, calls: int):
        self.ports = [ports[i % len(ports)] for i in range(count)]
        self.outcomes: list[list] = [[] for _ in range(count)]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i, calls), daemon=True)
                         for i in range(count)]
        for thread in self._threads:
            thread.start()

    def _run(self, i: int, calls: int) -> None:
        for _ in range(calls):
            if self._stop.is_set():
                return
            self.outcomes[i].append(synthesize(self.ports[i]))

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), "callers still running"

    def answered(self) -> int:
        return sum(len(o) for o in self.outcomes)

    def failures(self) -> list:
        return [x for o in self.outcomes for x in o if x != 200]

    def by_port(self, port: int) -> list:
        return [x for p, o in zip(self.ports, self.outcomes) if p == port for x in o]


def _answers(sim: Sim) -> bool:
    try:
        sim.stats()
        return True
    except (OSError, http.client.HTTPException):
        return False


def server_peaks(sims: list[Sim]) -> list[dict]:
    """Each server's own view: peak concurrent syntheses, crashes, syntheses
    (waiting, bounded, for any that crashed to be back)."""
    wait_until(lambda: all(_answers(s) for s in sims), 10, what="servers back after crashes")
    out = []
    for s in sims:
        st = s.stats()
        out.append({"port": s.port, "peak": st["max_synth_in_flight"],
                    "crashes": st["crashes"], "synth": st["synth_total"]})
    return out


def replica_snapshots(balancer, workers: int) -> dict[int, dict]:
    """/lb-stats of every worker of a replica: {worker number: snapshot}."""
    return worker_stats(balancer.port, {1, 2} if workers == 2 else {0})


def mean_queue_wait(snapshots: dict[int, dict]) -> float:
    """A replica's mean queue wait: its workers' means weighted by how many
    calls each dispatched from its queue."""
    queues = [s["queue"] for s in snapshots.values()]
    dispatched = sum(q["dispatched"] for q in queues)
    if not dispatched:
        return 0.0
    return sum(q["mean_wait_s"] * q["dispatched"] for q in queues) / dispatched


def starving(waits: list[float], slack: float = 0.5) -> list[float]:
    """The waits wildly worse than the median (3x it plus `slack` seconds)."""
    median = statistics.median(waits)
    return [w for w in waits if w > 3 * median + slack]


def cluster_modes(balancer, workers: int) -> set[str]:
    """The cluster mode every worker of a replica reports in /lb-stats."""
    return {s["cluster"]["mode"] for s in replica_snapshots(balancer, workers).values()}


def health(balancer) -> dict:
    return get_json(balancer.port, "/health")


def trouble_lines(replicas, most: int = 8) -> list[str]:
    """The first warnings, errors and 5xx access lines of the replicas, for
    failure messages."""
    lines = [line for lb in replicas for line in lb.output().splitlines()
             if " WARNING " in line or " ERROR " in line or " status=5" in line]
    return lines[:most]
