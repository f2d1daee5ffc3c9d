"""Scheduling with real sockets: concurrency limits, the queue, retries,
passive and active health, the operator's drain/ready/maint, and policies.

Every backend here is a real `python -m backends.echo` (or a stopped one),
every client a real socket on 127.0.0.1.  What is asserted is what a user
sees: status codes, headers, JSON bodies, /lb-stats, access-log lines, and
each backend's own /_stats (how many requests it held at once).
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import Backend, RawReader, connect, wait_until

POLICIES = ("least_conn", "p2c", "random", "round_robin")


# --- helpers


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> dict:
        return json.loads(self.body)


def request(port: int, path: str, method: str = "GET", body: bytes | None = None,
            rid: str | None = None, timeout: float = 10.0) -> Answer:
    """One request on a fresh connection with http.client."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"X-Request-ID": rid} if rid else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def concurrently(count: int, job, workers: int | None = None) -> list:
    """Run job(i) for i in range(count) on threads that start together."""
    workers = workers or count
    barrier = threading.Barrier(min(workers, count))

    def run(i):
        if i < workers:
            barrier.wait(10)
        return job(i)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run, range(count), timeout=60))


def backend_entry(stats: dict, name: str) -> dict:
    for entry in stats["backends"]:
        if entry["name"] == name:
            return entry
    raise AssertionError(f"no backend {name} in /lb-stats")


def state_of(lb, name: str) -> str:
    return backend_entry(lb.stats(), name)["state"]


def admin(port: int, name: str, action: str, method: str = "POST") -> Answer:
    return request(port, f"/lb/backends/{name}/{action}", method=method, timeout=5)


def set_mode(backend: Backend, query: str) -> None:
    """GET /_mode?... on the echo backend itself (not through the balancer)."""
    answer = request(backend.port, f"/_mode?{query}", timeout=5)
    assert answer.status == 200, (query, answer.status, answer.body)


class HeldRequest:
    """A raw client connection with one request sent and no answer read yet."""

    def __init__(self, port: int, path: str, rid: str):
        self.rid = rid
        self.sock = connect(port, timeout=10)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Request-ID: {rid}\r\n\r\n"
                          .encode())

    def response(self):
        return RawReader(self.sock).response()

    def close(self) -> None:
        self.sock.close()


def access_line(lb, rid: str, timeout: float = 5.0) -> str:
    return lb.wait_for_line(rf"rid={re.escape(rid)} ", timeout=timeout).string


def field(line: str, name: str) -> str:
    match = re.search(rf"\b{name}=(\"(?:[^\"\\]|\\.)*\"|\S+)", line)
    assert match, f"no {name}= in {line!r}"
    return match.group(1)


# --- 1. concurrency limits and the queue


def test_concurrency_limit_holds_under_load_and_excess_waits_in_queue(start_backend, start_lb):
    backends = [start_backend() for _ in range(3)]
    lb = start_lb([{"url": b.url, "max_concurrency": 4} for b in backends],
                  balancer={"queue_timeout": 20})

    answers = concurrently(30, lambda i: request(lb.port, "/slow?delay=0.4", rid=f"load-{i}"))

    assert [a.status for a in answers] == [200] * 30
    assert all(a.body == b"ok\n" for a in answers)
    seen = [b.stats() for b in backends]
    assert sum(s["requests_total"] for s in seen) == 30
    for s in seen:
        assert s["max_requests_in_flight"] <= 4, seen
    stats = lb.stats()
    for entry in stats["backends"]:
        assert entry["peak_in_flight"] <= 4, entry
        assert entry["in_flight"] == 0
        assert entry["state"] == "up"
    queue = stats["queue"]
    # 30 at once on 12 slots: at least 18 had to wait, and all of them got a slot.
    assert queue["peak"] > 0 and queue["dispatched"] >= 18, queue
    assert queue["length"] == 0
    assert queue["rejected_full"] == 0 and queue["timed_out"] == 0
    assert queue["mean_wait_s"] > 0


