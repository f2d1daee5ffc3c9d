"""Helpers of the WebSocket-through-the-balancer tests (test_websocket*.py).

backends.ws_echo servers (the websockets library, or Starlette under uvicorn),
a websockets client session through a balancer, a raw upgrade request for the
tests that need bytes on one socket, and readers of what the balancer reports
about tunnels (/lb-stats, the access log).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re

import pytest
from websockets.asyncio.client import connect as websockets_connect
from websockets.frames import Frame, Opcode

from conftest import Server, get_json, wait_until
from test_logs import logfmt
from test_scheduling import backend_entry

MB = 1 << 20
IO_TIMEOUT = 10.0       # per handshake, message, close
TEST_TIMEOUT = 90.0     # the whole client side of one test
FLAVOURS = ("websockets", "starlette")


class WsEcho(Server):
    """`python -m backends.ws_echo`: the websockets server, or Starlette under uvicorn."""

    def __init__(self, flavour: str = "websockets"):
        super().__init__("backends.ws_echo", 0, *(["--starlette"] if flavour == "starlette" else []))
        self.flavour = flavour

    def stats(self) -> dict:
        """{"open": sessions open now, "closed": [close codes clients sent]}."""
        return get_json(self.port, "/stats")


@pytest.fixture
def start_ws_echo():
    """start_ws_echo(flavour="websockets") -> a running WsEcho; all stopped at the end."""
    started: list[WsEcho] = []

    def start(flavour: str = "websockets") -> WsEcho:
        server = WsEcho(flavour)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(params=FLAVOURS)
def flavour(request) -> str:
    """Both WebSocket servers behind the balancer, for the tests of message semantics."""
    return request.param


def run(coro, timeout: float = TEST_TIMEOUT):
    """Run a test's asyncio client side, bounded as a whole by `timeout`."""
    async def bounded():
        async with asyncio.timeout(timeout):
            return await coro
    return asyncio.run(bounded())


def session(port: int, path: str = "/echo", **options):
    """A websockets client session to the balancer on `port`: no compression (tunnel bytes
    are message bytes), no keepalive pings (a silent tunnel really is silent), no size cap."""
    options = {"compression": None, "max_size": None, "ping_interval": None,
               "open_timeout": IO_TIMEOUT, "close_timeout": IO_TIMEOUT, **options}
    return websockets_connect(f"ws://127.0.0.1:{port}{path}", **options)


async def eventually(predicate, what: str, timeout: float = IO_TIMEOUT):
    """conftest.wait_until, off the event loop: predicates here make blocking HTTP calls."""
    return await asyncio.to_thread(wait_until, predicate, timeout, 0.05, what)


async def recv(connection, timeout: float = IO_TIMEOUT):
    async with asyncio.timeout(timeout):
        return await connection.recv()


async def round_trip(connection, message: str | bytes) -> None:
    """Send `message` on an /echo session and check it comes back as it went."""
    await connection.send(message)
    answer = await recv(connection)
    assert type(answer) is type(message) and answer == message, (message[:40], answer[:40])


def tunnels(balancer, name: str = "b0") -> dict:
    """The "tunnels" counters of backend `name` in /lb-stats."""
    entry = backend_entry(balancer.stats(), name)
    assert "tunnels" in entry, f"/lb-stats backend {name} has no 'tunnels': {entry}"
    return entry["tunnels"]


def tunnels_reach(balancer, what: str, name: str = "b0", **expected: int) -> dict:
    """Wait until backend `name`'s tunnel counters have the `expected` values; all of them."""
    def reached():
        counts = tunnels(balancer, name)
        return counts if all(counts[key] == value for key, value in expected.items()) else None
    return wait_until(reached, what=what)


def access_line(balancer, ended: str, path: str = "/echo", status: int = 101,
                timeout: float = IO_TIMEOUT, start: int = 0) -> dict:
    """The logfmt pairs of the first access-log line (from output line `start`) for `path`
    with `status` whose ended= matches the regex `ended`."""
    match = balancer.wait_for_line(
        rf'\brid=\S+ method=GET path="{re.escape(path)}(\?[^"]*)?" status={status} '
        rf'.*\bended=({ended})\b', timeout, start)
    return logfmt(match.string[match.string.index("rid="):])


def access_lines(balancer, path: str = "/echo") -> list[dict]:
    """Every access-log line of a 101 on `path` so far (each tunnel that has ended)."""
    regex = re.compile(rf'\brid=\S+ method=GET path="{re.escape(path)}" status=101 ')
    return [logfmt(line[line.index("rid="):])
            for line in balancer.output().splitlines() if regex.search(line)]


# --- raw bytes, for one socket carrying requests and then a tunnel


def upgrade_request(path: str = "/echo") -> tuple[bytes, str]:
    """An HTTP/1.1 WebSocket upgrade request and its Sec-WebSocket-Key."""
    key = base64.b64encode(os.urandom(16)).decode()
    head = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
            f"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {key}\r\n\r\n")
    return head.encode(), key


def client_frame(data: bytes, opcode: Opcode = Opcode.BINARY) -> bytes:
    """One masked frame, as a client must send it."""
    return Frame(opcode, data).serialize(mask=True)


def server_frame(data: bytes, opcode: Opcode = Opcode.BINARY) -> bytes:
    """One unmasked frame, as a server sends it."""
    return Frame(opcode, data).serialize(mask=False)
