"""Active checks of a `[[tcp]]` listener's backends, every health.active.interval:

- check = "connect": a TCP connection to the backend's address is made
  within health.active.timeout (then dropped at once) -> up;
- check = "http": GET health_path on health_port (0: the backend's own
  port) answers 2xx (probe.verdict) -> up.

Every result is conclusive: the busy-GPU rule of HTTP probes (a probe
unanswered while requests are being answered says nothing) is for servers
that block while they synthesize, not for a TCP service.  rise/fall,
readmission and the rotation are the scheduler's, as for HTTP backends.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ..config_model import Active
from .probe import Prober, probe_once
from .scheduler import Scheduler
from .tcp_backend import TcpBackend


@dataclass(frozen=True)
class HttpTarget:
    """What probe_once reads of a backend: where to GET which path."""
    host: str
    port: int
    health_path: str
    host_header: bytes


async def connect_once(host: str, port: int, timeout: float) -> tuple[bool, str, bool]:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except asyncio.TimeoutError:
        return False, f"cannot connect within {timeout:g}s (health.active.timeout)", False
    except OSError as exc:
        return False, f"cannot connect: {exc.strerror or exc}", False
    writer.transport.abort()
    return True, "connected", False


class TcpProber(Prober):
    def __init__(self, backend: TcpBackend, scheduler: Scheduler, cfg: Active,
                 loop: asyncio.AbstractEventLoop, *, check: str, path: str, port: int):
        self.check = check
        port = port or backend.port
        shown = f"[{backend.host}]" if ":" in backend.host else backend.host
        self.target = HttpTarget(backend.host, port, path,
                                 f"{shown}:{port}".encode("ascii", "replace"))
        super().__init__(backend, scheduler, cfg, loop, first_byte=0.0)

    async def probe(self) -> tuple[bool, str, bool]:
        if self.check == "connect":
            return await connect_once(self.backend.host, self.backend.port, self.cfg.timeout)
        ok, reason, _ = await probe_once(self.target, self.cfg.timeout)
        return ok, reason, False