def test_queue_full_answers_503_at_once_with_retry_after(start_backend, start_lb):
    backend = start_backend()
    lb = start_lb([{"url": backend.url, "max_concurrency": 1}],
                  balancer={"queue_limit": 2, "queue_timeout": 10})
    holder = HeldRequest(lb.port, "/slow?delay=1.5", "holder")
    waiting = []
    try:
        wait_until(lambda: backend_entry(lb.stats(), "b0")["in_flight"] == 1,
                   what="the slow request to take the only slot")
        waiting = [HeldRequest(lb.port, "/", f"queued-{i}") for i in range(2)]
        wait_until(lambda: lb.stats()["queue"]["length"] == 2, what="two requests queued")

        over = request(lb.port, "/", rid="over")

        assert over.status == 503
        assert over.headers.get("retry-after") == "1"
        assert over.headers["content-type"] == "application/json"
        error = over.json()["error"]
        assert "queue" in error and "queue_limit" in error, error
        assert over.json()["request_id"] == "over"
        # Answered while the slot was still held and the queue still full: at once.
        stats = lb.stats()
        assert stats["queue"]["length"] == 2 and stats["queue"]["rejected_full"] == 1
        assert backend_entry(stats, "b0")["in_flight"] == 1

        first = holder.response()
        assert first.status == 200 and first.body == b"ok\n"
        for held in waiting:
            resp = held.response()
            assert resp.status == 200 and resp.body == b"ok\n"
    finally:
        holder.close()
        for held in waiting:
            held.close()
    line = access_line(lb, "over")
    assert "status=503" in line and "backend=-" in line and "queue_limit" in line, line
    assert backend.stats()["requests_total"] == 3   # the rejected one never reached it
    assert lb.stats()["queue"]["dispatched"] == 2


def test_queue_timeout_answers_503_with_retry_after(start_backend, start_lb):
    backend = start_backend()
    lb = start_lb([{"url": backend.url, "max_concurrency": 1}],
                  balancer={"queue_limit": 10, "queue_timeout": 0.5})
    holder = HeldRequest(lb.port, "/hang", "holder")
    try:
        wait_until(lambda: backend_entry(lb.stats(), "b0")["in_flight"] == 1,
                   what="the hanging request to take the only slot")
        started = time.monotonic()
        late = request(lb.port, "/", rid="late")
        waited = time.monotonic() - started
    finally:
        holder.close()
    assert late.status == 503
    assert late.headers.get("retry-after") == "1"
    assert "queue_timeout" in late.json()["error"], late.json()
    assert 0.4 <= waited < 3.0, f"the queued request was answered after {waited:.2f}s"
    line = access_line(lb, "late")
    assert "status=503" in line and "backend=-" in line, line
    assert "queue_timeout" in field(line, "note"), line
    queue_ms = float(field(line, "queue_ms"))
    assert 400 <= queue_ms < 3000, line
    stats = lb.stats()
    assert stats["queue"]["timed_out"] == 1 and stats["queue"]["length"] == 0
    assert backend.stats()["requests_total"] == 1


def test_client_that_leaves_while_queued_is_dropped_from_the_queue(start_backend, start_lb):
    backend = start_backend()
    lb = start_lb([{"url": backend.url, "max_concurrency": 1}],
                  balancer={"queue_limit": 10, "queue_timeout": 10})
    holder = HeldRequest(lb.port, "/hang", "holder")
    try:
        wait_until(lambda: backend_entry(lb.stats(), "b0")["in_flight"] == 1,
                   what="the hanging request to take the only slot")
        gone = HeldRequest(lb.port, "/never-sent", "gone")
        wait_until(lambda: lb.stats()["queue"]["length"] == 1, what="one request queued")
        gone.close()
        wait_until(lambda: lb.stats()["queue"]["length"] == 0, timeout=3,
                   what="the queue to drop the request whose client left")
        line = access_line(lb, "gone")
        assert "status=499" in line and "backend=-" in line, line
    finally:
        holder.close()
    # The slot frees when the holder leaves; nobody may be dispatched to it.
    wait_until(lambda: backend_entry(lb.stats(), "b0")["in_flight"] == 0,
               what="the held slot to be released")
    wait_until(lambda: backend.stats()["requests_in_flight"] == 0,
               what="the backend to see the holder leave")
    after = request(lb.port, "/after", rid="after")
    assert after.status == 200
    assert backend.stats()["requests_total"] == 2   # /hang and /after, never /never-sent
    stats = lb.stats()
    assert backend_entry(stats, "b0")["requests"] == 2
    assert stats["queue"]["dispatched"] == 0


