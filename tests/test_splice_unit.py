"""lb.wire.splice.Splice on real loopback connections, on both event loops.

    client peer <-TCP-> [client transport | Splice | backend transport] <-TCP-> backend peer

The splice's transports are made from accepted sockets (connect_accepted_socket,
as the listener's are), held paused by tcp_session.Held until joined; the
peers are asyncio streams or raw non-blocking sockets on 127.0.0.1.  Every
wait is bounded (WAIT seconds), every sending loop by count and time.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time

import pytest
import uvloop

from lb.proxy.tcp_session import Held
from lb.wire.splice import (BACKEND_CLOSED, BACKEND_RESET, CLIENT_CLOSED, CLIENT_RESET,
                            IDLE_TIMEOUT, SHUTDOWN, Splice)

WAIT = 3.0
LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def run(request):
    """run(coroutine function): run it on a fresh loop of this kind, bounded."""
    def runner(test) -> None:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as r:
            r.run(asyncio.wait_for(test(), 10 * WAIT))
    return runner


def tcp_pair(buffer: int = 0) -> tuple[socket.socket, socket.socket]:
    """Two ends of one loopback TCP connection (non-blocking); `buffer`: the
    kernel buffers' size, set before the connection exists."""
    server = socket.socket()
    client = socket.socket()
    try:
        for sock in (server, client):
            if buffer:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client.connect(server.getsockname())
        accepted, _ = server.accept()
    finally:
        server.close()
    for sock in (client, accepted):
        sock.setblocking(False)
    return client, accepted


async def until(predicate, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything up to the peer's EOF."""
    return await asyncio.wait_for(reader.read(), WAIT)


async def read_n(reader: asyncio.StreamReader, n: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), WAIT)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the other end gets a RST, not a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Tunnel:
    """A Splice between two loopback connections, and both peers."""

    @classmethod
    async def open(cls, *, idle: float = 30.0, high: int = 65536, buffer: int = 0,
                   client_first: bytes = b"", backend_first: bytes = b"") -> "Tunnel":
        self = cls()
        loop = asyncio.get_running_loop()
        self.client_sock, client_lb = tcp_pair(buffer)
        backend_lb, self.backend_sock = tcp_pair(buffer)
        self.lb_socks = (client_lb, backend_lb)
        transports = []
        for sock in self.lb_socks:
            transport, _ = await loop.connect_accepted_socket(Held, sock)
            transport.set_write_buffer_limits(high=high, low=high // 4)
            transports.append(transport)
        self.ends: list[str] = []
        self.client_lost = 0
        self.splice = Splice(loop, *transports, idle=idle, on_end=self.ends.append,
                             on_client_lost=self._lost, client_first=client_first,
                             backend_first=backend_first)
        return self

    def _lost(self) -> None:
        self.client_lost += 1

    async def streams(self, first: str = "client"):
        """The peers as (reader, writer) pairs: client's, backend's (or the
        backend's first)."""
        pairs = (await asyncio.open_connection(sock=self.client_sock),
                 await asyncio.open_connection(sock=self.backend_sock))
        return pairs if first == "client" else pairs[::-1]

    async def over(self) -> None:
        """Both of the splice's connections closed for good."""
        await until(lambda: self.splice.client.lost and self.splice.backend.lost,
                    "both connections lost")

    async def ended(self, why: str) -> None:
        """Over, said once, as `why`; the client's loss told once."""
        await self.over()
        assert self.ends == [why] and self.splice.why == why
        assert self.client_lost == 1


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# --- bytes


def test_bytes_go_both_ways_whole_and_in_order_and_are_counted(run):
    async def test():
        tunnel = await Tunnel.open()
        (c_read, c_write), (b_read, b_write) = await tunnel.streams()
        up, down = payload(1 << 20, 1), payload(700_000, 2)
        c_write.write(up)
        b_write.write(down)     # both ways at once
        assert await read_n(b_read, len(up)) == up
        assert await read_n(c_read, len(down)) == down
        splice = tunnel.splice
        assert (splice.bytes_to_backend, splice.bytes_to_client) == (len(up), len(down))
        assert tunnel.ends == [] and tunnel.client_lost == 0
        for writer in (c_write, b_write):
            writer.close()
        await tunnel.over()
    run(test)


def test_what_each_side_sent_before_the_tunnel_goes_first(run):
    async def test():
        tunnel = await Tunnel.open(client_first=b"\x81\x02hi", backend_first=b"+HELLO\r\n")
        (c_read, c_write), (b_read, b_write) = await tunnel.streams()
        c_write.write(b"-later")
        b_write.write(b"-after")
        assert await read_n(b_read, 10) == b"\x81\x02hi-later"
        assert await read_n(c_read, 14) == b"+HELLO\r\n-after"
        assert (tunnel.splice.bytes_to_backend, tunnel.splice.bytes_to_client) == (10, 14)
        tunnel.splice.close()
        await tunnel.over()
    run(test)


# --- how it ends


CLOSED = {"client": CLIENT_CLOSED, "backend": BACKEND_CLOSED}
RESET = {"client": CLIENT_RESET, "backend": BACKEND_RESET}


@pytest.mark.parametrize("first", ["client", "backend"])
def test_a_half_close_is_passed_on_and_the_other_way_goes_on(run, first):
    async def test():
        tunnel = await Tunnel.open()
        (closer_read, closer), (other_read, other) = await tunnel.streams(first)
        closer.write(b"last words")
        closer.write_eof()
        assert await read_all(other_read) == b"last words"     # then EOF
        for i in range(3):      # the other way still carries bytes
            other.write(b"reply %d" % i)
            assert await read_n(closer_read, 7) == b"reply %d" % i
        assert tunnel.ends == []
        other.write_eof()
        assert await read_all(closer_read) == b""
        await tunnel.ended(CLOSED[first])
    run(test)


@pytest.mark.parametrize("who", ["client", "backend"])
def test_a_reset_ends_it_as_a_reset_and_the_other_peer_sees_the_close(run, who):
    async def test():
        tunnel = await Tunnel.open()
        (_, resetting), (other_read, _) = await tunnel.streams(who)
        resetting.write(b"up")
        assert await read_n(other_read, 2) == b"up"
        reset(resetting)
        assert await read_all(other_read) == b""
        await tunnel.ended(RESET[who])
    run(test)


def test_no_byte_for_idle_seconds_ends_it_and_bytes_keep_it_open(run):
    idle = 0.12

    async def test():
        tunnel = await Tunnel.open(idle=idle)
        (c_read, c_write), (b_read, b_write) = await tunnel.streams()
        for i in range(8):      # twice `idle` of traffic, one way then the other
            writer, reader = (c_write, b_read) if i % 2 else (b_write, c_read)
            writer.write(b"tick")
            assert await read_n(reader, 4) == b"tick"
            await asyncio.sleep(idle / 4)
        assert tunnel.ends == []
        silent = time.monotonic()
        assert await read_all(c_read) == b"" and await read_all(b_read) == b""
        waited = time.monotonic() - silent
        assert idle * 0.9 <= waited <= idle * 1.25 + 0.5, waited
        await tunnel.ended(IDLE_TIMEOUT)
    run(test)


def test_close_ends_it_once_as_shutdown_after_what_is_buffered(run):
    async def test():
        tunnel = await Tunnel.open()
        (c_read, c_write), (b_read, b_write) = await tunnel.streams()
        b_write.write(b"x" * 100_000)
        await until(lambda: tunnel.splice.bytes_to_client == 100_000, "bytes read")
        tunnel.splice.close()
        tunnel.splice.close(IDLE_TIMEOUT)       # a second close says nothing new
        assert await read_all(c_read) == b"x" * 100_000
        assert await read_all(b_read) == b""
        await tunnel.ended(SHUTDOWN)
    run(test)


# --- backpressure


def _buffers(*socks: socket.socket) -> int:
    return sum(s.getsockopt(socket.SOL_SOCKET, opt) for s in socks
               for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF))


