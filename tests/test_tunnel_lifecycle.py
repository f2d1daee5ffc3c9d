"""A tunnel's life around the balancer's own: SIGTERM gives open tunnels
listen.drain_timeout and then closes them; SIGHUP leaves a removed
backend's tunnels open; an upgrade request is never sent twice (a connect
failure, before anything went out, is retried) and never goes to Cartesia;
a 5xx answer to one counts against the backend's health like a request's.

Real peers: the websockets library's sync client, backends.ws_echo, and a
scripted raw backend for the one that must fail after reading the request.
"""

from __future__ import annotations

import signal
import socket
import time

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from conftest import ScriptedBackend, Server, get_json, lb_config, raw_request, read_head, \
    wait_until
from test_fallback import closed_port_url, stack  # noqa: F401  (stack: a fixture)

UPGRADE_HEAD = (b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")


@pytest.fixture
def ws_server():
    started: list[Server] = []

    def start() -> Server:
        server = Server("backends.ws_echo", 0)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def session(port: int):
    return ws_connect(f"ws://127.0.0.1:{port}/echo", open_timeout=5, close_timeout=2,
                      max_size=None)


def echo(ws, text: str) -> str:
    ws.send(text)
    return ws.recv(timeout=5)


def test_sigterm_lets_a_tunnel_run_for_drain_timeout_then_closes_it(start_lb, ws_server):
    server = ws_server()
    balancer = start_lb([server.url], listen={"drain_timeout": 2})
    with session(balancer.port) as ws:
        assert echo(ws, "before") == "before"
        balancer.proc.send_signal(signal.SIGTERM)
        balancer.wait_for_line(r"drain")
        # Draining: the open tunnel goes on, new connections are not taken.
        assert echo(ws, "while draining") == "while draining"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", balancer.port), timeout=2).close()
        sent = time.monotonic()
        with pytest.raises(ConnectionClosed):
            for _ in range(100):            # ~10 s at most: then the drain never ended it
                echo(ws, "still here?")
                time.sleep(0.1)
        # Closed by the drain's end, not before (drain_timeout 2 s from the signal).
        assert time.monotonic() - sent < 5
    assert balancer.proc.wait(10) == 0
    balancer.wait_for_line(r'path="/echo" status=101 .*ended=shutdown')
    wait_until(lambda: get_json(server.port, "/stats")["open"] == 0, what="backend session closed")


def test_sighup_keeps_a_removed_backends_tunnel_open(start_lb, ws_server, tmp_path):
    old, new = ws_server(), ws_server()
    balancer = start_lb([old.url])
    with session(balancer.port) as kept:
        assert echo(kept, "one") == "one"
        config = next(tmp_path.glob("lb*.toml"))
        config.write_text(lb_config([new.url]))     # b0 now at another URL: removed, added
        balancer.proc.send_signal(signal.SIGHUP)
        balancer.wait_for_line(r"reloaded: .*removed b0")
        assert echo(kept, "after the reload") == "after the reload"
        assert get_json(old.port, "/stats")["open"] == 1
        with session(balancer.port) as fresh:      # new sessions go to the new backend
            assert echo(fresh, "two") == "two"
            assert get_json(new.port, "/stats")["open"] == 1
        assert echo(kept, "still") == "still"
    wait_until(lambda: get_json(old.port, "/stats")["open"] == 0, what="old session closed")


def test_an_upgrade_is_not_sent_twice(start_lb):
    """Both backends take the request and close without answering: a request
    would be retried on the other; an upgrade may have opened a session, so
    the client gets the failure and only one backend saw it."""
    seen = []

    def read_and_close(conn, index):
        seen.append(read_head(conn))

    backends = [ScriptedBackend(read_and_close), ScriptedBackend(read_and_close)]
    try:
        balancer = start_lb([f"http://127.0.0.1:{b.port}" for b in backends])
        reply = raw_request(balancer.port, UPGRADE_HEAD)
        assert reply.status == 502, reply.body
        balancer.wait_for_line(r'status=502 .*why=".*not retried: an upgrade request is '
                               r'never sent twice')
        time.sleep(0.3)                      # (a resend would have reached the other by now)
        assert len(seen) == 1 and seen[0].startswith(b"GET /echo HTTP/1.1"), seen
        assert b"upgrade: websocket" in seen[0].lower()
    finally:
        for b in backends:
            b.close()


def test_an_upgrade_whose_connect_fails_goes_to_another_backend(start_lb, ws_server):
    server = ws_server()
    balancer = start_lb([closed_port_url(), server.url], balancer={"policy": "round_robin"})
    for i in range(4):
        with session(balancer.port) as ws:
            assert echo(ws, f"hello {i}") == f"hello {i}"
    stats = {b["name"]: b for b in balancer.stats()["backends"]}
    assert stats["b0"]["failures"]["connect"] >= 1
    assert stats["b1"]["tunnels"]["total"] == 4


def test_an_upgrade_on_a_tts_route_never_goes_to_cartesia(stack):  # noqa: F811
    fake = stack.fake()
    balancer = stack.lb([closed_port_url()], fallback={"url": fake.url},
                        routes=(("/v1/audio/speech", "openai"),))
    head = UPGRADE_HEAD.replace(b"GET /echo", b"POST /v1/audio/speech").replace(
        b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n")
    reply = raw_request(balancer.port, head)
    assert reply.status in (502, 503), reply.body
    assert reply.header("x-tts-fallback") is None
    assert fake.requests() == []


def test_a_5xx_handshake_counts_against_the_backends_health(start_lb):
    def unavailable(conn, index):
        read_head(conn)
        conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy")

    scripted = ScriptedBackend(unavailable)
    try:
        balancer = start_lb([f"http://127.0.0.1:{scripted.port}"],
                            **{"health.passive": {"consecutive_5xx": 1}})
        reply = raw_request(balancer.port, UPGRADE_HEAD)
        assert (reply.status, reply.body) == (503, b"busy")     # the backend's own answer
        (b0,) = balancer.stats()["backends"]
        assert b0["tunnels"]["refused"] == 1 and b0["tunnels"]["total"] == 0, b0
        assert b0["ejections"] == 1 and not b0["in_rotation"], b0
    finally:
        scripted.close()