def test_own_endpoints_answer_while_every_backend_is_full(start_backend, start_lb):
    backends = [start_backend() for _ in range(2)]
    lb = start_lb([{"url": b.url, "max_concurrency": 1} for b in backends],
                  balancer={"queue_limit": 10, "queue_timeout": 10})
    held = []
    try:
        held = [HeldRequest(lb.port, "/hang", f"hold-{i}") for i in range(2)]
        wait_until(lambda: all(e["in_flight"] == 1 for e in lb.stats()["backends"]),
                   what="both backends full")
        held += [HeldRequest(lb.port, "/hang", f"wait-{i}") for i in range(3)]
        wait_until(lambda: lb.stats()["queue"]["length"] == 3, what="three requests queued")

        health = request(lb.port, "/health", timeout=2)
        assert health.status == 200
        assert health.json()["status"] == "ok"
        assert (health.json()["backends_usable"], health.json()["backends_total"]) == (2, 2)
        stats = request(lb.port, "/lb-stats", timeout=2)
        assert stats.status == 200
        assert stats.json()["queue"]["length"] == 3
        assert [e["in_flight"] for e in stats.json()["backends"]] == [1, 1]
        metrics = request(lb.port, "/metrics", timeout=2)
        assert metrics.status == 200
        text = metrics.body.decode()
        assert "tts_lb_queue_length 3" in text
        assert 'tts_lb_backend_in_flight{backend="b0"} 1' in text
    finally:
        for h in held:
            h.close()
    wait_until(lambda: lb.stats()["queue"]["length"] == 0, what="the queue to empty")


# --- 2. passive health and retries


def test_dead_backend_is_retried_around_ejected_and_readmitted(start_backend, start_lb):
    backends = [start_backend() for _ in range(3)]
    lb = start_lb([b.url for b in backends],
                  balancer={"policy": "round_robin", "slow_start": 0},
                  **{"health.passive": {"base_ejection": 1.0, "consecutive_failures": 3}})
    for i in range(6):
        assert request(lb.port, "/", rid=f"warm-{i}").status == 200
    dead = backends[1]
    port = dead.port
    dead.stop()

    seen_states = []
    for i in range(30):
        answer = request(lb.port, "/", rid=f"while-dead-{i}")
        assert answer.status == 200, (i, answer.status, answer.body)
        state = state_of(lb, "b1")
        seen_states.append(state)
        if state == "ejected":
            break
    assert "ejected" in seen_states, seen_states
    stats = lb.stats()
    entry = backend_entry(stats, "b1")
    assert entry["ejections"] == 1 and entry["failures"]["connect"] >= 3, entry
    assert stats["retry"]["retries"] >= 3
    retried = lb.wait_for_line(r"rid=while-dead-\d+ .*status=200 .*attempts=2 tried=b1,b[02]\b")
    assert "b1" in field(retried.string, "why"), retried.string
    lb.wait_for_line(r"backend b1 ejected for")

    revived = Backend(port)
    try:
        deadline = time.monotonic() + 8
        i = 0
        while True:
            answer = request(lb.port, "/", rid=f"revived-{i}")
            assert answer.status == 200
            i += 1
            if state_of(lb, "b1") == "up" and revived.stats()["requests_total"] > 0:
                break
            assert time.monotonic() < deadline, f"b1 not readmitted: {lb.stats()['backends'][1]}"
            time.sleep(0.1)
        lb.wait_for_line(r"backend b1 readmitted")
        before = revived.stats()["requests_total"]
        for j in range(6):
            assert request(lb.port, "/", rid=f"after-{j}").status == 200
        assert revived.stats()["requests_total"] >= before + 1   # back in the rotation
    finally:
        revived.stop()


def test_backend_answering_503_is_retried_on_another(start_backend, start_lb):
    failing, healthy = start_backend(), start_backend()
    set_mode(failing, "status=503")
    lb = start_lb([failing.url, healthy.url], balancer={"policy": "round_robin"},
                  **{"health.passive": {"consecutive_5xx": 0}})
    answers = [request(lb.port, "/", rid=f"r503-{i}") for i in range(6)]
    assert [a.status for a in answers] == [200] * 6
    assert all(a.body == b"ok\n" for a in answers)
    retry = lb.stats()["retry"]
    assert retry["by_reason"].get("status_503", 0) >= 1, retry
    assert retry["retries"] == retry["by_reason"]["status_503"]
    recent = retry["recent"]
    assert recent, retry
    for entry in recent:
        assert entry["status"] == 200 and entry["attempts"] == 2
        assert entry["backends"] == ["b0", "b1"]
        assert any("503" in why for why in entry["why"]), entry
    rid = recent[0]["request_id"]
    line = access_line(lb, rid)
    assert "status=200 backend=b1" in line and "attempts=2 tried=b0,b1" in line, line
    assert "b0 answered 503" in field(line, "why"), line


