"""Quick loopback tests of the controllable origin server in backends/echo.py."""
import http.client
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from backends.echo import BackendThread, expected_bytes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def backend():
    with BackendThread() as b:
        yield b


def connect(port, timeout=5.0):
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def fetch(c, path, method="GET", body=None, headers=None):
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    return r, r.read()


def stats(port):
    c = connect(port)
    try:
        return json.loads(fetch(c, "/_stats")[1])
    finally:
        c.close()


def wait_until(pred, timeout=2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def recv_all(s, limit=1 << 20):
    out = b""
    while len(out) < limit:  # bounded by limit and by the socket timeout
        data = s.recv(65536)
        if not data:
            break
        out += data
    return out


def test_keepalive_endpoints_and_stats(backend):
    c = connect(backend.port)
    r, body = fetch(c, "/")
    assert (r.status, body, r.getheader("content-type")) == (200, b"ok\n", "text/plain")
    assert r.getheader("x-backend-port") == str(backend.port)
    r, body = fetch(c, "/status/503", "POST", body=b"x" * 1000)
    assert (r.status, json.loads(body)) == (503, {"status": 503})
    r, body = fetch(c, "/status/204")
    assert (r.status, body) == (204, b"")
    r, body = fetch(c, "/headers?q=1", "PUT", body=b"abcde", headers={"X-Foo": "Bar"})
    info = json.loads(body)
    assert info["method"] == "PUT" and info["path"] == "/headers?q=1" and info["body_bytes"] == 5
    assert ["x-foo", "Bar"] in info["headers"] and info["headers"][0][0] == "host"
    assert info["peer"] == "127.0.0.1:%d" % c.sock.getsockname()[1]
    r, body = fetch(c, "/bytes?n=abc")  # bad parameter: 400 but the connection stays usable
    assert r.status == 400 and fetch(c, "/slow?delay=0.05")[1] == b"ok\n"
    assert stats(backend.port) == {"connections_open": 1, "connections_total": 1, "requests_in_flight": 0,
                                   "requests_total": 6, "max_requests_in_flight": 1}
    c.close()
    assert wait_until(lambda: stats(backend.port)["connections_open"] == 0)
    c = connect(backend.port)
    assert json.loads(fetch(c, "/_stats/reset", "POST")[1])["requests_total"] == 0
    c.close()


def test_bytes_body_and_head(backend):
    c = connect(backend.port)
    r, body = fetch(c, "/bytes?n=1000003&chunk=7000")
    assert r.getheader("content-length") == "1000003" and body == expected_bytes(1000003)
    r, body = fetch(c, "/bytes?n=10", "HEAD")
    assert (r.status, r.getheader("content-length"), body) == (200, "10", b"")
    c.close()


def test_stream_chunks_arrive_one_by_one(backend):
    c = connect(backend.port)
    t0 = time.monotonic()
    c.request("GET", "/stream?chunks=3&size=20&delay=0.15")
    r = c.getresponse()
    assert r.getheader("transfer-encoding") == "chunked" and r.getheader("content-length") is None
    assert r.getheader("content-type") == "audio/wav"
    assert r.read(20) == b"chunk-0|............" and time.monotonic() - t0 < 0.12
    assert r.read() == b"chunk-1|............chunk-2|............"
    assert time.monotonic() - t0 >= 0.3
    c.close()


def test_echo_full_duplex_large_body(backend):
    size = 8 << 20  # far more than socket buffers: only works if both directions stream
    s = socket.create_connection(("127.0.0.1", backend.port), timeout=5)
    s.sendall(b"POST /echo?cl=1 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
    sender = threading.Thread(target=s.sendall, args=(expected_bytes(size),))
    sender.start()
    got = b""
    while b"\r\n\r\n" not in got or len(got.partition(b"\r\n\r\n")[2]) < size:  # bounded by timeout
        got += s.recv(1 << 20) or pytest.fail("connection closed early")
    sender.join(5)
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"content-length: %d" % size in head and body == expected_bytes(size)
    s.close()
    c = connect(backend.port)  # chunked request body, chunked response
    r, body = fetch(c, "/echo", "POST", body=iter([b"hello ", b"world"]))
    assert (r.getheader("transfer-encoding"), body) == ("chunked", b"hello world")
    c.close()


def test_expect_continue_and_pipelining(backend):
    s = socket.create_connection(("127.0.0.1", backend.port), timeout=5)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    first = s.recv(65536)  # "100 Continue" and, straight after it, the 200 head
    assert first.startswith(b"HTTP/1.1 100 ")
    s.sendall(b"hello" + b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /status/404 HTTP/1.1\r\nHost: x\r\n"
              b"Connection: close\r\n\r\n")
    out = first + recv_all(s)
    assert out.count(b"HTTP/1.1 200 OK") == 2 and b"5\r\nhello\r\n0\r\n\r\n" in out
    assert out.endswith(b'{"status":404}')
    s.close()


def test_malformed_request_gets_400_and_clean_close(backend):
    s = socket.create_connection(("127.0.0.1", backend.port), timeout=5)
    s.sendall(b"garbage\r\n\r\n")
    out = recv_all(s)  # ends with a FIN: a reset would raise here
    assert out.startswith(b"HTTP/1.1 400 ") and b"x-backend-port: %d" % backend.port in out
    s.close()


def test_hang_and_slow_end_when_client_leaves(backend):
    for path in ("/hang", "/slow?delay=30", "/stream?chunks=2&delay=30"):
        c = connect(backend.port)
        c.putrequest("GET", path)
        c.endheaders()
        assert wait_until(lambda: stats(backend.port)["requests_in_flight"] == 1)
        c.close()
        t0 = time.monotonic()
        assert wait_until(lambda: stats(backend.port)["requests_in_flight"] == 0, 1.0)
        assert time.monotonic() - t0 < 0.5 and stats(backend.port)["connections_open"] == 0


def test_reset_close_and_die_mid_body(backend):
    c = connect(backend.port)
    with pytest.raises(ConnectionResetError):
        fetch(c, "/reset")
    c = connect(backend.port)
    with pytest.raises(http.client.RemoteDisconnected):
        fetch(c, "/close")
    for chunked in (0, 1):
        c = connect(backend.port)
        c.request("GET", f"/die-mid-body?after=1000&chunked={chunked}")
        r = c.getresponse()
        assert r.status == 200 and r.getheader("content-length") == (None if chunked else "10000")
        assert r.read(1000) == expected_bytes(1000)
        with pytest.raises((ConnectionResetError, http.client.IncompleteRead)):
            r.read()
        c.close()
    assert wait_until(lambda: stats(backend.port)["connections_open"] == 0)


def test_backpressure_keeps_write_buffer_small(backend):
    s = socket.create_connection(("127.0.0.1", backend.port), timeout=5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.sendall(b"GET /bytes?n=1000000000&chunk=65536 HTTP/1.1\r\nHost: x\r\n\r\n")
    s.recv(4096)
    time.sleep(0.3)  # not reading: without drain() the server would queue ~1 GB in memory
    (conn,) = backend.backend._conns
    assert conn.writer.transport.get_write_buffer_size() <= 256 * 1024
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # RST mid-body
    assert wait_until(lambda: stats(backend.port)["connections_open"] == 0)


def test_cli_port_file_abuse_and_sigterm(tmp_path):
    port_file = tmp_path / "port"
    p = subprocess.Popen([sys.executable, "-m", "backends.echo", "--port", "0", "--port-file", str(port_file)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline().strip()
        port = int(port_file.read_text())
        assert line == f"listening on 127.0.0.1:{port}"
        # Clients vanishing at awkward moments must not put anything on stderr.
        for req in (b"GET /stream?chunks=50&size=100000 HTTP/1.1\r\n\r\n",
                    b"GET /bytes?n=100000000 HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789",
                    b"POST /headers HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                    b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /reset HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"GET /die-mid-body?after=10 HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x00\xa5"):
            for rst in (False, True):
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(req)
                time.sleep(0.02)
                if rst:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
        assert wait_until(lambda: stats(port)["connections_open"] == 0)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=3) == 0
        assert p.stderr.read() == ""
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=5)


# --- failure modes: /_mode, /health, --status/--health ---------------------------------------

def mode(port, query=""):
    c = connect(port)
    try:
        r, body = fetch(c, "/_mode" + (f"?{query}" if query else ""))
        return r.status, json.loads(body)
    finally:
        c.close()


def start_cli(*args):
    """`python -m backends.echo --port 0 ARGS` and its port, read within a bounded time."""
    p = subprocess.Popen([sys.executable, "-m", "backends.echo", "--port", "0", *args], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = []
    reader = threading.Thread(target=lambda: line.append(p.stdout.readline().strip()), daemon=True)
    reader.start()
    reader.join(10)
    if not line or not line[0].startswith("listening on 127.0.0.1:"):
        p.kill()
        p.wait(5)
        pytest.fail(f"echo backend did not start: {line!r} {p.stderr.read()!r}")
    return p, int(line[0].rpartition(":")[2])


def stop_cli(p):
    p.send_signal(signal.SIGTERM)
    try:
        assert p.wait(timeout=3) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=5)


FAILURE_503 = {"detail": "simulated failure", "status": 503}
HEALTHY = {"status": "healthy", "model_loaded": True}
LOADING = {"detail": "Model not loaded", "status": "loading"}


def test_status_mode_fails_ordinary_requests_on_a_reusable_connection(backend):
    assert mode(backend.port, "status=503") == (200, {"status": 503, "health": "ready"})
    c = connect(backend.port)
    c.connect()
    sock = c.sock
    # /hang and /reset would never answer normally; the bodies are drained, never echoed.
    for method, path, body in [("GET", "/", None), ("GET", "/bytes?n=10", None), ("GET", "/hang", None),
                               ("GET", "/reset", None), ("GET", "/status/200", None),
                               ("PUT", "/headers", b"abc"), ("POST", "/echo?cl=1", b"x" * (1 << 20)),
                               ("POST", "/tts", iter([b'{"text": ', b'"hi"}']))]:  # chunked
        r, got = fetch(c, path, method, body=body)
        assert (r.status, json.loads(got)) == (503, FAILURE_503), path
        assert r.getheader("content-type") == "application/json"
        assert r.getheader("content-length") == str(len(got))
        assert r.getheader("x-backend-port") == str(backend.port)
        assert c.sock is sock, path  # kept alive: no reconnect behind our back
    # Control paths and /health are exempt; the failures counted like any other request.
    r, got = fetch(c, "/_stats")
    assert r.status == 200 and json.loads(got)["requests_total"] == 8
    assert json.loads(got)["connections_total"] == 1
    r, got = fetch(c, "/health")
    assert (r.status, json.loads(got)) == (200, HEALTHY)
    r, got = fetch(c, "/_mode")
    assert (r.status, json.loads(got)) == (200, {"status": 503, "health": "ready"})
    # /_stats/reset clears the counters but leaves the backend broken.
    r, got = fetch(c, "/_stats/reset")
    assert r.status == 200 and json.loads(got)["requests_total"] == 0
    assert mode(backend.port) == (200, {"status": 503, "health": "ready"})
    assert fetch(c, "/")[0].status == 503 and stats(backend.port)["requests_total"] == 1
    assert mode(backend.port, "status=0") == (200, {"status": 0, "health": "ready"})
    r, got = fetch(c, "/")
    assert (r.status, got) == (200, b"ok\n")
    assert fetch(c, "/bytes?n=10")[1] == expected_bytes(10)
    assert c.sock is sock and stats(backend.port)["requests_total"] == 3
    c.close()


def test_status_mode_other_codes_and_head(backend):
    assert mode(backend.port, "status=429")[0] == 200
    c = connect(backend.port)
    r, got = fetch(c, "/anything", "POST", body=b"{}")
    assert (r.status, json.loads(got)) == (429, {"detail": "simulated failure", "status": 429})
    r, got = fetch(c, "/anything", "HEAD")
    assert (r.status, got) == (429, b"")
    assert mode(backend.port, "status=200")[0] == 200
    r, got = fetch(c, "/stream?chunks=3&delay=30")  # at once, not after a minute
    assert (r.status, json.loads(got)) == (200, {"detail": "simulated failure", "status": 200})
    c.close()


def test_health_ready_and_loading(backend):
    c = connect(backend.port)
    r, got = fetch(c, "/health")
    assert (r.status, json.loads(got), r.getheader("content-type")) == (200, HEALTHY, "application/json")
    assert mode(backend.port, "health=loading") == (200, {"status": 0, "health": "loading"})
    r, got = fetch(c, "/health")
    assert (r.status, json.loads(got)) == (503, LOADING)
    assert fetch(c, "/")[1] == b"ok\n"  # loading only changes what /health says
    assert mode(backend.port, "status=500&health=ready") == (200, {"status": 500, "health": "ready"})
    r, got = fetch(c, "/health")
    assert (r.status, json.loads(got)) == (200, HEALTHY)
    c.close()


def test_mode_rejects_bad_values_and_changes_nothing(backend):
    assert mode(backend.port, "status=502&health=loading")[0] == 200
    for query, name in [("status=abc", "status"), ("status=199", "status"), ("status=600", "status"),
                        ("status=1", "status"), ("status=", "status"), ("status=5_03", "status"),
                        ("status=+503", "status"), ("status=0503", "status"), ("health=sick", "health"),
                        ("health=", "health"), ("status=200&health=READY", "health"), ("foo=1", "foo"),
                        ("stats=500", "stats")]:
        status, body = mode(backend.port, query)
        assert status == 400 and set(body) == {"error"} and name in body["error"], query
    assert mode(backend.port) == (200, {"status": 502, "health": "loading"})


def test_in_process_initial_mode():
    with BackendThread(status=504, health="loading") as b:
        assert mode(b.port) == (200, {"status": 504, "health": "loading"})
    for bad in ({"status": 42}, {"health": "sick"}):
        with pytest.raises(ValueError):
            BackendThread(**bad)


def test_cli_flags_set_initial_mode():
    p, port = start_cli("--status", "503", "--health", "loading")
    try:
        assert mode(port) == (200, {"status": 503, "health": "loading"})
        c = connect(port)
        r, got = fetch(c, "/bytes?n=10")
        assert (r.status, json.loads(got)) == (503, FAILURE_503)
        r, got = fetch(c, "/health")
        assert (r.status, json.loads(got)) == (503, LOADING)
        c.close()
        assert mode(port, "status=0&health=ready")[0] == 200
        c = connect(port)
        assert fetch(c, "/")[1] == b"ok\n" and fetch(c, "/health")[0].status == 200
        c.close()
    finally:
        stop_cli(p)
    assert p.stderr.read() == ""


@pytest.mark.parametrize("flags", [["--status", "42"], ["--status", "abc"], ["--health", "sick"]])
def test_cli_rejects_bad_mode_flags(flags):
    r = subprocess.run([sys.executable, "-m", "backends.echo", "--port", "0", *flags], cwd=ROOT,
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and flags[0] in r.stderr and r.stdout == ""
