"""Active health probes: GET a backend's `health_path` every `interval`.

A probe uses its own short-lived connection, never the request pool and
never a concurrency slot, so a GPU server busy with long jobs is not taken
for dead because its probe waited behind them.

`verdict()` is the sans-io part: a server that answers but is still loading
its model is not ready -- HTTP 503 (Chatterbox's "Model not loaded"), any
other non-2xx, or a JSON body whose "status" is something other than
healthy/ok (chatterbox-tts-api says "initializing" while it loads) or whose
"model_loaded" is false.

A probe that connected but got no answer within `timeout` is reported as
such (`no_answer`): a server that blocks its event loop while it
synthesizes answers nothing until the job is done, and the scheduler tells
busy from dead (health.probe_inconclusive, which needs timeouts.first_byte).
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

import h11
import orjson

if TYPE_CHECKING:
    from .backend import Backend
    from .scheduler import Scheduler

from ..config_model import Active
from .health import MAINT

log = logging.getLogger("lb")

MAX_BODY = 64 * 1024           # more than any health answer; the rest is not read
READY_WORDS = frozenset({"healthy", "ok", "ready", "up", "pass", "available"})


def verdict(status: int, body: bytes) -> tuple[bool, str]:
    """(ready?, why) for one probe answer."""
    doc = _json_object(body)
    if not 200 <= status < 300:
        detail = doc.get("detail", doc.get("status"))
        if isinstance(detail, str) and detail:
            return False, f"answered {status} ({detail})"
        return False, f"answered {status}"
    said = doc.get("status")
    if isinstance(said, str) and said.lower() not in READY_WORDS:
        return False, f"answered {status} but status is {said!r} (model not ready)"
    if doc.get("model_loaded") is False:
        return False, f"answered {status} but model_loaded is false"
    return True, f"answered {status}"


def _json_object(body: bytes) -> dict:
    """The body as a JSON object, or {} if it is not one."""
    body = body.strip()
    if body[:1] != b"{":
        return {}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


async def probe_once(backend: "Backend", timeout: float) -> tuple[bool, str, bool]:
    """(ready?, why, no_answer): no_answer is True only for a connection that was
    accepted and then not answered within `timeout`."""
    connected: list[bool] = []
    try:
        ok, reason = await asyncio.wait_for(_get(backend, connected), timeout)
        return ok, reason, False
    except asyncio.TimeoutError:
        if connected:
            return False, f"no answer within {timeout:g}s (health.active.timeout)", True
        return False, f"cannot connect within {timeout:g}s (health.active.timeout)", False
    except OSError as exc:
        return False, f"cannot connect: {exc.strerror or exc}", False
    except h11.RemoteProtocolError as exc:
        return False, f"invalid answer: {exc}", False
    except Exception as exc:  # the loop must go on whatever one probe met
        return False, f"probe failed: {exc!r}", False


async def _get(backend: "Backend", connected: list[bool]) -> tuple[bool, str]:
    reader, writer = await asyncio.open_connection(backend.host, backend.port)
    connected.append(True)
    try:
        conn = h11.Connection(h11.CLIENT)
        writer.write(conn.send(h11.Request(method="GET", target=backend.health_path, headers=[
            ("host", backend.host_header), ("user-agent", "tts-lb-probe"),
            ("accept", "application/json"), ("connection", "close")])))
        writer.write(conn.send(h11.EndOfMessage()))
        status, body = 0, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) >= MAX_BODY:
                    break
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        return verdict(status, bytes(body[:MAX_BODY]))
    finally:
        writer.transport.abort()


class Prober:
    """One probe loop per backend that has a health_path."""

    def __init__(self, backend: "Backend", scheduler: "Scheduler", cfg: Active,
                 loop: asyncio.AbstractEventLoop, *, first_byte: float):
        self.backend = backend
        self.scheduler = scheduler
        self.cfg = cfg
        self.first_byte = first_byte   # timeouts.first_byte: a request may yet be answered
        self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        backend, cfg = self.backend, self.cfg
        rng = random.Random()
        while True:
            if backend.health.admin != MAINT:
                ok, reason, no_answer = await self.probe()
                self.scheduler.probed(backend, ok, reason, no_answer=no_answer,
                                      first_byte=self.first_byte)
            # A little spread so the probes of a fleet do not go out in step.
            await asyncio.sleep(cfg.interval * (0.9 + 0.2 * rng.random()))

    async def probe(self) -> tuple[bool, str, bool]:
        """One probe: (ready?, why, no_answer); a [[tcp]] listener's checks override it."""
        return await probe_once(self.backend, self.cfg.timeout)

    def stop(self) -> None:
        self._task.cancel()
