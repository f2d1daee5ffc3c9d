"""Proxying with real clients: keep-alive, pipelining, headers, endpoints."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import subprocess
import threading

import pytest

from conftest import RawReader, connect, env_without_proxies, get_json, raw_request


def test_http_client_keep_alive_reuses_one_backend_connection(lb, backend):
    backend.reset_stats()
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=5)
    for i in range(20):
        conn.request("GET", f"/item/{i}")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.read() == b"ok\n"
    conn.close()
    # 20 requests on one client connection and also...
    for _ in range(5):
        fresh = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=5)
        fresh.request("POST", "/headers", body=b"x" * 100)
        assert fresh.getresponse().read()
        fresh.close()
    stats = backend.stats()
    assert stats["requests_total"] == 25
    # ...25 requests over 6 client connections reached the backend over one pooled connection.
    assert stats["connections_total"] == 1
    pool = lb.stats()["backends"][0]["pool"]
    assert pool["opened"] == 1 and pool["reused"] == 24


def test_pipelined_requests_are_answered_in_order(lb):
    requests = (b"GET /slow?delay=0.3 HTTP/1.1\r\nHost: x\r\nX-Request-ID: first\r\n\r\n"
                b"POST /headers HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                b"X-Request-ID: second\r\n\r\nabc"
                b"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-ID: third\r\n\r\n"
                b"GET / HTTP/1.1\r\nHost: x\r\nX-Request-ID: fourth\r\n\r\n")
    with connect(lb.port) as sock:
        sock.sendall(requests)
        reader = RawReader(sock)
        responses = [reader.response() for _ in range(4)]
    assert [r.header("x-request-id") for r in responses] == ["first", "second", "third", "fourth"]
    assert [r.status for r in responses] == [200, 200, 200, 200]
    assert responses[0].body == b"ok\n"
    assert responses[1].json()["body_bytes"] == 3
    assert responses[2].json()["status"] == "ok"
    assert responses[3].body == b"ok\n"


def test_hop_by_hop_headers_stripped_and_forwarding_headers_set(lb):
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=5)
    conn.request("GET", "/headers", headers={
        "Host": "tts.example",
        "Connection": "keep-alive, X-Secret",
        "X-Secret": "hop",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Trailer": "X-Checksum",
        "Upgrade": "websocket",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "Proxy-Connection": "keep-alive",
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Proto": "https-spoofed",
        "X-Request-ID": "call-42",
        "X-Keep-Me": "yes",
    })
    resp = conn.getresponse()
    seen = json.loads(resp.read())
    conn.close()
    names = [name for name, _ in seen["headers"]]
    for hop in ("connection", "x-secret", "keep-alive", "trailer", "upgrade",
                "proxy-authorization", "proxy-connection", "transfer-encoding"):
        assert hop not in names, f"{hop} was forwarded"
    got = dict(seen["headers"])
    # TE is hop-by-hop, but the balancer carries trailers through, so it
    # says so itself (and only that: no other transfer coding is offered).
    assert names.count("te") == 1 and got["te"] == "trailers"
    assert got["x-keep-me"] == "yes"
    assert got["host"] == "tts.example"
    assert got["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert got["x-forwarded-proto"] == "http"
    assert got["x-forwarded-host"] == "tts.example"
    assert got["x-request-id"] == "call-42"
    assert names.count("x-forwarded-for") == 1
    assert resp.getheader("X-Request-ID") == "call-42"


def test_request_id_generated_when_absent_and_same_on_both_sides(lb):
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=5)
    conn.request("GET", "/headers")
    resp = conn.getresponse()
    seen = dict(json.loads(resp.read())["headers"])
    conn.close()
    rid = resp.getheader("X-Request-ID")
    assert rid and len(rid) == 32
    assert seen["x-request-id"] == rid
    assert f"rid={rid} " in lb.wait_for_line(rf"rid={rid} ").string


def test_access_log_line_has_the_fields(lb):
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=5)
    conn.request("POST", "/headers?x=1", body=b"12345", headers={"X-Request-ID": "logme"})
    body = conn.getresponse().read()
    conn.close()
    line = lb.wait_for_line(r"rid=logme ").string
    assert 'method=POST path="/headers?x=1" status=200 backend=b0 in=5 ' in line
    assert f"out={len(body)} " in line
    assert "ttfb_ms=" in line and "total_ms=" in line


def test_builtin_endpoints(lb, backend):
    assert get_json(lb.port, "/health") == {
        "status": "ok", "backends_usable": 1, "backends_total": 1, "cluster": "off",
        "fallback": {"enabled": False, "usable": False, "reason": "disabled"}}
    stats = get_json(lb.port, "/lb-stats")
    (entry,) = stats["backends"]
    assert entry["url"] == backend.url and entry["state"] == "up"
    for key in ("in_flight", "requests", "errors", "last_error", "responses"):
        assert key in entry
    assert stats["fd_limit"]["granted"] > 0 and stats["connections"]["max"] > 0

    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=5)
    conn.request("GET", "/lb-stats", headers={"Accept": "text/html"})
    resp = conn.getresponse()
    page = resp.read().decode()
    assert resp.getheader("Content-Type").startswith("text/html")
    assert "<table" in page and backend.url in page and "UP" in page

    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    text = resp.read().decode()
    assert resp.getheader("Content-Type").startswith("text/plain")
    assert "# TYPE tts_lb_backend_in_flight gauge" in text
    assert 'tts_lb_backend_in_flight{backend="b0"} 0' in text

    conn.request("POST", "/health", body=b"{}")
    resp = conn.getresponse()
    assert resp.status == 405 and "error" in json.loads(resp.read())
    conn.close()


def test_head_request_passes_through(lb):
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=5)
    conn.request("HEAD", "/bytes?n=1000")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Length") == "1000"
    assert resp.read() == b""
    conn.request("GET", "/")  # the connection is still in step
    assert conn.getresponse().read() == b"ok\n"
    conn.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_streams_and_uploads_with_expect_continue(lb, tmp_path):
    run = lambda *args: subprocess.run(["curl", "-sS", "--max-time", "20", *args],
                                       capture_output=True, env=env_without_proxies(), timeout=30)
    out = run("-N", f"http://127.0.0.1:{lb.port}/stream?chunks=4&size=1000&delay=0.05")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout) == 4000 and out.stdout.startswith(b"chunk-0|")

    # curl sends "Expect: 100-continue" for a body this large and waits for it.
    body = tmp_path / "body.bin"
    body.write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    out = run("-H", "Content-Type: application/octet-stream", "--data-binary", f"@{body}",
              "-w", "\n%{http_code} %{time_starttransfer}", f"http://127.0.0.1:{lb.port}/echo?cl=1")
    assert out.returncode == 0, out.stderr
    payload, _, trailer = out.stdout.rpartition(b"\n")
    assert payload == body.read_bytes()
    code, ttfb = trailer.split()
    assert code == b"200"
    assert float(ttfb) < 0.9, "curl waited for its 1 s Expect timeout: no 100 Continue was sent"


def test_http10_request_without_host_gets_one_for_the_backend(lb, backend):
    with connect(lb.port) as sock:
        sock.sendall(b"GET /headers HTTP/1.0\r\n\r\n")
        resp = RawReader(sock).response()
    assert resp.status == 200
    seen = dict(resp.json()["headers"])
    assert seen["host"] == f"127.0.0.1:{backend.port}"


def test_request_offering_an_upgrade_keeps_the_connection_alive(lb):
    # curl --http2 on http:// offers h2c; the answer is a plain 200 and the
    # connection stays usable.
    with connect(lb.port) as sock:
        reader = RawReader(sock)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                     b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
        first = reader.response()
        assert first.status == 200 and first.header("connection") is None
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reader.response().body == b"ok\n"


def test_pipelined_flood_is_read_no_faster_than_it_is_answered(lb):
    # 10 MB of pipelined requests: the balancer must stop reading while it
    # answers, not pile them all up in memory.
    count, pad = 10_000, b"p" * 1000
    request = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + pad + b"\r\n\r\n"
    rss_before = lb.rss_kib("VmRSS")
    with connect(lb.port, timeout=30) as sock:
        sender = threading.Thread(target=lambda: sock.sendall(request * count))
        sender.start()
        reader = RawReader(sock)
        for _ in range(count):
            assert reader.response().status == 200
        sender.join(30)
    growth_mib = (lb.rss_kib("VmHWM") - rss_before) / 1024
    assert growth_mib < 5, f"balancer memory grew {growth_mib:.1f} MiB for 10 MB of pipelined requests"


def test_metrics_are_valid_prometheus_text(lb):
    get_json(lb.port, "/health")
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=5)
    conn.request("GET", "/")
    conn.getresponse().read()
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    sample = re.compile(r'([a-z_]+)(\{[a-z_]+="[^"\\\n]*"(,[a-z_]+="[^"\\\n]*")*\})? (-?[0-9.e+]+)')
    declared: dict[str, str] = {}
    helped = set()
    for line in text.rstrip("\n").split("\n"):
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge", "histogram") and name not in declared
            declared[name] = kind
        else:
            match = sample.fullmatch(line)
            assert match, f"not a sample line: {line!r}"
            name = match.group(1)
            family = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in declared or declared.get(family) == "histogram", \
                f"sample before its TYPE: {line!r}"
    assert set(declared) == helped
    for name, kind in declared.items():
        assert name.startswith("tts_lb_")
        assert name.endswith("_total") == (kind == "counter"), name
    assert 'tts_lb_backend_requests_total{backend="b0"} 1' in text
    assert 'tts_lb_requests_finished_total{code="200"}' in text


def test_response_hop_by_hop_headers_are_not_passed_to_the_client(start_lb):
    # A backend that answers with connection-scoped headers of its own.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)

    def serve():
        conn, _ = server.accept()
        with conn:
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Backend-Secret\r\n"
                         b"X-Backend-Secret: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: x\r\n"
                         b"Upgrade: h2c\r\nTrailer: X-Sum\r\nX-Request-ID: backend-made\r\n"
                         b"X-Kept: yes\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
            conn.recv(65536)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        lb = start_lb([f"http://127.0.0.1:{server.getsockname()[1]}"])
        resp = raw_request(lb.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Request-ID: mine\r\n\r\n")
    finally:
        server.close()
    names = [name for name, _ in resp.headers]
    for hop in ("x-backend-secret", "keep-alive", "proxy-connection", "upgrade"):
        assert hop not in names, hop
    # Trailer is kept: the chunked answer goes on chunked to this HTTP/1.1
    # client, with the trailers it announces.
    assert resp.header("trailer") == "X-Sum"
    assert resp.header("connection") is None
    assert resp.header("x-kept") == "yes"
    assert [v for n, v in resp.headers if n == "x-request-id"] == ["mine"]
    assert resp.body == b"ok" and resp.complete


def test_stray_crlf_after_a_body_is_ignored(lb):
    with connect(lb.port) as sock:
        reader = RawReader(sock)
        sock.sendall(b"POST /headers HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc\r\n")
        assert reader.response().status == 200
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        second = reader.response()
        assert second.status == 200 and second.body == b"ok\n"


def test_bytes_after_an_http10_request_do_not_spoil_it(lb):
    with connect(lb.port) as sock:
        sock.sendall(b"POST /headers HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc\r\n"
                     b"GET / HTTP/1.0\r\n\r\n")
        resp = RawReader(sock).response()
    assert resp.status == 200 and resp.json()["body_bytes"] == 3
