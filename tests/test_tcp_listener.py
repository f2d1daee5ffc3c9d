"""[[tcp]] listeners with real peers on 127.0.0.1: redis-py and redis-cli
talking to real redis-servers through the balancer, raw bytes through the
TCP echo server (backends/tcp_echo.py), half-close carried both ways, a
server that speaks first, round_robin spreading, /metrics and the access
log, and several listeners beside HTTP in one process.

Queueing, ejection and --check live in test_tcp_listener_limits.py, which
imports the helpers below.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import Process, Server, connect, get_json, tcp_port, wait_until

MB = 1 << 20
READ_CAP = 8 * MB       # no exchange here reads more; a runaway stream fails instead of hanging
IO_TIMEOUT = 10.0       # per socket operation, and per whole exchange


# --- helpers shared with test_tcp_listener_limits.py


def listener(name: str, backends: list, **keys) -> dict:
    """A [[tcp]] table on a free port for `start_lb(tcp=[...])`; `backends` are
    (name, port) pairs or dicts of [[tcp.backend]] keys."""
    entries = [b if isinstance(b, dict) else {"name": b[0], "address": f"127.0.0.1:{b[1]}"}
               for b in backends]
    return {"name": name, "address": "127.0.0.1:0", **keys, "backends": entries}


@pytest.fixture
def start_echo():
    """start_echo(port=0, *args) -> a running backends.tcp_echo Server; all stopped at the end."""
    started: list[Server] = []

    def start(port: int = 0, *args: str) -> Server:
        server = Server("backends.tcp_echo", port, *args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def read_to_eof(sock: socket.socket, cap: int = READ_CAP) -> bytes:
    """Everything the peer sends until it half-closes (bounded in bytes and time)."""
    deadline = time.monotonic() + IO_TIMEOUT
    chunks, total = [], 0
    while total <= cap and time.monotonic() < deadline:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
        total += len(data)
    raise AssertionError(f"no EOF after {total} bytes")


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    deadline = time.monotonic() + IO_TIMEOUT
    while len(buf) < n and time.monotonic() < deadline:
        data = sock.recv(n - len(buf))
        if not data:
            break
        buf += data
    return buf


def exchange(port: int, data: bytes) -> bytes:
    """Connect, send `data` then half-close (from a thread, so a large payload
    cannot deadlock against our own unread echo), read to EOF."""
    with connect(port, IO_TIMEOUT) as sock:
        def send():
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass   # the reader sees the outcome
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            return read_to_eof(sock)
        finally:
            sender.join(IO_TIMEOUT)


def echoed(data: bytes) -> bytes:
    """What tcp_echo answers to `data` followed by a half-close."""
    return data + f"\n{len(data)}\n".encode()


def tcp_stats(balancer, name: str) -> dict:
    (entry,) = [t for t in balancer.stats()["tcp"] if t["name"] == name]
    return entry


def tcp_backend(balancer, listener_name: str, backend: str) -> dict:
    (entry,) = [b for b in tcp_stats(balancer, listener_name)["backends"] if b["name"] == backend]
    return entry


# --- redis-servers, one pair per module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer(Process):
    """A redis-server on a free port, run through conftest's Process (its
    output collected; stopped like every other child): Process starts
    Python, which becomes redis-server."""

    def __init__(self):
        self.port = free_port()
        super().__init__(["-c", "import os, sys; os.execvp(sys.argv[1], sys.argv[1:])",
                          "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no"])
        try:
            self.wait_for_line(r"Ready to accept connections", timeout=10)
        except BaseException:
            self.stop()
            raise


@pytest.fixture(scope="module")
def redis_servers():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    servers: list[RedisServer] = []
    try:
        for _ in range(2):
            servers.append(RedisServer())
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def redis_lb(start_lb, backend, redis_servers):
    """(balancer, port of its "redis" listener) in front of both redis-servers."""
    balancer = start_lb([backend.url], tcp=[listener(
        "redis", [(f"r{i}", s.port) for i, s in enumerate(redis_servers)])])
    return balancer, tcp_port(balancer, "redis")


# --- redis


def test_redis_py_set_get_and_a_large_value(redis_lb):
    import redis
    balancer, port = redis_lb
    client = redis.Redis(host="127.0.0.1", port=port, single_connection_client=True,
                         socket_timeout=IO_TIMEOUT)
    try:
        for i in range(20):
            assert client.set(f"k{i}", f"value-{i}") is True
            assert client.get(f"k{i}") == f"value-{i}".encode()
        big = os.urandom(MB)
        assert client.set("big", big) is True
        assert client.get("big") == big
    finally:
        client.close()


def test_redis_py_pipelines(redis_lb):
    import redis
    balancer, port = redis_lb
    client = redis.Redis(host="127.0.0.1", port=port, single_connection_client=True,
                         socket_timeout=IO_TIMEOUT)
    try:
        for transaction in (False, True):
            pipe = client.pipeline(transaction=transaction)
            pipe.delete("counter")
            for _ in range(200):
                pipe.incr("counter")
            pipe.get("counter")
            results = pipe.execute()
            assert results[1:-1] == list(range(1, 201)) and results[-1] == b"200", transaction
    finally:
        client.close()


def test_least_conn_spreads_open_redis_clients_over_both_servers(redis_lb, redis_servers):
    """Four clients held open at once: least_conn (the default) gives each
    server two; CONFIG GET port says which server a connection reached."""
    import redis
    balancer, port = redis_lb
    clients = [redis.Redis(host="127.0.0.1", port=port, single_connection_client=True,
                           socket_timeout=IO_TIMEOUT) for _ in range(4)]
    try:
        reached = [int(c.config_get("port")["port"]) for c in clients]
        assert sorted(reached) == sorted([s.port for s in redis_servers] * 2), reached
        opened = {b["name"]: b["open"] for b in tcp_stats(balancer, "redis")["backends"]}
        assert opened == {"r0": 2, "r1": 2}, opened
    finally:
        for c in clients:
            c.close()


def test_redis_cli_ping_through_the_balancer(redis_lb):
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed")
    balancer, port = redis_lb
    out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), "ping"],
                         capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert out.returncode == 0 and out.stdout.strip() == "PONG", out


# --- raw bytes through the echo server


@pytest.fixture
def echo_lb(start_lb, backend, start_echo):
    """(balancer, port of its "echo" listener, the echo Server)."""
    echo = start_echo()
    balancer = start_lb([backend.url], tcp=[listener("echo", [("e0", echo.port)])])
    return balancer, tcp_port(balancer, "echo"), echo


@pytest.mark.parametrize("size", [1, 65537, MB])
def test_random_bytes_come_back_intact(echo_lb, size):
    balancer, port, echo = echo_lb
    data = os.urandom(size)
    assert exchange(port, data) == echoed(data)


def test_half_close_travels_both_ways(echo_lb):
    """The connection stays open while nobody closes; the client's
    shutdown(SHUT_WR) reaches the backend (it answers with the count), the
    client can still read, and the backend's write_eof reaches the client."""
    balancer, port, echo = echo_lb
    with connect(port, IO_TIMEOUT) as sock:
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        sock.settimeout(0.3)
        with pytest.raises(socket.timeout):   # nothing more, and no EOF: still open
            sock.recv(1)
        sock.settimeout(IO_TIMEOUT)
        sock.sendall(b"pong")
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b"pong\n8\n"