def test_retry_budget_bounds_retries_when_every_backend_fails(start_backend, start_lb):
    backends = [start_backend() for _ in range(3)]
    for b in backends:
        set_mode(b, "status=503")
        b.reset_stats()
    lb = start_lb([b.url for b in backends],
                  balancer={"queue_timeout": 20},
                  retry={"attempts": 3, "budget_percent": 0, "budget_min": 1,
                         "backoff_base": 0.2, "backoff_max": 0.2},
                  **{"health.passive": {"consecutive_5xx": 0}})
    clients = 30
    answers = concurrently(clients, lambda i: request(lb.port, "/", rid=f"budget-{i}"))
    assert {a.status for a in answers} == {503}
    stats = lb.stats()
    retry = stats["retry"]
    assert retry["not_retried"].get("budget", 0) > 0, retry
    assert retry["retrying_now"] == 0
    reached = sum(b.stats()["requests_total"] for b in backends)
    assert reached == sum(e["requests"] for e in stats["backends"])
    assert reached == clients + retry["retries"]
    assert reached < 2 * clients, (reached, retry)
    line = lb.wait_for_line(r"rid=budget-\d+ .*not retried: retry budget spent").string
    assert "status=503" in line


def test_body_over_replay_max_bytes_is_not_retried(start_backend, start_lb):
    failing, healthy = start_backend(), start_backend()
    set_mode(failing, "status=503")
    lb = start_lb([failing.url, healthy.url], balancer={"policy": "round_robin"},
                  retry={"replay_max_bytes": 100},
                  **{"health.passive": {"consecutive_5xx": 0}})
    body = b"x" * 1000
    # Head and body in one write: the balancer has the whole body before it
    # picks a backend, so the outcome does not depend on timing.
    with connect(lb.port) as sock:
        sock.sendall(b"POST /headers HTTP/1.1\r\nHost: x\r\nX-Request-ID: big\r\n"
                     b"Content-Length: 1000\r\n\r\n" + body)
        big = RawReader(sock).response()
    assert big.status == 503, (big.status, big.body)
    assert big.json() == {"status": 503, "detail": "simulated failure"}   # b0's own answer
    line = access_line(lb, "big")
    assert "status=503 backend=b0" in line and "attempts=" not in line, line
    assert "not retried: request body over retry.replay_max_bytes (100 bytes)" in line, line
    stats = lb.stats()
    assert stats["retry"]["not_retried"].get("body_too_large") == 1, stats["retry"]
    assert stats["retry"]["retries"] == 0
    assert backend_entry(stats, "b1")["requests"] == 0
    assert healthy.stats()["requests_total"] == 0

    # A body within the limit is replayed on the other backend.  Round robin
    # sends the next request to b1, the one after to b0 (then retried on b1).
    lines = []
    for i in range(2):
        with connect(lb.port) as sock:
            sock.sendall(b"POST /headers HTTP/1.1\r\nHost: x\r\nX-Request-ID: small-%d\r\n"
                         b"Content-Length: 50\r\n\r\n" % i + b"y" * 50)
            small = RawReader(sock).response()
        assert small.status == 200 and small.json()["body_bytes"] == 50
        lines.append(access_line(lb, f"small-{i}"))
    assert "attempts=" not in lines[0], lines
    assert "backend=b1" in lines[1] and "attempts=2 tried=b0,b1" in lines[1], lines
    assert lb.stats()["retry"]["retries"] == 1


