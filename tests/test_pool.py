"""The pool of idle backend connections: bounded, expiring, never handing out a dead one."""

from __future__ import annotations

import http.client
import threading

from conftest import Backend, ScriptedBackend, read_head, wait_until


def _get(port: int, path: str = "/") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_idle_connections_expire(start_backend, start_lb):
    backend = start_backend()
    lb = start_lb([backend.url], pool={"idle_timeout": 1.5})
    assert _get(lb.port) == (200, b"ok\n")
    assert lb.stats()["backends"][0]["pool"]["idle"] == 1
    assert backend.stats()["connections_open"] == 1
    wait_until(lambda: lb.stats()["backends"][0]["pool"]["idle"] == 0, timeout=5,
               what="idle pooled connection expired")
    wait_until(lambda: backend.stats()["connections_open"] == 0, timeout=2,
               what="backend saw the expired connection close")


def test_pool_keeps_at_most_max_idle(start_backend, start_lb):
    backend = start_backend()
    lb = start_lb([backend.url], pool={"max_idle": 2}, balancer={"max_concurrency": 5})
    # Five concurrent slow requests need five backend connections; afterwards
    # only two stay pooled.
    results = []
    threads = [threading.Thread(target=lambda: results.append(_get(lb.port, "/slow?delay=0.5")))
               for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [(200, b"ok\n")] * 5
    assert backend.stats()["max_requests_in_flight"] == 5  # they overlapped
    pool = lb.stats()["backends"][0]["pool"]
    assert pool["opened"] == 5 and pool["idle"] == 2
    wait_until(lambda: backend.stats()["connections_open"] == 2, what="surplus connections closed")


def test_connection_closed_by_a_restarted_backend_is_not_reused(start_lb):
    first = Backend()
    try:
        lb = start_lb([first.url])
        assert _get(lb.port) == (200, b"ok\n")
        assert lb.stats()["backends"][0]["pool"]["idle"] == 1
    finally:
        first.stop()
    # The backend restarts on the same port; the pooled connection is dead.
    second = Backend(first.port)
    try:
        for _ in range(3):
            assert _get(lb.port) == (200, b"ok\n")
        entry = lb.stats()["backends"][0]
        assert entry["failures"]["reset"] == 0 and entry["failures"]["connect"] == 0
        assert second.stats()["connections_total"] == 1
    finally:
        second.stop()



def _answer_once_then_hang_up(conn, index):
    """Answer the first request on a connection, then close it without answering
    the second: the keep-alive race, every time."""
    if read_head(conn) is None:
        return
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
    conn.recv(65536)


def test_request_on_a_connection_the_backend_closes_is_resent_on_a_fresh_one(start_lb):
    backend = ScriptedBackend(_answer_once_then_hang_up)
    try:
        lb = start_lb([f"http://127.0.0.1:{backend.port}"])
        for _ in range(3):
            assert _get(lb.port, "/tts") == (200, b"ok\n")
        entry = lb.stats()["backends"][0]
        assert entry["responses"]["2xx"] == 3 and entry["errors"] == 0
        assert backend.accepted == 3   # each reuse failed and was resent on a new one
    finally:
        backend.close()