def test_a_greeting_arrives_before_the_client_says_anything(start_lb, backend, start_echo):
    greeter = start_echo(0, "--greeting", "220 hello from the backend\r\n")
    balancer = start_lb([backend.url], tcp=[listener("smtp", [("g0", greeter.port)])])
    port = tcp_port(balancer, "smtp")
    with connect(port, IO_TIMEOUT) as sock:
        greeting = b"220 hello from the backend\r\n"
        assert recv_exactly(sock, len(greeting)) == greeting
        sock.sendall(b"QUIT\r\n")
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b"QUIT\r\n\n6\n"


def test_round_robin_spreads_connections_evenly(start_lb, backend, start_echo):
    echoes = [start_echo(), start_echo()]
    balancer = start_lb([backend.url], tcp=[listener(
        "rr", [(f"e{i}", e.port) for i, e in enumerate(echoes)], policy="round_robin")])
    port = tcp_port(balancer, "rr")
    for i in range(10):
        data = f"connection {i}".encode()
        assert exchange(port, data) == echoed(data)
    totals = wait_until(lambda: (lambda t: t if sum(t.values()) == 10 else None)(
        {b["name"]: b["total"] for b in tcp_stats(balancer, "rr")["backends"]}),
        what="10 connections counted")
    assert totals == {"e0": 5, "e1": 5}, totals
    for echo in echoes:   # each server saw its five, one at a time
        echo.wait_for_line(r"^accepted 5 open 1$")


