"""WebSocket tunnels and the balancer's limits: 200 sessions at once, the slot a
tunnel holds (or not, on a `slot = false` route) and the queue in front of it,
backpressure both ways with the balancer's memory bounded, tunnel_idle,
shutdown, and no retry once an upgrade request went out.

Same peers as test_websocket.py: the websockets client, backends.ws_echo.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

import ws_kit
from conftest import ScriptedBackend, get_json, read_head, wait_until
from ws_kit import (IO_TIMEOUT, MB, access_line, eventually, recv, round_trip, run, session,
                    tunnels, tunnels_reach)

start_ws_echo = ws_kit.start_ws_echo   # fixture

RSS_GROWTH_KIB = 64 * 1024   # what a bounded tunnel may add to the balancer while it stalls


# --- many at once


@pytest.mark.parametrize("slots", ["max_concurrency", "slot_false"])
def test_200_sessions_at_once_each_get_their_own_echo(start_lb, start_ws_echo, slots):
    echo = start_ws_echo()
    if slots == "max_concurrency":
        balancer = start_lb([{"url": echo.url, "max_concurrency": 256}])
    else:
        balancer = start_lb([{"url": echo.url, "max_concurrency": 1}],
                            routes=[{"path": "/echo", "slot": False}])
    count = 200

    async def client():
        async with contextlib.AsyncExitStack() as stack:
            sessions = await asyncio.gather(
                *(stack.enter_async_context(session(balancer.port)) for _ in range(count)))
            await eventually(lambda: echo.stats()["open"] == count, "200 backend sessions open")
            assert (await asyncio.to_thread(tunnels, balancer))["open"] == count
            messages = [os.urandom(1 + i * 97) for i in range(count)]
            await asyncio.gather(*(ws.send(m) for ws, m in zip(sessions, messages)))
            answers = await asyncio.gather(*(recv(ws) for ws in sessions))
            assert answers == messages   # each session got its own message back, nobody else's
    run(client())
    wait_until(lambda: echo.stats()["open"] == 0, what="all backend sessions closed")
    counts = tunnels_reach(balancer, "no tunnel open", open=0)
    assert counts["total"] == count and counts["refused"] == 0, counts


# --- slots and the queue


def one_slot(start_lb, start_ws_echo, **sections):
    echo = start_ws_echo()
    return start_lb([{"url": echo.url, "max_concurrency": 1}], **sections), echo


def test_with_one_slot_the_second_handshake_comes_after_the_first_session_closes(
        start_lb, start_ws_echo):
    balancer, echo = one_slot(start_lb, start_ws_echo, balancer={"queue_timeout": 30})
    events: list[str] = []

    async def client():
        first = await session(balancer.port)
        events.append("first open")
        second_handshake = asyncio.ensure_future(session(balancer.port))
        second_handshake.add_done_callback(lambda _: events.append("second open"))
        await eventually(lambda: balancer.stats()["queue"]["length"] == 1, "the second queued")
        for i in range(20):   # the first goes on working; the second stays queued meanwhile
            await round_trip(first, str(i))
        assert echo.stats()["open"] == 1
        events.append("first closing")
        await first.close()
        second = await asyncio.wait_for(second_handshake, IO_TIMEOUT)
        await round_trip(second, "second")
        await second.close()
    run(client())
    assert events == ["first open", "first closing", "second open"], events
    assert balancer.stats()["queue"]["length"] == 0


def test_a_session_queued_past_queue_timeout_is_refused_with_503(start_lb, start_ws_echo):
    balancer, echo = one_slot(start_lb, start_ws_echo, balancer={"queue_timeout": 1})

    async def client():
        async with session(balancer.port) as first:
            with pytest.raises(InvalidStatus) as refused:
                async with session(balancer.port):
                    pass
            await round_trip(first, "still here")
        return refused.value.response.status_code
    assert run(client()) == 503
    wait_until(lambda: echo.stats()["closed"] == [1000], what="the first session closed")
    assert echo.stats() == {"open": 0, "closed": [1000]}   # the backend only saw the first


def test_on_a_slot_false_route_sessions_take_no_slot(start_lb, start_ws_echo):
    balancer, echo = one_slot(start_lb, start_ws_echo, balancer={"queue_timeout": 2},
                              routes=[{"path": "/echo", "slot": False}])

    async def client():
        first, second = await asyncio.wait_for(
            asyncio.gather(session(balancer.port), session(balancer.port)), IO_TIMEOUT)
        await eventually(lambda: echo.stats()["open"] == 2, "both backend sessions open")
        # The one slot is still free for ordinary requests.
        assert await asyncio.to_thread(get_json, balancer.port, "/stats") == {
            "open": 2, "closed": []}
        for ws in (first, second):
            await round_trip(ws, b"both")
        await asyncio.gather(first.close(), second.close())
    run(client())
    wait_until(lambda: echo.stats()["closed"] == [1000, 1000], what="both sessions closed")


# --- backpressure


def sample_rss(balancer, stop: threading.Event, peaks: list[int]) -> None:
    """Track the balancer's peak RSS (KiB) every 50 ms until `stop` (at most 10 minutes)."""
    for _ in range(12000):
        peaks[0] = max(peaks[0], balancer.rss_kib())
        if stop.wait(0.05):
            return


