"""The `[[tcp]]` listeners: one per table, each with its own backends,
scheduler, probes and counters, beside the HTTP listener in the same
process (proxy/tcp_frontend is one listener, proxy/tcp_session one
accepted connection's life).
"""

from __future__ import annotations

import asyncio
import logging

from ..config_model import Config
from ..proxy.tcp_frontend import ENDINGS, TcpFrontend
from ..proxy.tcp_session import TcpSession
from . import accesslog
from .fdlimit import connection_cap

log = logging.getLogger("lb")


class TcpListeners:
    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, worker: int,
                 processes: int, descriptors: int):
        self.config = config
        self.descriptors = descriptors  # RLIMIT_NOFILE granted (fdlimit, at start-up)
        self.loop = loop
        self.worker = worker
        self.processes = processes      # workers: each backend's max_connections is split
        self.frontends: dict[str, TcpFrontend] = {}
        self.retired: list[TcpFrontend] = []     # removed by a reload, connections still open
        self._reuse_port = False
        self._started = False

    def start(self, reuse_port: bool = False) -> None:
        """Open every [[tcp]] socket and start accepting (and probing)."""
        self._reuse_port = reuse_port
        self._started = True
        for cfg in self.config.tcp:
            frontend = self._make(cfg)
            frontend.start(reuse_port, self._cap(), self.worker)
            self.frontends[cfg.name] = frontend

    def _make(self, cfg) -> TcpFrontend:
        return TcpFrontend(cfg, self.config, self.loop, self._ended, self.processes)

    def _cap(self) -> int:
        """Connections each listener may hold: two descriptors each (client
        and backend), within the descriptors granted (limits.max_connections
        if it is lower)."""
        return connection_cap(self.descriptors, 0, self.config.limits.max_connections)[0]

    def port(self, name: str) -> int:
        frontend = self.frontends[name]
        if frontend.address is None:
            raise KeyError(name)
        return frontend.address[1]

    def _all(self) -> list[TcpFrontend]:
        return [*self.frontends.values(), *self.retired]

    @property
    def open(self) -> int:
        """Connections under way in every listener (drain waits for them)."""
        return sum(f.open for f in self._all())

    def drain(self) -> None:
        """SIGTERM: stop accepting; what is open may finish."""
        for frontend in self._all():
            frontend.stop_accepting()

    def stop(self) -> None:
        """Close everything: listeners, probes, open connections."""
        for frontend in self._all():
            frontend.stop()

    def reload(self, new: Config) -> None:
        """SIGHUP: listeners added/removed/reconfigured; open connections stay."""
        self.config = new
        wanted = {cfg.name: cfg for cfg in new.tcp}
        for name, frontend in list(self.frontends.items()):
            cfg = wanted.get(name)
            if cfg is not None and (cfg.host, cfg.port) == (frontend.cfg.host, frontend.cfg.port):
                frontend.reconfigure(cfg, new)
                continue
            frontend.retire()
            del self.frontends[name]
            self.retired.append(frontend)
            log.info("tcp %s: %s; no longer accepting, %d connection(s) run on", name,
                     "removed" if cfg is None else "moved to a new address", frontend.open)
        self.retired = [f for f in self.retired if f.sessions]
        frontends = {}
        for cfg in new.tcp:
            frontend = self.frontends.get(cfg.name)
            if frontend is None:
                frontend = self._make(cfg)
                if self._started:
                    try:
                        frontend.start(self._reuse_port, self._cap(), self.worker)
                    except OSError as exc:
                        log.error("tcp %s: cannot listen on %s:%d: %s", cfg.name, cfg.host,
                                  cfg.port, exc.strerror or exc)
                        continue
            frontends[cfg.name] = frontend
        self.frontends = frontends

    def snapshot(self, now: float) -> list[dict]:
        return [f.snapshot(now) for f in self.frontends.values()]

    def _ended(self, frontend: TcpFrontend, session: TcpSession) -> None:
        """A connection ended: its access-log line."""
        if self.config.log.access:
            accesslog.logger.info(line(frontend.name, session))


def line(listener: str, session: TcpSession) -> str:
    """tcp=NAME client=IP backend=B in=BYTES out=BYTES total_ms=.. queue_ms=.. ended=WHY,
    then tried=A,B when more than one backend was tried and why="..." for the
    connections that failed (quoted as the HTTP access log quotes)."""
    backend = session.backend.name if session.backend is not None else "-"
    total = session.finished_at - session.started
    text = (f"tcp={listener} client={session.client_ip} backend={backend} "
            f"in={session.bytes_in} out={session.bytes_out} total_ms={total * 1000:.1f} "
            f"queue_ms={session.queued_for * 1000:.1f} ended={session.ended}")
    if len(session.tried) > 1:
        text += f" tried={','.join(session.tried)}"
    if session.errors:
        text += f" why={accesslog.quote('; '.join(session.errors))}"
    return text


def metrics(family, tcp: list[dict]) -> None:
    """The tts_lb_tcp_* families, from snapshot()'s list (endpoints.metrics' `family`)."""
    if not tcp:
        return
    pairs = [(t["name"], b) for t in tcp for b in t["backends"]]

    def per_backend(key: str) -> list[tuple[str, float]]:
        return [(f'{{listener="{name}",backend="{b["name"]}"}}', b[key]) for name, b in pairs]

    def per_listener(value) -> list[tuple[str, float]]:
        return [(f'{{listener="{t["name"]}"}}', value(t)) for t in tcp]

    family("tcp_accepted_total", "counter", "Connections accepted by a [[tcp]] listener.",
           per_listener(lambda t: t["accepted"]))
    family("tcp_ended_total", "counter", "[[tcp]] connections ended, by why.",
           [(f'{{listener="{t["name"]}",ended="{why}"}}', t["ended"][why])
            for t in tcp for why in ENDINGS])
    family("tcp_queue_length", "gauge", "[[tcp]] connections waiting for a free backend.",
           per_listener(lambda t: t["queue"]["length"]))
    family("tcp_connections_total", "counter",
           "Connections made to the backend and joined to their client.",
           per_backend("total"))
    family("tcp_connections_open", "gauge",
           "Connections holding the backend now (connecting included).", per_backend("open"))
    family("tcp_bytes_total", "counter", "Bytes carried, by direction.",
           [(f'{{listener="{name}",backend="{b["name"]}",direction="{direction}"}}',
             b[f"bytes_{direction}"]) for name, b in pairs
            for direction in ("to_backend", "to_client")])
    family("tcp_backend_up", "gauge", "1 if the backend is in the rotation.",
           [(f'{{listener="{name}",backend="{b["name"]}"}}', int(b["in_rotation"]))
            for name, b in pairs])
    family("tcp_connect_failures_total", "counter", "Connections to the backend that failed.",
           per_backend("connect_failures"))
    family("tcp_backend_ejections_total", "counter", "Passive ejections.",
           per_backend("ejections"))