@pytest.mark.parametrize("warm", [False, True], ids=["new-connection", "pooled-connection"])
def test_body_outgrowing_the_kept_copy_during_a_retry_gives_up_cleanly(start_backend, start_lb,
                                                                       warm):
    # A POST whose body is still arriving fails on b0 (refused) and waits to
    # be resent to b1; meanwhile its body passes replay_max_bytes, so it can
    # no longer be sent whole.  The caller gets b0's failure, nothing hangs,
    # and b1 is not left holding a slot or a bodiless request.
    import socket as socket_module
    with socket_module.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    live = start_backend()
    lb = start_lb([dead, {"url": live.url, "max_concurrency": 1}],
                  balancer={"policy": "round_robin"},
                  retry={"replay_max_bytes": 100, "backoff_base": 0.3, "backoff_max": 0.3},
                  **{"health.passive": {"consecutive_failures": 0}})
    if warm:   # leave a pooled connection to b1 for the resend to use
        for _ in range(2):
            assert request(lb.port, "/").status == 200
    with connect(lb.port) as sock:
        sock.sendall(b"POST /echo?cl=1 HTTP/1.1\r\nHost: x\r\nX-Request-ID: grow\r\n"
                     b"Content-Length: 200\r\n\r\n" + b"a" * 50)
        time.sleep(0.1)            # refused at once; now backing off (0.15-0.3 s)
        sock.sendall(b"b" * 150)   # the kept copy passes 100 bytes
        resp = RawReader(sock).response()
    assert resp.status == 502, (resp.status, resp.body)
    assert "cannot connect to backend b0" in resp.json()["error"]
    line = access_line(lb, "grow")
    assert "resend given up: request body grew over retry.replay_max_bytes" in line, line
    # The balancer is whole: b1 holds nothing and takes the next call.
    stats = lb.stats()
    assert backend_entry(stats, "b1")["in_flight"] == 0
    assert request(lb.port, "/").status == 200
    assert live.stats()["requests_in_flight"] == 0


def test_4xx_is_passed_through_and_never_retried(start_backend, start_lb):
    backends = [start_backend() for _ in range(2)]
    lb = start_lb([b.url for b in backends], balancer={"policy": "round_robin"})
    for i in range(4):
        answer = request(lb.port, "/status/404", rid=f"nf-{i}")
        assert answer.status == 404 and answer.json() == {"status": 404}
        line = access_line(lb, f"nf-{i}")
        assert "status=404" in line and "attempts=" not in line and "why=" not in line, line
    answer = request(lb.port, "/status/429", rid="busy")
    assert answer.status == 429 and answer.json() == {"status": 429}
    stats = lb.stats()
    assert stats["retry"]["retries"] == 0 and stats["retry"]["recent"] == []
    assert sum(b.stats()["requests_total"] for b in backends) == 5
    for entry in stats["backends"]:
        assert entry["state"] == "up" and entry["ejections"] == 0


# --- 3. the operator


def test_drain_lets_in_flight_finish_and_sends_nothing_new(start_backend, start_lb):
    b0, b1 = start_backend(), start_backend()
    lb = start_lb([b0.url, b1.url], balancer={"policy": "round_robin", "slow_start": 0})
    result = {}
    slow = threading.Thread(target=lambda: result.update(
        answer=request(lb.port, "/slow?delay=1.0", rid="in-flight")))
    slow.start()
    try:
        # Round robin's first pick is b0.
        wait_until(lambda: backend_entry(lb.stats(), "b0")["in_flight"] == 1,
                   what="the slow request on b0")
        drained = admin(lb.port, "b0", "drain")
        assert drained.status == 200, drained.body
        assert drained.json()["state"] == "draining" and drained.json()["admin"] == "drain"
        assert state_of(lb, "b0") == "draining"
        for i in range(4):
            answer = request(lb.port, "/", rid=f"during-drain-{i}")
            assert answer.status == 200
            assert "backend=b1" in access_line(lb, f"during-drain-{i}")
        assert b0.stats()["requests_total"] == 1
        assert backend_entry(lb.stats(), "b0")["requests"] == 1
    finally:
        slow.join(10)
    assert result["answer"].status == 200 and result["answer"].body == b"ok\n"
    assert "backend=b0" in access_line(lb, "in-flight")
    wait_until(lambda: state_of(lb, "b0") == "drained", what="b0 drained")
    assert request(lb.port, "/health").json()["backends_usable"] == 1

    ready = admin(lb.port, "b0", "ready")
    assert ready.status == 200 and ready.json()["state"] == "up", ready.body
    for i in range(4):
        assert request(lb.port, "/", rid=f"after-ready-{i}").status == 200
    assert b0.stats()["requests_total"] >= 2

    before = b0.stats()["requests_total"]
    maint = admin(lb.port, "b0", "maint")
    assert maint.status == 200 and maint.json()["state"] == "maint"
    assert state_of(lb, "b0") == "maint"
    for i in range(4):
        assert request(lb.port, "/", rid=f"during-maint-{i}").status == 200
        assert "backend=b1" in access_line(lb, f"during-maint-{i}")
    assert b0.stats()["requests_total"] == before
    assert admin(lb.port, "b0", "ready").json()["state"] == "up"
    for i in range(4):
        assert request(lb.port, "/", rid=f"back-{i}").status == 200
    assert b0.stats()["requests_total"] > before
    lb.wait_for_line(r"backend b0 set to drain \(was ready\)")
    lb.wait_for_line(r"backend b0 set to maint \(was ready\)")