@contextlib.contextmanager
def peak_rss(balancer):
    """[growth in KiB over the block's start] , filled when the block ends."""
    stop, peaks, growth = threading.Event(), [0], []
    before = balancer.rss_kib()
    sampler = threading.Thread(target=sample_rss, args=(balancer, stop, peaks), daemon=True)
    sampler.start()
    try:
        yield growth
    finally:
        stop.set()
        sampler.join(5)
        growth.append(peaks[0] - before)


def test_a_client_reading_nothing_holds_the_flood_back_then_gets_all_of_it(
        start_lb, start_ws_echo):
    echo = start_ws_echo()
    balancer = start_lb([echo.url])
    count, size = 3200, 64 * 1024    # 200 MiB

    async def client():
        with peak_rss(balancer) as growth:
            ws = await session(balancer.port, f"/flood?n={count}&size={size}", max_queue=4)
            await asyncio.sleep(3.0)   # reading nothing: a balancer that buffers takes it all
        assert growth[0] < RSS_GROWTH_KIB, f"balancer RSS grew {growth[0]} KiB while stalled"
        sent = (await asyncio.to_thread(tunnels, balancer))["bytes_to_client"]
        assert sent < count * size // 2, f"{sent} bytes passed a client that read nothing"
        for i in range(count):
            message = await recv(ws, 30)
            assert len(message) == size and message[:1] == b"\xa5", (i, len(message))
        await ws.close()
    run(client(), timeout=180)
    counts = tunnels_reach(balancer, "the tunnel closed", open=0)
    assert counts["bytes_to_client"] >= count * size, counts


async def send_until_held_back(ws, most: int = 200) -> int:
    """Send 1 MiB messages until one waits 2 s for the peer to read; how many went."""
    message = os.urandom(MB)
    for sent in range(most):
        try:
            await asyncio.wait_for(ws.send(message), 2.0)
        except TimeoutError:
            return sent
    return most


def reset(ws) -> None:
    """Vanish with a RST: a FIN would wait behind the bytes the backend never reads."""
    ws.transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.transport.abort()


def test_a_backend_reading_nothing_holds_the_client_back(start_lb, start_ws_echo):
    """/flood?n=0 sends nothing, and its server stops reading once 16 messages wait."""
    echo = start_ws_echo()
    balancer = start_lb([echo.url])

    async def client():
        with peak_rss(balancer) as growth:
            async with session(balancer.port, "/flood?n=0") as ws:
                sent = await send_until_held_back(ws)
                reset(ws)
        assert sent < 100, f"{sent} MiB went into a backend that read nothing"
        assert growth[0] < RSS_GROWTH_KIB, f"balancer RSS grew {growth[0]} KiB while stalled"
    run(client())


# --- ending tunnels


def test_tunnel_idle_ends_a_silent_tunnel_and_spares_a_talking_one(start_lb, start_ws_echo):
    echo = start_ws_echo()
    balancer = start_lb([echo.url], timeouts={"tunnel_idle": 1})

    async def client():
        async with session(balancer.port) as talking, session(balancer.port) as silent:
            await round_trip(silent, "once")
            for i in range(10):   # 3 s of a message every 0.3 s: never 1 s silent
                await asyncio.sleep(0.3)
                await round_trip(talking, str(i))
            with pytest.raises(ConnectionClosed):   # cut well before this session's 3 s
                await recv(silent, 0.1)
    run(client())
    line = access_line(balancer, "idle_timeout")
    assert 900 <= float(line["total_ms"]) < 3000, line
    wait_until(lambda: echo.stats()["open"] == 0, what="both backend sessions ended")


def test_shutdown_ends_open_tunnels(start_lb, start_ws_echo):
    echo = start_ws_echo()
    balancer = start_lb([echo.url], listen={"drain_timeout": 2})

    async def client():
        async with session(balancer.port) as ws:
            await round_trip(ws, "x")
            balancer.proc.terminate()
            with pytest.raises(ConnectionClosed):
                await recv(ws, 10.0)   # drain_timeout 2 s, then cut
    run(client())
    balancer.proc.wait(10)   # stop_cleanly would send a second SIGTERM to a balancer still stopping
    balancer.stop_cleanly()
    access_line(balancer, "shutdown")
    wait_until(lambda: echo.stats()["open"] == 0, what="the backend saw the tunnel end")


def test_no_retry_once_the_upgrade_request_went_out(start_lb):
    heads: list[bytes] = []

    def read_then_drop(conn, index):   # reads the upgrade request, then closes unanswered
        heads.append(read_head(conn))

    backends = [ScriptedBackend(read_then_drop) for _ in range(2)]
    try:
        balancer = start_lb([f"http://127.0.0.1:{b.port}" for b in backends],
                            retry={"attempts": 2})

        async def client():
            with pytest.raises(InvalidStatus) as failed:
                async with session(balancer.port):
                    pass
            return failed.value.response.status_code
        assert run(client()) == 502
        assert len(heads) == 1 and b"upgrade: websocket" in heads[0].lower(), heads
    finally:
        for backend in backends:
            backend.close()


def test_a_client_reset_while_held_back_ends_the_tunnel(start_lb, start_ws_echo):
    """The balancer has stopped reading the client here, and must still see it go: the
    backend, not reading either, can never end this tunnel."""
    echo = start_ws_echo()
    balancer = start_lb([echo.url])

    async def client():
        async with session(balancer.port, "/flood?n=0") as ws:
            assert await send_until_held_back(ws) < 200
            reset(ws)
    run(client())
    access_line(balancer, "client_reset|client_closed", path="/flood?n=0")
    tunnels_reach(balancer, "the tunnel closed", open=0)