def test_metrics_and_access_log(echo_lb):
    from test_metrics import Scrape
    balancer, port, echo = echo_lb
    payloads = [b"x" * 100, b"y" * 1000, b"z" * 10]
    for data in payloads:
        assert exchange(port, data) == echoed(data)
    to_backend = sum(len(d) for d in payloads)
    to_client = sum(len(echoed(d)) for d in payloads)
    labels = {"listener": "echo", "backend": "e0"}

    def counted():
        scrape = Scrape(balancer.port)
        try:
            done = (scrape.value("tts_lb_tcp_connections_total", **labels) == 3
                    and scrape.value("tts_lb_tcp_bytes_total", **labels,
                                     direction="to_client") == to_client)
        except KeyError:
            return None
        return scrape if done else None

    scrape = wait_until(counted, what="three connections in /metrics")
    assert scrape.value("tts_lb_tcp_bytes_total", **labels, direction="to_backend") == to_backend
    assert scrape.value("tts_lb_tcp_connections_open", **labels) == 0
    assert scrape.value("tts_lb_tcp_backend_up", **labels) == 1
    assert scrape.value("tts_lb_tcp_queue_length", listener="echo") == 0
    backend_stats = tcp_backend(balancer, "echo", "e0")
    assert (backend_stats["total"], backend_stats["bytes_to_backend"],
            backend_stats["bytes_to_client"]) == (3, to_backend, to_client), backend_stats
    line = balancer.wait_for_line(r"tcp=echo .*\bbackend=e0 .*\bin=1000 .*ended=client_closed")
    assert f"out={len(echoed(payloads[1]))}" in line.string, line.string
    import urllib.request
    page = urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{balancer.port}/lb-stats", headers={"Accept": "text/html"}),
        timeout=IO_TIMEOUT).read().decode()
    assert "<h2>TCP echo on 127.0.0.1:" in page and f"<td>{to_backend}</td>" in page, page


def test_several_listeners_and_http_at_once(start_lb, backend, start_echo):
    """Two [[tcp]] listeners and the HTTP listener of one process, used from
    three threads at the same time (5 rounds each)."""
    import http.client
    plain, greeter = start_echo(), start_echo(0, "--greeting", "hi\n")
    balancer = start_lb([backend.url], tcp=[listener("plain", [("p0", plain.port)]),
                                            listener("greet", [("g0", greeter.port)])])
    plain_port, greet_port = tcp_port(balancer, "plain"), tcp_port(balancer, "greet")
    assert len({balancer.port, plain_port, greet_port}) == 3

    def plain_rounds():
        for i in range(5):
            data = os.urandom(10_000 + i)
            assert exchange(plain_port, data) == echoed(data)

    def greet_rounds():
        for i in range(5):
            data = f"round {i}".encode()
            assert exchange(greet_port, data) == b"hi\n" + echoed(data)

    def http_rounds():
        conn = http.client.HTTPConnection("127.0.0.1", balancer.port, timeout=IO_TIMEOUT)
        try:
            for i in range(5):
                conn.request("GET", f"/bytes?n={1000 + i}")
                resp = conn.getresponse()
                assert resp.status == 200 and len(resp.read()) == 1000 + i
        finally:
            conn.close()

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(f) for f in (plain_rounds, greet_rounds, http_rounds)]
        for future in futures:
            future.result(timeout=60)
    stats = get_json(balancer.port, "/lb-stats")
    assert {t["name"]: t["accepted"] for t in stats["tcp"]} == {"plain": 5, "greet": 5}