def test_admin_errors(start_backend, start_lb):
    backend = start_backend()
    lb = start_lb([backend.url])
    unknown = admin(lb.port, "nope", "drain")
    assert unknown.status == 404
    assert unknown.headers["content-type"] == "application/json"
    assert "nope" in unknown.json()["error"] and "b0" in unknown.json()["error"]

    wrong_method = admin(lb.port, "b0", "drain", method="GET")
    assert wrong_method.status == 405
    assert wrong_method.headers.get("allow") == "POST"
    assert "error" in wrong_method.json()

    bad_action = admin(lb.port, "b0", "explode")
    assert bad_action.status == 404
    assert "explode" in bad_action.json()["error"]
    assert state_of(lb, "b0") == "up"   # none of these changed anything


def test_admin_refused_from_an_address_not_allowed(start_backend, start_lb):
    backend = start_backend()
    lb = start_lb([backend.url], admin={"allow": ["10.0.0.0/8"]})
    refused = admin(lb.port, "b0", "drain")
    assert refused.status == 403
    assert refused.headers["content-type"] == "application/json"
    error = refused.json()["error"]
    assert "admin.allow" in error and "127.0.0.1" in error, error
    assert state_of(lb, "b0") == "up"
    assert request(lb.port, "/").status == 200


# --- 4. active probes


def test_probe_keeps_a_loading_backend_out_until_it_is_ready(start_backend, start_lb):
    loading, other = start_backend(), start_backend()
    set_mode(loading, "health=loading")
    lb = start_lb([{"url": loading.url, "health_path": "/health"}, other.url],
                  balancer={"policy": "round_robin", "slow_start": 0},
                  **{"health.active": {"interval": 0.2, "timeout": 1.0, "rise": 2, "fall": 2}})
    wait_until(lambda: state_of(lb, "b0") == "down", what="b0 down by its probe")
    entry = backend_entry(lb.stats(), "b0")
    assert entry["probe"]["up"] is False
    assert "503" in entry["probe"]["last"] and "Model not loaded" in entry["probe"]["last"]
    for i in range(6):
        answer = request(lb.port, "/", rid=f"loading-{i}")
        assert answer.status == 200
        assert "backend=b1" in access_line(lb, f"loading-{i}")
    assert backend_entry(lb.stats(), "b0")["requests"] == 0

    set_mode(loading, "health=ready")
    wait_until(lambda: state_of(lb, "b0") == "up", timeout=5, what="b0 up after rise probes")
    lb.wait_for_line(r"backend b0 is up by its health probe")
    for i in range(6):
        assert request(lb.port, "/", rid=f"ready-{i}").status == 200
    assert backend_entry(lb.stats(), "b0")["requests"] >= 2


# --- 5. policies


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_never_exceeds_the_limit(start_backend, start_lb, policy):
    backends = [start_backend() for _ in range(5)]
    lb = start_lb([{"url": b.url, "max_concurrency": 4} for b in backends],
                  balancer={"policy": policy, "queue_timeout": 20})
    answers = concurrently(20, lambda i: request(lb.port, "/slow?delay=0.6", rid=f"{policy}-{i}"))
    assert [a.status for a in answers] == [200] * 20
    seen = [b.stats() for b in backends]
    assert sum(s["requests_total"] for s in seen) == 20
    for s in seen:
        assert s["max_requests_in_flight"] <= 4, seen
    stats = lb.stats()
    assert all(e["peak_in_flight"] <= 4 for e in stats["backends"]), stats["backends"]
    assert stats["policy"] == policy
    if policy in ("least_conn", "round_robin"):
        # 20 at once on 5 x 4 slots: a balanced pick has no other choice.
        assert [s["requests_total"] for s in seen] == [4] * 5, seen
        assert [e["requests"] for e in stats["backends"]] == [4] * 5
