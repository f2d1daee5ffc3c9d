"""WebSocket sessions through the balancer, as a client sees them: messages of
every kind and size, ping/pong, close codes carried both ways, a client that
vanishes, a backend that dies, a refused handshake, a request before the
upgrade on one connection, and the counters (/lb-stats, /metrics, access log).

The peers are real: the websockets library's client, and behind the balancer
backends.ws_echo as the websockets server or as Starlette under uvicorn.
Slots, concurrency, backpressure and timeouts are in test_websocket_limits.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Opcode
from websockets.utils import accept_key

import ws_kit
from conftest import RawReader, connect, wait_until
from ws_kit import (IO_TIMEOUT, MB, access_line, access_lines, client_frame, recv, round_trip,
                    run, server_frame, session, tunnels, tunnels_reach,
                    upgrade_request)

start_ws_echo = ws_kit.start_ws_echo   # fixtures
flavour = ws_kit.flavour


@pytest.fixture
def ws_lb(start_lb, start_ws_echo, flavour):
    """(balancer, echo): one ws_echo backend of each flavour behind the balancer."""
    echo = start_ws_echo(flavour)
    return start_lb([echo.url]), echo


@pytest.fixture
def plain_lb(start_lb, start_ws_echo):
    """(balancer, echo) with the websockets server, for tests about the balancer alone."""
    echo = start_ws_echo()
    return start_lb([echo.url]), echo


# --- messages


def test_text_and_binary_messages_come_back_as_sent(ws_lb):
    balancer, _ = ws_lb
    messages = ["hello", "", "é€" * 5000, b"\x00\xff" * 5000, b"", os.urandom(70_000)]

    async def client():
        async with session(balancer.port) as ws:
            for message in messages:
                await round_trip(ws, message)
    run(client())


def test_a_10_mb_message_is_echoed_whole(ws_lb):
    balancer, _ = ws_lb
    message = os.urandom(10 * 1000 * 1000)

    async def client():
        async with session(balancer.port) as ws:
            await ws.send(message)
            answer = await recv(ws, 30)
            assert len(answer) == len(message) and answer == message
    run(client())


def test_ping_is_answered_with_its_pong(ws_lb):
    balancer, _ = ws_lb

    async def client():
        async with session(balancer.port) as ws:
            for payload in (b"tts", b"", os.urandom(125)):
                pong = await ws.ping(payload)   # resolves only on the pong with this payload
                await asyncio.wait_for(pong, IO_TIMEOUT)
            await round_trip(ws, "still open")
    run(client())


# --- closing


def test_a_client_close_code_reaches_the_backend(ws_lb):
    balancer, echo = ws_lb

    async def client():
        async with session(balancer.port) as ws:
            await round_trip(ws, "x")
            await ws.close(4000, "done")
            assert ws.close_code == 4000   # the backend's answering close frame came back
    run(client())
    wait_until(lambda: echo.stats()["open"] == 0, what="the backend's session ended")
    assert echo.stats()["closed"] == [4000]
    line = access_line(balancer, "client_closed|backend_closed")
    assert int(line["in"]) > 0 and int(line["out"]) > 0, line


def test_a_server_close_code_and_reason_reach_the_client(ws_lb):
    balancer, _ = ws_lb

    async def client():
        async with session(balancer.port, "/close?code=4001&reason=bye") as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await recv(ws)
            assert closed.value.rcvd is not None, closed.value
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "bye")
            assert (ws.close_code, ws.close_reason) == (4001, "bye")
    run(client())
    access_line(balancer, "backend_closed|client_closed", path="/close")


def open_raw_tunnel(port: int, path: str = "/echo") -> tuple[socket.socket, RawReader]:
    """A socket upgraded to a WebSocket session through the balancer (101 read, checked)."""
    sock = connect(port, IO_TIMEOUT)
    head, key = upgrade_request(path)
    sock.sendall(head)
    reader = RawReader(sock)
    answer = reader.response(head_only=True)
    assert answer.status == 101, (answer.status, answer.headers)
    assert answer.header("upgrade").lower() == "websocket", answer.headers
    assert answer.header("sec-websocket-accept") == accept_key(key), answer.headers
    return sock, reader


def echo_over(sock: socket.socket, reader: RawReader, data: bytes) -> None:
    sock.sendall(client_frame(data))
    assert reader._exactly(len(server_frame(data))) == server_frame(data)


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_a_vanished_client_ends_the_backend_session(ws_lb, how):
    """No close frame: the socket is just closed (FIN), or reset (RST)."""
    balancer, echo = ws_lb
    sock, reader = open_raw_tunnel(balancer.port)
    echo_over(sock, reader, b"before")
    assert echo.stats()["open"] == 1
    if how == "rst":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    wait_until(lambda: echo.stats()["open"] == 0, what="the backend saw the client go")
    # The backend got no close frame either (uvicorn says 1005 for a lost connection).
    assert echo.stats()["closed"] == [1006 if echo.flavour == "websockets" else 1005]
    access_line(balancer, "client_reset" if how == "rst" else "client_reset|client_closed")
    tunnels_reach(balancer, "no tunnel open in /lb-stats", open=0)


def test_a_backend_killed_mid_session_closes_the_client_promptly(ws_lb):
    balancer, echo = ws_lb

    async def client():
        async with session(balancer.port) as ws:
            await round_trip(ws, "x")
            echo.proc.kill()
            killed = time.monotonic()
            with pytest.raises(ConnectionClosed):
                await recv(ws, 5.0)    # TimeoutError here: the client was left hanging
            return time.monotonic() - killed
    took = run(client())
    assert took < 5.0, took
    access_line(balancer, "backend_reset|backend_closed")


# --- answers that are not 101


STATS_REQUEST = b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def test_a_refused_handshake_is_an_ordinary_response(ws_lb):
    """Answers other than 101 are passed on as they came, and the client's connection goes
    on carrying requests; only refused upgrade requests count as refused."""
    balancer, echo = ws_lb
    websockets_server = echo.flavour == "websockets"
    with connect(balancer.port, IO_TIMEOUT) as sock:
        reader = RawReader(sock)
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")   # no Upgrade
        answer = reader.response()
        assert answer.status == (426 if websockets_server else 404), (answer.status, answer.body)
        sock.sendall(upgrade_request("/nope")[0])
        answer = reader.response()
        assert answer.status == (404 if websockets_server else 403), (answer.status, answer.body)
        assert answer.body == (b"not found\n" if websockets_server else b"")
        sock.sendall(STATS_REQUEST)
        answer = reader.response()
        assert answer.status == 200 and answer.json() == {"open": 0, "closed": []}

    async def client():
        with pytest.raises(InvalidStatus) as refused:
            async with session(balancer.port, "/nope"):
                pass
        return refused.value.response.status_code
    assert run(client()) == (404 if websockets_server else 403)
    counts = tunnels_reach(balancer, "two refused handshakes counted", refused=2)
    assert (counts["refused"], counts["open"], counts["total"]) == (2, 0, 0), counts


@pytest.mark.parametrize("pipelined", [False, True], ids=["keep-alive", "pipelined"])
def test_a_request_before_the_upgrade_on_one_connection(plain_lb, pipelined):
    balancer, echo = plain_lb
    head, key = upgrade_request()
    with connect(balancer.port, IO_TIMEOUT) as sock:
        reader = RawReader(sock)
        if pipelined:
            sock.sendall(STATS_REQUEST + head)
        else:
            sock.sendall(STATS_REQUEST)
        answer = reader.response()
        assert answer.status == 200 and answer.json() == {"open": 0, "closed": []}
        if not pipelined:
            sock.sendall(head)
        answer = reader.response(head_only=True)
        assert answer.status == 101, (answer.status, answer.headers)
        assert answer.header("sec-websocket-accept") == accept_key(key)
        for data in (b"one", os.urandom(300), b"three" * 20000):
            echo_over(sock, reader, data)
        sock.sendall(client_frame(struct.pack("!H", 1000), Opcode.CLOSE))
        assert reader._exactly(4) == server_frame(struct.pack("!H", 1000), Opcode.CLOSE)
        sock.settimeout(IO_TIMEOUT)
        assert sock.recv(100) == b""   # the backend ended the session, the tunnel carried it
    wait_until(lambda: echo.stats()["closed"] == [1000], what="the backend's session closed")


# --- counters


def test_stats_metrics_and_access_log_count_the_tunnels(plain_lb):
    from test_metrics import Scrape
    balancer, _ = plain_lb
    sizes = [10, 1000, 100_000]

    async def client():
        for size in sizes:
            async with session(balancer.port) as ws:
                await ws.send(b"a" * size)
                assert len(await recv(ws)) == size
        with pytest.raises(InvalidStatus):
            async with session(balancer.port, "/nope"):
                pass
    run(client())
    counts = tunnels_reach(balancer, "three tunnels counted and closed", total=3, open=0)
    assert counts["refused"] == 1, counts
    for key in ("bytes_to_backend", "bytes_to_client"):
        # the messages and the frames around them: a header, a mask, the close frames
        assert sum(sizes) < counts[key] < sum(sizes) + 3 * 64, counts
    lines = wait_until(lambda: (lambda found: found if len(found) == 3 else None)(
        access_lines(balancer)), what="three tunnel lines in the access log")
    assert sum(int(line["in"]) for line in lines) == counts["bytes_to_backend"], lines
    assert sum(int(line["out"]) for line in lines) == counts["bytes_to_client"], lines
    assert all(line["backend"] == "b0" and "total_ms" in line for line in lines), lines

    scrape = Scrape(balancer.port)
    assert scrape.value("tts_lb_backend_tunnels_open", backend="b0") == 0
    assert scrape.value("tts_lb_backend_tunnels_total", backend="b0") == 3
    assert scrape.value("tts_lb_backend_handshakes_refused_total", backend="b0") == 1
    for direction in ("to_backend", "to_client"):
        assert scrape.value("tts_lb_backend_tunnel_bytes_total", backend="b0",
                            direction=direction) == counts["bytes_" + direction]


def test_an_open_tunnel_is_counted_while_it_lasts(plain_lb):
    from test_metrics import Scrape
    balancer, _ = plain_lb

    async def client():
        async with session(balancer.port) as ws:
            await ws.send(b"z" * MB)
            assert len(await recv(ws)) == MB
            counts = await asyncio.to_thread(tunnels, balancer)
            assert counts["open"] == 1, counts
            scrape = await asyncio.to_thread(Scrape, balancer.port)
            assert scrape.value("tts_lb_backend_tunnels_open", backend="b0") == 1
    run(client())
    tunnels_reach(balancer, "the tunnel closed", open=0)
    access_line(balancer, "client_closed|backend_closed")