async def _flood(sock: socket.socket, cap: int) -> bytes:
    """Send until the connection takes no more for 0.15 s (or `cap` bytes)."""
    sent = bytearray()
    block = payload(65536, 3)
    stalls = 0
    while stalls < 30 and len(sent) < cap:
        try:
            n = sock.send(block)
            sent += block[:n]
            stalls = 0
        except BlockingIOError:
            stalls += 1
            await asyncio.sleep(0.005)
    return bytes(sent)


async def _drain(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < n:
        data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), WAIT)
        assert data, (len(got), n)
        got += data
    return bytes(got)


@pytest.mark.parametrize("toward", ["backend", "client"])
def test_a_peer_that_does_not_read_pauses_the_other_side(run, toward):
    high = 65536
    buffer = 65536

    async def test():
        tunnel = await Tunnel.open(high=high, buffer=buffer)
        splice = tunnel.splice
        if toward == "backend":
            sender, receiver, reading = tunnel.client_sock, tunnel.backend_sock, splice.client
        else:
            sender, receiver, reading = tunnel.backend_sock, tunnel.client_sock, splice.backend
        sent = await _flood(sender, cap=64 << 20)
        assert not reading.transport.is_reading()
        # The kernel's buffers on the way, one buffer's worth in the splice,
        # and one read (up to 256 KiB) taken before the pause.
        bound = high + _buffers(sender, receiver, *tunnel.lb_socks) + (256 << 10)
        assert len(sent) <= bound, (len(sent), bound)
        assert await _drain(receiver, len(sent)) == sent
        await until(reading.transport.is_reading, "reading resumed")
        splice.close()
        await tunnel.over()
        sender.close()
        receiver.close()
    run(test)


def test_a_peer_that_never_reads_is_dropped_idle_seconds_after_close(run):
    idle = 0.4     # (longer than the flood's stall: backpressure is silence too)

    async def test():
        tunnel = await Tunnel.open(idle=idle, buffer=65536)
        await _flood(tunnel.client_sock, cap=64 << 20)
        assert tunnel.splice.backend.transport.get_write_buffer_size() > 0
        closed = time.monotonic()
        tunnel.splice.close()
        await tunnel.ended(SHUTDOWN)    # not waiting for the backend peer to read it all
        assert idle * 0.9 <= time.monotonic() - closed <= idle + 0.5   # given `idle` to drain
        tunnel.client_sock.close()
        tunnel.backend_sock.close()
    run(test)


@pytest.mark.parametrize("who", ["client", "backend"])
def test_a_reset_from_a_held_back_side_ends_it(run, who):
    """A side not read (its peer takes nothing) is not watched by the loop;
    its reset must still end the tunnel, not leave it to the idle timeout."""
    async def test():
        tunnel = await Tunnel.open(high=65536, buffer=65536)
        splice = tunnel.splice
        if who == "client":
            sender, receiver, held = tunnel.client_sock, tunnel.backend_sock, splice.client
        else:
            sender, receiver, held = tunnel.backend_sock, tunnel.client_sock, splice.backend
        await _flood(sender, cap=64 << 20)
        assert held.held and not held.transport.is_reading()
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sender.close()
        await tunnel.ended(CLIENT_RESET if who == "client" else BACKEND_RESET)
        receiver.close()
    run(test)
