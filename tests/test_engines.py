"""The HTTP engine a balancer runs is chosen, named, and behaves the same;
trailers, big response heads and Connection: close, through both engines.

Real balancer processes, hand-written backends on loopback sockets.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import (ROOT, Balancer, RawReader, ScriptedBackend, connect, lb_config,
                      raw_request, read_head)


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_the_engine_is_named_in_the_log_the_stats_and_the_metrics(start_backend, start_lb,
                                                                   http_engine):
    lb = start_lb([start_backend().url])
    lb.wait_for_line(rf"listening on .*; http engine {http_engine}$")
    assert lb.stats()["http_engine"] == http_engine
    assert f'tts_lb_info{{version="0.1.0",http_engine="{http_engine}"}} 1' in _metrics(lb.port)


def test_auto_runs_httptools_when_it_is_installed(start_backend, tmp_path):
    path = tmp_path / "lb.toml"
    path.write_text(lb_config([start_backend().url]))     # [listen] http left at auto
    lb = Balancer(path)
    try:
        assert lb.stats()["http_engine"] == "httptools"
    finally:
        lb.stop_cleanly()


def _check(tmp_path, *args: str, http: str | None = None) -> subprocess.CompletedProcess:
    path = tmp_path / "lb.toml"
    extra = f'http = "{http}"\n' if http is not None else ""
    path.write_text(f'[listen]\naddress = "127.0.0.1:0"\n{extra}'
                    '[[backend]]\nname = "a"\nurl = "http://127.0.0.1:9"\n')
    return subprocess.run([sys.executable, "-m", "lb", "--check", "-c", str(path), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)


def test_a_bad_engine_is_one_line_naming_the_key(tmp_path):
    out = _check(tmp_path, http="llhttp")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "lb: config error: listen.http: must be one of auto, httptools, h11, got string 'llhttp'"]
    out = _check(tmp_path, "--http", "nghttp2")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "--http" in out.stderr and "nghttp2" in out.stderr


def test_the_command_line_engine_wins_over_the_file(start_backend, tmp_path):
    path = tmp_path / "lb.toml"
    path.write_text(lb_config([start_backend().url], listen={"http": "httptools"}))
    lb = Balancer(path, http="h11")
    try:
        assert lb.stats()["http_engine"] == "h11"
    finally:
        lb.stop_cleanly()


# --- a backend that answers with whatever bytes a test gives it


@pytest.fixture
def scripted():
    """make(answer, piece): a conftest ScriptedBackend answering each request
    head with `answer`, in `piece`-byte writes; the heads it got in .heads."""
    made: list[ScriptedBackend] = []

    def make(answer: bytes, piece: int = 0) -> ScriptedBackend:
        heads: list[bytes] = []

        def handle(conn: socket.socket, index: int) -> None:
            buf = read_head(conn)
            if buf is None:
                return
            heads.append(buf.split(b"\r\n\r\n", 1)[0])
            step = piece or len(answer)
            for i in range(0, len(answer), step):
                conn.sendall(answer[i:i + step])
                if piece:
                    time.sleep(0.002)
            conn.recv(65536)

        backend = ScriptedBackend(handle)
        backend.heads = heads
        backend.url = f"http://127.0.0.1:{backend.port}"
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


TRAILED = (b"HTTP/1.1 200 OK\r\nContent-Type: audio/wav\r\nTrailer: X-Checksum\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Checksum: 42\r\n\r\n")


def test_trailers_reach_an_http11_caller_and_te_trailers_the_backend(scripted, start_lb):
    backend = scripted(TRAILED)
    lb = start_lb([backend.url])
    with connect(lb.port) as sock:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n")
        raw = b""
        while not raw.endswith(b"\r\n\r\n") or b"0\r\n" not in raw:
            data = sock.recv(65536)
            assert data, raw
            raw += data
    head, body = raw.split(b"\r\n\r\n", 1)
    assert b"\r\ntrailer: X-Checksum" in head.lower().replace(b"x-checksum", b"X-Checksum")
    assert b"transfer-encoding: chunked" in head.lower()
    assert body == b"5\r\nhello\r\n0\r\nx-checksum: 42\r\n\r\n"
    assert b"\r\nte: trailers" in backend.heads[0].lower()


def test_an_http10_caller_gets_the_body_without_trailers(scripted, start_lb):
    lb = start_lb([scripted(TRAILED).url])
    with connect(lb.port) as sock:
        sock.sendall(b"GET /a HTTP/1.0\r\n\r\n")
        raw = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            raw += data
    head, body = raw.split(b"\r\n\r\n", 1)
    assert body == b"hello"     # read until the close: no chunk framing, no trailer
    assert b"trailer" not in head.lower() and b"transfer-encoding" not in head.lower()


def test_a_big_response_head_in_small_pieces_is_fine_under_the_limit(scripted, start_lb):
    # 30 KB of head in 1,460-byte pieces: over the request-side limit (16 KiB),
    # under limits.max_response_header_bytes (64 KiB).
    pad = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 90) for i in range(300))
    backend = scripted(b"HTTP/1.1 200 OK\r\n" + pad + b"Content-Length: 2\r\n\r\nok", piece=1460)
    lb = start_lb([backend.url])
    resp = raw_request(lb.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.status == 200 and resp.body == b"ok"
    assert resp.header("x-pad-299") == "p" * 90


def test_a_response_head_over_the_limit_is_502_naming_it(scripted, start_lb):
    pad = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 90) for i in range(300))
    backend = scripted(b"HTTP/1.1 200 OK\r\n" + pad + b"Content-Length: 2\r\n\r\nok", piece=1460)
    lb = start_lb([backend.url], limits={"max_response_header_bytes": 16384},
                  retry={"attempts": 1})
    resp = raw_request(lb.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.status == 502
    assert "limits.max_response_header_bytes (16384 bytes)" in resp.json()["error"]


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",                 # refused: the answer closes
    b"GET / HTTP/1.0\r\n\r\n",
])
def test_connection_close_appears_once(start_backend, start_lb, request_bytes):
    lb = start_lb([start_backend().url])
    with connect(lb.port) as sock:
        sock.sendall(request_bytes)
        resp = RawReader(sock).response()
    assert [v for n, v in resp.headers if n == "connection"] == ["close"]


def test_a_head_pipelined_behind_an_answer_given_at_once_may_end_in_a_later_read(
        start_backend, start_lb):
    """The balancer's own endpoints answer inside the engine's end-of-request
    callback, while the rest of the read -- the next head's start -- is still
    being parsed; that head's end and its body come in later reads."""
    lb = start_lb([start_backend().url])
    with connect(lb.port) as sock:
        sock.sendall(b"GET /lb-stats HTTP/1.1\r\nHost: t\r\n\r\n"
                     b"POST /lb-stats HTTP/1.1\r\nHost: t\r\n")
        time.sleep(0.2)
        sock.sendall(b"Transfer-Encoding: chunked\r\n\r\n")
        time.sleep(0.2)
        sock.sendall(b"5\r\nhello\r\n0\r\n\r\nGET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        reader = RawReader(sock)
        assert [reader.response().status for _ in range(3)] == [200, 405, 200]


def test_an_upgrade_answered_by_the_balancer_itself_lets_the_next_request_through(
        start_backend, start_lb):
    lb = start_lb([start_backend().url])
    with connect(lb.port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\n"
                     b"Upgrade: websocket\r\n\r\nGET /lb-stats HTTP/1.1\r\nHost: t\r\n\r\n")
        reader = RawReader(sock)
        assert [reader.response().status for _ in range(2)] == [200, 200]
