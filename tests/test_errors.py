"""Every failure is an answer: statuses, JSON bodies, broken streams, freed backends."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from conftest import RawReader, ScriptedBackend, connect, raw_request, read_head, wait_until


def _assert_json_error(resp, status: int, *words: str) -> dict:
    assert resp.status == status, (resp.status, resp.body)
    assert resp.header("content-type") == "application/json"
    body = resp.json()
    assert set(body) == {"error", "request_id"}
    assert body["request_id"] == resp.header("x-request-id")
    for word in words:
        assert word in body["error"], body["error"]
    return body


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: nobody listens


# --- the client's mistakes

def test_malformed_request_line_is_400(lb):
    resp = raw_request(lb.port, b"THIS IS NOT HTTP\r\n\r\n")
    _assert_json_error(resp, 400, "malformed")


def test_bad_header_is_400(lb):
    resp = raw_request(lb.port, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n")
    _assert_json_error(resp, 400)


def test_content_length_with_transfer_encoding_is_400(lb, backend):
    backend.reset_stats()
    resp = raw_request(lb.port, b"POST /headers HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    _assert_json_error(resp, 400, "Content-Length and Transfer-Encoding")
    assert resp.header("connection") == "close"
    assert backend.stats()["requests_total"] == 0


def test_oversized_head_is_431(start_backend, start_lb):
    lb = start_lb([start_backend().url], limits={"max_header_bytes": 4096})
    resp = raw_request(lb.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n")
    _assert_json_error(resp, 431, "max_header_bytes")


def test_declared_oversized_body_is_413_before_reading_it(start_backend, start_lb):
    backend = start_backend()
    lb = start_lb([backend.url], limits={"max_body_bytes": 1000})
    resp = raw_request(lb.port, b"POST /headers HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
    _assert_json_error(resp, 413, "max_body_bytes")
    assert backend.stats()["requests_total"] == 0


def test_413_reaches_a_client_that_keeps_uploading(start_backend, start_lb):
    # http.client writes the whole body before reading: the balancer must
    # read and discard it after answering, not reset the connection.
    lb = start_lb([start_backend().url], limits={"max_body_bytes": 1000})
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    conn.request("POST", "/headers", body=b"u" * (32 * 1024 * 1024))
    resp = conn.getresponse()
    assert resp.status == 413
    assert "max_body_bytes" in resp.read().decode()
    conn.close()


def test_chunked_body_growing_past_the_limit_is_413(start_backend, start_lb):
    backend = start_backend()
    # (replay_max_bytes 0: the body is streamed, so the request is at the
    # backend already when the body outgrows the limit)
    lb = start_lb([backend.url], limits={"max_body_bytes": 1000}, retry={"replay_max_bytes": 0})
    with connect(lb.port) as sock:
        sock.sendall(b"POST /headers HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"200\r\n" + b"z" * 512 + b"\r\n")
        wait_until(lambda: backend.stats()["requests_in_flight"] == 1, what="request at the backend")
        for _ in range(2):
            sock.sendall(b"200\r\n" + b"z" * 512 + b"\r\n")
        resp = RawReader(sock).response()
    _assert_json_error(resp, 413, "max_body_bytes")
    # The backend connection that was receiving the body is closed, not left waiting.
    wait_until(lambda: backend.stats()["requests_in_flight"] == 0, what="backend request freed")


def test_incomplete_head_times_out_with_408(start_backend, start_lb):
    lb = start_lb([start_backend().url], timeouts={"client_header": 0.5})
    with connect(lb.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finished
        resp = RawReader(sock).response()
    _assert_json_error(resp, 408, "client_header")


def test_idle_connection_without_request_is_closed_quietly(start_backend, start_lb):
    lb = start_lb([start_backend().url], timeouts={"client_header": 0.3})
    with connect(lb.port) as sock:
        assert sock.recv(100) == b""  # closed, nothing written


# --- the backend's failures

# With retries off, one failure is what the client sees (retries: test_scheduling.py).
NO_RETRY = {"retry": {"attempts": 1}}


def test_refused_connection_is_502(start_lb):
    lb = start_lb([_dead_url()], **NO_RETRY)
    resp = raw_request(lb.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    _assert_json_error(resp, 502, "cannot connect")
    entry = lb.stats()["backends"][0]
    assert entry["failures"]["connect"] == 1
    assert "cannot connect" in entry["last_error"]["reason"]


@pytest.mark.parametrize("path, words", [("/reset", "reset"), ("/close", "closed the connection")])
def test_backend_reset_or_close_before_answering_is_502(start_backend, start_lb, path, words):
    lb = start_lb([start_backend().url], **NO_RETRY)
    resp = raw_request(lb.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    _assert_json_error(resp, 502, words)
    assert lb.stats()["backends"][0]["failures"]["reset"] == 1


def test_no_first_byte_in_time_is_504_and_frees_the_backend(start_backend, start_lb):
    backend = start_backend()
    lb = start_lb([backend.url], timeouts={"first_byte": 1.0}, **NO_RETRY)
    with connect(lb.port) as sock:
        sock.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: backend.stats()["requests_in_flight"] == 1, what="request at the backend")
        resp = RawReader(sock).response()
    _assert_json_error(resp, 504, "no response within")
    wait_until(lambda: backend.stats()["requests_in_flight"] == 0, what="backend request freed")
    assert lb.stats()["backends"][0]["failures"]["first_byte_timeout"] == 1


def test_connect_timeout_is_504(start_lb):
    # A listener whose accept queue is full and never drained: the kernel
    # drops further SYNs, so connecting hangs, all on loopback.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    port = blackhole.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        lb = start_lb([f"http://127.0.0.1:{port}"], timeouts={"connect": 0.5})
        resp = raw_request(lb.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        _assert_json_error(resp, 504, "did not accept a connection")
    finally:
        for s in fillers:
            s.close()
        blackhole.close()


@pytest.mark.parametrize("chunked", [1, 0])
def test_backend_dying_mid_body_gives_a_visibly_broken_response(lb, chunked):
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=5)
    conn.request("GET", f"/die-mid-body?after=5000&chunked={chunked}")
    resp = conn.getresponse()
    assert resp.status == 200
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    conn.close()
    line = lb.wait_for_line(r"die-mid-body.*note=").string
    assert "in the middle of the response" in line


def test_backend_silent_mid_body_is_cut_after_idle_timeout(start_backend, start_lb):
    lb = start_lb([start_backend().url], timeouts={"idle": 0.5})
    with connect(lb.port, timeout=10) as sock:
        sock.sendall(b"GET /stream?chunks=2&size=10&delay=3 HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = RawReader(sock).response()
    assert resp.status == 200 and not resp.complete
    assert resp.body.startswith(b"chunk-0|")


# --- the client leaving

def test_client_disconnect_frees_the_backend_connection_at_once(lb, backend):
    backend.reset_stats()
    sock = connect(lb.port)
    sock.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until(lambda: backend.stats()["requests_in_flight"] == 1, what="request at the backend")
    assert lb.stats()["backends"][0]["in_flight"] == 1
    sock.close()
    wait_until(lambda: backend.stats()["requests_in_flight"] == 0, timeout=2,
               what="backend connection closed after client left")
    assert backend.stats()["connections_open"] == 0
    assert lb.stats()["backends"][0]["in_flight"] == 0
    assert "status=499" in lb.wait_for_line(r"path=\"/hang\"").string


def test_client_disconnect_mid_upload_frees_the_backend(start_backend, start_lb):
    # A body over retry.replay_max_bytes is streamed: it is at the backend
    # while it comes, and a client that leaves frees the backend at once.
    backend = start_backend()
    lb = start_lb([backend.url], retry={"replay_max_bytes": 1000})
    sock = connect(lb.port)
    sock.sendall(b"POST /headers HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
                 + b"a" * 10000)
    wait_until(lambda: backend.stats()["requests_in_flight"] == 1, what="request at the backend")
    sock.close()
    wait_until(lambda: backend.stats()["connections_open"] == 0, timeout=2,
               what="backend connection closed after client left")


def test_balancer_survives_garbage_connections(lb):
    # TLS bytes, a head without Host, bare CRLFs: then ordinary requests still work.
    for payload in (b"\x16\x03\x01\x00\xa5", b"GET / HTTP/1.1\r\n\r\n", b"\r\n\r\n"):
        with connect(lb.port) as sock:
            sock.sendall(payload)
            time.sleep(0.05)
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=5)
    conn.request("GET", "/")
    assert conn.getresponse().read() == b"ok\n"
    assert "Traceback" not in lb.output()


def test_client_stalling_mid_upload_gets_408_and_frees_the_backend(start_backend, start_lb):
    backend = start_backend()
    lb = start_lb([backend.url], timeouts={"idle": 1.0}, retry={"replay_max_bytes": 0})
    with connect(lb.port) as sock:
        sock.sendall(b"POST /headers HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        wait_until(lambda: backend.stats()["requests_in_flight"] == 1, what="request at the backend")
        resp = RawReader(sock).response()
    _assert_json_error(resp, 408, "no request body")
    wait_until(lambda: backend.stats()["requests_in_flight"] == 0, what="backend request freed")


def test_client_that_stops_reading_is_cut_after_idle_and_frees_the_backend(start_backend, start_lb):
    backend = start_backend()
    lb = start_lb([backend.url], timeouts={"idle": 0.5})
    with connect(lb.port) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b"GET /bytes?n=268435456 HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: backend.stats()["requests_in_flight"] == 1, what="request at the backend")
        wait_until(lambda: backend.stats()["requests_in_flight"] == 0, timeout=10,
                   what="backend request freed while the client reads nothing")
        # The connection itself is dropped too (after the linger), so a peer
        # that never reads cannot hold a descriptor and a slot of the cap.
        wait_until(lambda: lb.stats()["connections"]["open"] == 1, timeout=10,
                   what="the non-reading client's connection closed")
    line = lb.wait_for_line(r"path=\"/bytes").string
    assert "client read nothing" in line
    assert lb.stats()["backends"][0]["errors"] == 0  # not the backend's fault


def test_health_is_503_once_every_backend_is_ejected(start_lb):
    lb = start_lb([_dead_url()])
    assert raw_request(lb.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").status == 200
    # Two requests of two attempts each: three failures in a row eject it,
    # even though it is the whole fleet (a fleet of one may eject one).
    for _ in range(2):
        raw_request(lb.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    resp = raw_request(lb.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.status == 503 and resp.json()["status"] == "unavailable"
    assert lb.stats()["backends"][0]["state"] == "ejected"
    # Nothing is tried while it is out: an immediate 503 that says why.
    resp = raw_request(lb.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    _assert_json_error(resp, 503, "no backend available: b0 ejected")
    assert resp.header("retry-after") == "1"
    assert lb.stats()["backends"][0]["failures"]["connect"] == 3


def test_a_dead_backend_is_retried_around_then_ejected(start_backend, start_lb):
    live = start_backend()
    lb = start_lb([_dead_url(), live.url])
    statuses = [raw_request(lb.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").status
                for _ in range(30)]
    # Every call that landed on the dead one was retried on the live one.
    assert statuses == [200] * 30
    dead, alive = lb.stats()["backends"]
    assert dead["state"] == "ejected" and alive["state"] == "up"
    assert dead["failures"]["connect"] == 3   # then ejected: no more attempts there
    assert raw_request(lb.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").status == 200


@pytest.mark.parametrize("framing", [
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Content-Length: 5\r\nContent-Length: 6\r\n",
])
def test_ambiguous_or_unsupported_framing_is_400(lb, framing):
    resp = raw_request(lb.port, b"POST /headers HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n")
    _assert_json_error(resp, 400, "malformed")


def test_http10_client_sees_a_reset_when_the_backend_dies_mid_body(lb):
    # An HTTP/1.0 client reads to the end of the connection: a FIN would make
    # the cut-short body look complete, so it must get a reset.
    with connect(lb.port) as sock:
        sock.sendall(b"GET /die-mid-body?after=5000&chunked=1 HTTP/1.0\r\n\r\n")
        received = b""
        with pytest.raises(ConnectionResetError):
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                received += data
    assert received.startswith(b"HTTP/1.1 200")


def test_connection_header_cannot_strip_content_length(lb):
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=5)
    conn.request("POST", "/headers", body=b"hello",
                 headers={"Connection": "keep-alive, Content-Length"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert json.loads(resp.read())["body_bytes"] == 5
    conn.close()


def test_post_lost_after_the_backend_worked_on_it_is_not_sent_twice(start_lb):
    # The backend takes a POST on a pooled connection, "works" on it for
    # longer than the keep-alive race window, then crashes: that is a 502,
    # never a silent second run of the same job.
    seen = []

    def handle(conn, index):
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            seen.append(head.split(b"\r\n", 1)[0])
            if head.startswith(b"POST"):
                time.sleep(0.6)
                return  # crash: close without answering
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    backend = ScriptedBackend(handle)
    try:
        lb = start_lb([f"http://127.0.0.1:{backend.port}"], **NO_RETRY)
        assert raw_request(lb.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").status == 200
        resp = raw_request(lb.port, b"POST /v1/tts HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        _assert_json_error(resp, 502, "closed the connection before answering")
        assert seen.count(b"POST /v1/tts HTTP/1.1") == 1
    finally:
        backend.close()


def test_bytes_after_a_response_never_reach_the_next_request(start_lb):
    # A backend that writes garbage after a complete response: the pooled
    # connection must not be reused, or the next caller would get it.
    def handle(conn, index):
        if read_head(conn) is None:
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                     b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!")
        conn.recv(65536)

    backend = ScriptedBackend(handle)
    try:
        lb = start_lb([f"http://127.0.0.1:{backend.port}"])
        for _ in range(3):
            resp = raw_request(lb.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (resp.status, resp.body) == (200, b"ok")
    finally:
        backend.close()



def test_a_restarted_backend_comes_back_after_its_ejection(start_lb):
    from conftest import Backend
    first, other = Backend(), Backend()
    restarted = None
    try:
        lb = start_lb([first.url, other.url], balancer={"slow_start": 0},
                      **{"health.passive": {"base_ejection": 1.0}})
        first.stop()
        for _ in range(30):
            assert raw_request(lb.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").status == 200
            if lb.stats()["backends"][0]["state"] == "ejected":
                break
        assert lb.stats()["backends"][0]["state"] == "ejected"
        restarted = Backend(first.port)
        # After the ejection (at most 1 s) it is half-open: one trial request
        # goes there, succeeds, and the backend is up again.
        wait_until(lambda: raw_request(lb.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").status == 200
                   and lb.stats()["backends"][0]["state"] == "up", timeout=15, interval=0.2,
                   what="restarted backend readmitted")
        assert restarted.stats()["requests_total"] >= 1
        assert get_json_health(lb.port) == 2
        lb.wait_for_line(r"backend b0 readmitted")
    finally:
        for backend in (first, other, restarted):
            if backend is not None:
                backend.stop()


def get_json_health(port: int) -> int:
    return raw_request(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").json()["backends_usable"]
