"""Slow senders hold no GPU slot (issue: data plane v2, item 3).

A request body up to retry.replay_max_bytes is received whole before the
request takes a backend slot; timeouts.client_body bounds the whole body.
Real balancer, real echo backends, raw sockets on loopback.
"""

from __future__ import annotations

import http.client
import json
import threading
import time

from conftest import RawReader, connect, wait_until


def _trickle(port: int, stop: threading.Event, size: int = 4000, rate: int = 1000) -> None:
    """A chunked upload of `size` bytes at about `rate` bytes a second."""
    try:
        with connect(port, timeout=30) as sock:
            sock.sendall(b"POST /headers HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            sent = 0
            while sent < size and not stop.is_set():
                sock.sendall(b"64\r\n" + b"s" * 100 + b"\r\n")
                sent += 100
                stop.wait(100 / rate)
    except OSError:
        pass


def test_six_slow_uploads_leave_every_slot_to_a_normal_client(start_backend, start_lb):
    backend = start_backend()
    lb = start_lb([{"url": backend.url, "max_concurrency": 4}],
                  balancer={"queue_timeout": 2.0})
    stop = threading.Event()
    slow = [threading.Thread(target=_trickle, args=(lb.port, stop), daemon=True)
            for _ in range(6)]
    for thread in slow:
        thread.start()
    try:
        wait_until(lambda: lb.stats()["requests"]["under_way"] >= 6, what="six uploads under way")
        conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
        statuses = []
        for i in range(13):
            conn.request("POST", "/headers", body=b"hello")
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
        conn.close()
        assert statuses == [200] * 13
        # The backend never held one of the slow uploads.
        assert backend.stats()["requests_total"] == 13
    finally:
        stop.set()
        for thread in slow:
            thread.join(5)


def test_a_body_stalled_before_the_end_holds_no_slot_and_gets_408(start_backend, start_lb):
    backend = start_backend()
    lb = start_lb([backend.url], timeouts={"idle": 1.0})
    with connect(lb.port) as sock:
        sock.sendall(b"POST /headers HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        resp = RawReader(sock).response()
    assert resp.status == 408
    assert "no request body" in json.loads(resp.body)["error"]
    assert backend.stats()["requests_total"] == 0


def test_a_body_trickled_past_client_body_gets_408(start_backend, start_lb):
    backend = start_backend()
    lb = start_lb([backend.url], timeouts={"idle": 5.0, "client_body": 1.0})
    with connect(lb.port, timeout=10) as sock:
        sock.sendall(b"POST /headers HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        reader = RawReader(sock)
        # Never silent for long (idle is 5 s), but never done either.
        deadline = time.monotonic() + 6
        try:
            while time.monotonic() < deadline:
                sock.sendall(b"1\r\nx\r\n")
                time.sleep(0.2)
        except OSError:
            pass    # the balancer answered and closed
        resp = reader.response()
    assert resp.status == 408
    assert "timeouts.client_body (1s)" in json.loads(resp.body)["error"]
    assert backend.stats()["requests_total"] == 0


def test_a_streamed_body_also_has_the_client_body_deadline(start_backend, start_lb):
    backend = start_backend()
    lb = start_lb([backend.url], timeouts={"idle": 5.0, "client_body": 1.0},
                  retry={"replay_max_bytes": 0})
    with connect(lb.port, timeout=10) as sock:
        sock.sendall(b"POST /headers HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        wait_until(lambda: backend.stats()["requests_in_flight"] == 1, what="request at the backend")
        resp = RawReader(sock).response()
    assert resp.status == 408 and "client_body" in json.loads(resp.body)["error"]
    wait_until(lambda: backend.stats()["requests_in_flight"] == 0, what="backend freed")
