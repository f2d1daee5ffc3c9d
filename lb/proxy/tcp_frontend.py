"""One `[[tcp]]` listener at run time: its socket, its backends, its own
scheduler (the same policies, queue and passive ejection as HTTP), its
checks, and the connections it accepted (proxy/tcp_session).

A reload keeps it when the name and address stay (reconfigure: backends
kept by name and address, the others drained or added, new policy and
limits); otherwise it is retired: it stops accepting and checking, and the
connections it has run on until they end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Callable

from ..config_model import Config, TcpListener
from ..scheduling import policy as policies
from ..scheduling.carry_over import carry_over
from ..scheduling.scheduler import NO_BACKEND, QUEUE_FULL, Scheduler
from ..scheduling.tcp_backend import TcpBackend
from ..scheduling.tcp_probe import TcpProber
from ..scheduling.wakeup import Wakeup
from ..wire.listener import BACKLOG, Listener, open_socket
from ..wire.splice import (BACKEND_CLOSED, BACKEND_RESET, CLIENT_CLOSED, CLIENT_RESET,
                           IDLE_TIMEOUT, SHUTDOWN)
from .tcp_session import CONNECT_FAILED, DONE, QUEUE_TIMEOUT, SessionSettings, TcpSession

log = logging.getLogger("lb")

# Every `ended` a connection can have (the metrics list each from the start).
ENDINGS = (CLIENT_CLOSED, BACKEND_CLOSED, CLIENT_RESET, BACKEND_RESET, IDLE_TIMEOUT, SHUTDOWN,
           QUEUE_TIMEOUT, QUEUE_FULL, NO_BACKEND, CONNECT_FAILED)


def settings(cfg: TcpListener, config: Config) -> SessionSettings:
    return SessionSettings(connect_timeout=config.timeouts.connect,
                           attempts=config.retry.attempts, queue_timeout=cfg.queue_timeout,
                           idle=config.timeouts.tunnel_idle,
                           write_buffer_high=config.limits.write_buffer_high)


class TcpFrontend:
    def __init__(self, cfg: TcpListener, config: Config, loop: asyncio.AbstractEventLoop,
                 on_ended: Callable[["TcpFrontend", TcpSession], None], processes: int = 1):
        self.cfg = cfg
        self.processes = processes      # workers sharing each backend's max_connections
        self.name = cfg.name
        self.loop = loop
        self._on_ended = on_ended
        self.backends = [TcpBackend(b, passive=config.passive, active=config.active,
                                    processes=processes) for b in cfg.backends]
        self.policy = policies.make(cfg.policy)
        self._wakeup = Wakeup(loop, lambda: self.scheduler.dispatch())
        self.scheduler = Scheduler(self.backends, self.policy, queue_limit=cfg.queue_limit,
                                   passive=config.passive, clock=time.monotonic,
                                   wake_at=self._wakeup.at)
        self.settings = settings(cfg, config)
        self.active = config.active
        self.sessions: set[TcpSession] = set()    # whose client connection is open
        self.ended: Counter[str] = Counter()
        self.listener: Listener | None = None
        self.address: tuple[str, int] | None = None
        self.accepting = False
        self._probers: list[TcpProber] = []

    # --- life cycle

    def start(self, reuse_port: bool, max_connections: int, worker: int) -> None:
        cfg = self.cfg
        sock = open_socket(cfg.host, cfg.port, BACKLOG, reuse_port)
        self.address = sock.getsockname()[:2]
        self.listener = Listener(self.loop, sock, lambda: TcpSession(self), max_connections)
        self.listener.start()
        self.accepting = True
        self._start_probers()
        host, port = self.address
        log.info("%stcp %s: listening on %s:%d, %d backend(s): %s; policy %s; check %s",
                 f"worker {worker}: " if worker else "", self.name,
                 f"[{host}]" if ":" in host else host, port, len(self.backends),
                 ", ".join(f"{b.name}={b.host}:{b.port}" for b in self.backends),
                 self.policy.name, cfg.check)

    def stop_accepting(self) -> None:
        if self.accepting:
            self.accepting = False
            self.listener.close()

    def retire(self) -> None:
        """Removed by a reload: nothing new; what is open runs on."""
        self.stop_accepting()
        self._stop_probers()

    def stop(self) -> None:
        self.retire()
        self._wakeup.cancel()
        for session in list(self.sessions):
            session.shutdown()

    def reconfigure(self, cfg: TcpListener, config: Config) -> None:
        """A reload kept this listener (same name and address)."""
        passive, active = config.passive, config.active
        probed = cfg.check != "none"
        backends, kept, added, removed = carry_over(
            self.backends, cfg.backends,
            same=lambda backend, new: (new.host, new.port) == (backend.host, backend.port),
            make=lambda new: TcpBackend(new, passive=passive, active=active,
                                        processes=self.processes))
        for backend, new in kept:
            backend.reconfigure(new, passive=passive, active=active, probed=probed)
        for backend in removed:
            # What it holds runs on (and releases its slot here); nothing new goes there.
            self.scheduler.set_admin(backend, "drain")
        self.backends = backends
        if cfg.policy != self.cfg.policy:
            self.policy = policies.make(cfg.policy)
        self.scheduler.reconfigure(self.backends, self.policy, queue_limit=cfg.queue_limit,
                                   passive=passive)
        self.cfg, self.settings, self.active = cfg, settings(cfg, config), active
        self._stop_probers()
        if self.accepting:
            self._start_probers()
        if added or removed:
            log.info("tcp %s: reloaded%s%s", self.name,
                     f", added {', '.join(b.name for b in added)}" if added else "",
                     f", removed {', '.join(b.name for b in removed)} (draining)"
                     if removed else "")
        self.scheduler.dispatch()

    def _start_probers(self) -> None:
        cfg = self.cfg
        if cfg.check == "none":
            return
        self._probers = [TcpProber(b, self.scheduler, self.active, self.loop, check=cfg.check,
                                   path=cfg.health_path, port=cfg.health_port)
                         for b in self.backends]

    def _stop_probers(self) -> None:
        for prober in self._probers:
            prober.stop()
        self._probers = []

    # --- called by sessions

    def session_started(self, session: TcpSession) -> None:
        self.sessions.add(session)

    def session_ended(self, session: TcpSession) -> None:
        self.ended[session.ended] += 1
        self._on_ended(self, session)

    def client_closed(self, session: TcpSession) -> None:
        self.sessions.discard(session)
        self.listener.connection_closed()

    # --- reporting

    @property
    def open(self) -> int:
        """Connections not ended yet (a drain waits for them)."""
        return sum(1 for s in self.sessions if s.state != DONE)

    def snapshot(self, now: float) -> dict:
        cfg, listener = self.cfg, self.listener
        host, port = self.address or (cfg.host, cfg.port)
        return {
            "name": self.name,
            "address": f"{host}:{port}",
            "port": port,
            "accepting": self.accepting,
            "accepted": listener.accepted if listener else 0,
            "open": self.open,
            "policy": self.policy.name,
            "check": cfg.check,
            "queue": self.scheduler.snapshot() | {"timeout_s": cfg.queue_timeout},
            "ended": {why: self.ended[why] for why in ENDINGS},
            "backends": [b.snapshot(now) for b in self.backends],
        }
