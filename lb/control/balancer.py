"""The balancer: configuration, backends, policy, listener and counters.

It owns everything that outlives one connection and is what the protocol
classes call back into for choices and accounting.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from typing import TYPE_CHECKING

import orjson

from . import endpoints
from . import logsetup
from ..scheduling.backend import Backend
from ..tts.cartesia import CartesiaClient
from ..scheduling.expiring import ExpiringMap
from ..tts.fallback import Fallback
from ..tts.speech_counters import SpeechCounters
from ..tts.speech_plan import SpeechPlan
from ..wire import engines
from ..wire.client import ClientConnection
from ..wire.framing import Request
from .cluster_service import OFF, ClusterService
from .config import BackendConfig, Config
from .fdlimit import FdLimit, connection_cap
from .request_log import RequestAccounting
from .tcp_service import TcpListeners
from ..proxy.latency import FALLBACK_BACKEND, NO_BACKEND_LABEL, OTHER_KIND, LatencyBook
from ..wire.listener import BACKLOG, Listener, open_socket, somaxconn
from ..scheduling import policy as policies
from ..wire.pool import UpstreamPool
from ..scheduling.probe import Prober
from ..scheduling.retry import RetryBudget
from ..scheduling.carry_over import carry_over
from ..scheduling.scheduler import Scheduler
from ..scheduling.wakeup import Wakeup
from ..wire.upstream import UpstreamConnection
from ..proxy.exchange import Exchange

if TYPE_CHECKING:
    from .endpoints import Route

log = logging.getLogger("lb")

WORKER_ENV = "TTS_LB_WORKER"   # set by the supervisor: this worker's number, from 1
AUDIO_TTL = 3600.0       # two-step audio files live an hour on Chatterbox servers
AFFINITY_ITEMS = 100_000 # audio_url -> backend entries
AUDIO_ITEMS = 1000       # WAV files the fallback made, kept for their audio_url
AUDIO_BYTES = 256 * 1024 * 1024
SWEEP_INTERVAL = 1.0     # how often idle pooled connections are expired


class Balancer(RequestAccounting):
    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, fd: FdLimit,
                 processes: int = 1):
        self.config = config
        self.loop = loop
        self.fd = fd
        # Workers sharing every backend: each holds a backend to its share of
        # max_concurrency (Backend.process_share), fixed for the process's life.
        self.processes = processes
        # [cluster] replicas (fixed for the process's life, as [cluster] is):
        # the static share of each backend when Redis cannot be reached.
        self.replicas = config.cluster.replicas if config.cluster is not None else 1
        limits = config.limits
        self.backends = [self._make_backend(b) for b in config.backends]
        self.by_name = {b.name: b for b in self.backends}
        self.connections: set[ClientConnection] = set()
        self.draining = False
        # 0: the only process.  Only the supervisor sets it; anything else is 0.
        number = os.environ.get(WORKER_ENV, "0")
        self.worker = int(number) if number.isdigit() and len(number) < 5 else 0
        self.policy = policies.make(config.balancer.policy)
        self._wakeup = Wakeup(loop, lambda: self.scheduler.dispatch())
        self.scheduler = Scheduler(self.backends, self.policy,
                                   queue_limit=config.balancer.queue_limit,
                                   passive=config.passive, clock=time.monotonic,
                                   wake_at=self._wakeup.at)
        # [cluster]: every backend's slots shared with the fleet through Redis.
        self.cluster = (ClusterService(config.cluster, loop, self.scheduler, lambda: self.by_name)
                        if config.cluster is not None else None)
        self.retry = RetryBudget(config.retry)
        # TTS calls by path, and what the Cartesia fallback needs.
        self.routes = _routes(config)
        self.slotless = _slotless(config)   # paths whose calls and tunnels take no slot
        self.speech_plans = _speech_plans(config)   # the OpenAI front door, by path
        self.speech_counters = SpeechCounters()
        self.tunnels: set[Exchange] = set()  # exchanges switched to a tunnel (a 101)
        self.latency = LatencyBook(*_latency_labels(config))
        self.affinity: ExpiringMap[str] = ExpiringMap(max_items=AFFINITY_ITEMS, ttl=AUDIO_TTL)
        self.audio: ExpiringMap[bytes] = ExpiringMap(max_items=AUDIO_ITEMS, ttl=AUDIO_TTL,
                                                     max_bytes=AUDIO_BYTES, size=len)
        self.fallback = self._make_fallback(config)
        self.fallbacks: Counter[str] = Counter()
        self._probers: dict[str, Prober] = {}
        self.max_connections, self.cap_note = connection_cap(
            fd.granted, config.pool.max_idle * len(self.backends), limits.max_connections)
        self.requests_total = 0
        self.by_status: Counter[int] = Counter()
        self.started = time.time()
        self.listener: Listener | None = None
        self.address: tuple[str, int] | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._access = config.log.access
        self.engine = engines.resolve(config.listen.http)   # "auto" -> what runs
        self._request_parser, self._response_parser = engines.parsers(self.engine)
        self.tcp = TcpListeners(config, loop, self.worker, processes,   # the [[tcp]] listeners
                                fd.granted)

    # --- life cycle

    def start(self, reuse_port: bool = False) -> None:
        listen = self.config.listen
        sock = open_socket(listen.host, listen.port, BACKLOG, reuse_port)
        self.address = sock.getsockname()[:2]
        limits, timeouts, parser = self.config.limits, self.config.timeouts, self._request_parser
        self.listener = Listener(self.loop, sock,
                                 lambda: ClientConnection(self, parser, limits, timeouts),
                                 self.max_connections)
        self.listener.start()
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)
        for backend in self.backends:
            self._start_prober(backend)
        host, port = self.address
        shown = f"[{host}]" if ":" in host else host
        log.info("%slistening on %s:%d, %d backend(s): %s; policy %s; http engine %s",
                 f"worker {self.worker}: " if self.worker else "", shown, port,
                 len(self.backends),
                 ", ".join(f"{b.name}={b.url} (limit {b.configured_limit}"
                           + (f", {b.max_concurrency} in this worker of {self.processes})"
                              if self.processes > 1 else ")")
                           for b in self.backends), self.policy.name, self.engine)
        if self.fallback is not None:
            client = self.fallback.client
            if client.usable:
                log.info("Cartesia fallback on: %s, model %s, at most %d at once%s", client.cfg.url,
                         client.cfg.model_id, client.cfg.max_concurrency,
                         ", spillover on" if client.cfg.spillover else "")
            else:
                log.warning("Cartesia fallback unusable: %s", client.unusable_reason)
        cap = somaxconn()
        if cap is not None and cap < BACKLOG:
            log.info("listen backlog capped by net.core.somaxconn at %d", cap)
        self.tcp.start(reuse_port)   # after the HTTP line: tests read its port first
        if self.cluster is not None:
            self.cluster.start()

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        self.tcp.stop()
        if self.cluster is not None:
            self.cluster.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._wakeup.cancel()
        for prober in self._probers.values():
            prober.stop()
        for backend in self.backends:
            backend.pool.close_all()
        for conn in list(self.connections):
            conn.close()
        for tunnel in list(self.tunnels):
            tunnel.close_tunnel()

    def _make_backend(self, cfg: BackendConfig) -> Backend:
        config, loop = self.config, self.loop
        limits = config.limits
        return Backend(cfg, UpstreamPool(
            loop, cfg.host, cfg.port, max_idle=config.pool.max_idle,
            idle_timeout=config.pool.idle_timeout, connect_timeout=config.timeouts.connect,
            make_connection=lambda pool: UpstreamConnection(
                pool, loop, parser_class=self._response_parser,
                max_response_header_bytes=limits.max_response_header_bytes,
                write_buffer_high=limits.write_buffer_high)),
            passive=config.passive, active=config.active, slow_start=config.balancer.slow_start,
            processes=self.processes, replicas=self.replicas)

    def _make_fallback(self, config: Config) -> Fallback | None:
        cartesia = config.cartesia
        return (Fallback(cartesia, CartesiaClient(cartesia), self.audio)
                if cartesia.enabled else None)

    def _start_prober(self, backend: Backend) -> None:
        if backend.health_path:
            self._probers[backend.name] = Prober(
                backend, self.scheduler, self.config.active, self.loop,
                first_byte=self.config.timeouts.first_byte)

    # --- SIGTERM: finish what is under way, take nothing new

    def drain(self) -> None:
        """Stop accepting; close idle connections; the others close after their
        current response (which says Connection: close)."""
        self.draining = True
        if self.listener is not None:
            self.listener.close()
        for conn in list(self.connections):
            conn.drain()
        self.tcp.drain()

    @property
    def in_flight(self) -> int:
        """Proxied requests under way (queued, at a backend, with Cartesia,
        or a tunnel after its 101) and [[tcp]] connections."""
        return self.retry.active + self.tcp.open

    # --- SIGHUP: a new configuration, without dropping anything under way

    def reload(self, new: Config) -> None:
        old = self.config
        for what, before, after in (("listen.address", (old.listen.host, old.listen.port),
                                     (new.listen.host, new.listen.port)),
                                    ("listen.workers", old.listen.workers, new.listen.workers),
                                    ("listen.http", old.listen.http, new.listen.http),
                                    ("limits", old.limits, new.limits),
                                    ("[cluster]", old.cluster, new.cluster),
                                    ("[pool] or timeouts.connect for kept backends",
                                     (old.pool, old.timeouts.connect),
                                     (new.pool, new.timeouts.connect))):
            if before != after:
                log.warning("reload: %s changed, which takes effect only after a restart", what)
        self.config = new
        self._access = new.log.access
        logsetup.set_level(new.log.level)
        # Backends: same name and URL -> kept, with its state, and the new
        # limit, weight and probe; otherwise removed (drained: what it holds
        # finishes, nothing new goes there) and/or added.
        backends, kept, added, removed = carry_over(
            self.backends, new.backends, same=lambda backend, cfg: cfg.url == backend.url,
            make=self._make_backend)
        for backend, cfg in kept:
            backend.reconfigure(cfg, passive=new.passive, active=new.active,
                                slow_start=new.balancer.slow_start)
        for backend in added:
            backend.use_shared(self.cluster is not None and self.cluster.shared)
        for backend in removed:
            self.scheduler.set_admin(backend, "drain")
            backend.pool.close_all()
        for prober in self._probers.values():
            prober.stop()
        self._probers = {}
        self.backends = backends   # in the new file's order
        self.by_name = {b.name: b for b in self.backends}
        if old.balancer.policy != new.balancer.policy:
            self.policy = policies.make(new.balancer.policy)
        self.scheduler.reconfigure(self.backends, self.policy,
                                   queue_limit=new.balancer.queue_limit, passive=new.passive)
        self.retry.cfg = new.retry
        self.tcp.reload(new)
        self.routes = _routes(new)
        self.slotless = _slotless(new)
        self.speech_plans = _speech_plans(new)
        self.latency.relabel(*_latency_labels(new))
        if old.cartesia != new.cartesia:
            # Calls already with Cartesia keep the client they started with.
            self.fallback = self._make_fallback(new)
        for backend in self.backends:
            self._start_prober(backend)
        log.info("reloaded: %d backend(s)%s%s; policy %s", len(self.backends),
                 f", added {', '.join(b.name for b in added)}" if added else "",
                 f", removed {', '.join(b.name for b in removed)} (draining)" if removed else "",
                 self.policy.name)
        self.scheduler.dispatch()

    def _sweep(self) -> None:
        now = self.loop.time()
        for backend in self.backends:
            backend.pool.expire(now)
        self.affinity.expire()
        self.audio.expire()
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def affinity_for(self, path: bytes) -> Backend | None:
        """The backend that made the audio file at `path`, if we know one."""
        if not path.startswith(b"/audio/"):
            return None
        name = self.affinity.get(path)
        return None if name is None else self.by_name.get(name)

    def remember_audio_url(self, body: bytes, backend: Backend) -> None:
        """A two-step call's JSON answer: its audio_url lives on `backend`."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        url = doc.get("audio_url") if isinstance(doc, dict) else None
        if isinstance(url, str) and url.startswith("/audio/") and url.isascii():
            self.affinity.put(url.split("?", 1)[0].encode("ascii"), backend.name)

    def why_no_backend(self) -> str:
        now = time.monotonic()
        return ", ".join(f"{b.name} {b.health.state(now, b.in_flight)}" for b in self.backends)

    # --- called by client connections

    def connection_opened(self, conn: ClientConnection) -> None:
        self.connections.add(conn)

    def connection_closed(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        self.listener.connection_closed()

    def open_request(self, client: ClientConnection, request: Request):
        """A request the framing rules accepted: its handler."""
        route = endpoints.route(request.path, self)
        if route is not None:
            # Answered once the request (and any body, discarded) is complete,
            # so the connection stays usable for the next request.
            return endpoints.LocalRequest(self, client, request, route)
        exchange = Exchange(self, client, request)
        exchange.start()
        return exchange

    def local_request(self, client: ClientConnection, request: Request, route: "Route") -> None:
        """A request for one of the balancer's own endpoints."""
        started = time.monotonic()
        request_id = request.request_id
        handler, methods = route
        if request.method not in methods:
            allowed = b", ".join(methods)
            status, reason = 405, (f"{request.target.decode('ascii', 'replace')} takes "
                                   f"{allowed.decode()}")
            self._count(request, request_id, status, "-", started, reason)
            client.send_error(status, reason, request_id, extra=[(b"allow", allowed)])
            return
        try:
            status, content_type, body = handler(self, request, client.peer_ip)
        except endpoints.EndpointError as exc:
            self._count(request, request_id, exc.status, "-", started, exc.reason)
            client.send_error(exc.status, exc.reason, request_id)
            return
        self._count(request, request_id, status, "-", started, "", bytes_out=len(body))
        client.send_whole(status, content_type, body, request_id,
                          extra=[(b"cache-control", b"no-store")])

    def reject(self, client: ClientConnection, request: Request | None, request_id: str,
               status: int, reason: str) -> None:
        """Refuse a request the balancer will not forward, and close the connection."""
        self._count(request, request_id, status, "-", time.monotonic(), reason)
        client.send_error(status, reason, request_id, close=True)

    # --- reporting

    def snapshot(self) -> dict:
        listener = self.listener
        now = time.monotonic()
        return {
            "pid": os.getpid(),
            "worker": self.worker,
            "draining": self.draining,
            "uptime_s": round(time.time() - self.started, 3),
            "policy": self.policy.name,
            "http_engine": self.engine,
            "connections": {
                "open": listener.open if listener else 0,
                "max": self.max_connections,
                "accepted": listener.accepted if listener else 0,
                "accepting": bool(listener and not listener.paused),
                "accept_pauses": listener.pauses if listener else 0,
            },
            "fd_limit": {"asked": self.fd.asked, "hard": self.fd.hard,
                         "granted": self.fd.granted},
            "requests": {"total": self.requests_total, "under_way": self.retry.active,
                         "by_status": {str(k): v for k, v in sorted(self.by_status.items())}},
            "queue": self.scheduler.snapshot(),
            "retry": self.retry.snapshot(),
            "fallback": self.fallback_snapshot(),
            "backends": [b.snapshot(now) for b in self.backends],
            "backend_counts": BACKEND_COUNTS,
            "latency": self.latency.snapshot(now),
            "tcp": self.tcp.snapshot(now),
            "cluster": self.cluster.snapshot() if self.cluster is not None else OFF,
            "speech": self.speech_counters.snapshot(),
        }

    def fallback_snapshot(self) -> dict:
        if self.fallback is None:
            return {"enabled": False, "usable": False, "reason": "disabled"}
        snap = self.fallback.client.snapshot()
        snap["by_reason"] = dict(self.fallbacks)
        snap["audio_files"] = len(self.audio)
        snap["audio_bytes"] = self.audio.bytes
        snap["two_step_urls"] = len(self.affinity)
        return snap


def _routes(config: Config) -> dict[bytes, str]:
    """TTS calls by path: their kind (what the Cartesia fallback translates)."""
    return {r.path.encode("ascii"): r.kind for r in config.routes if r.kind}


def _speech_plans(config: Config) -> dict[bytes, SpeechPlan]:
    return {r.path.encode("ascii"): SpeechPlan(r.speech) for r in config.routes if r.speech}


def _slotless(config: Config) -> frozenset[bytes]:
    """Paths of `slot = false` routes: not GPU work, no backend slot taken."""
    return frozenset(r.path.encode("ascii") for r in config.routes if not r.slot)


def _latency_labels(config: Config) -> tuple[list[str], list[str]]:
    """The backend and kind labels of the latency series, made up front so
    every one is in /metrics (at 0) from the first scrape."""
    backends = [b.name for b in config.backends] + [NO_BACKEND_LABEL]
    if config.cartesia.enabled:
        backends.append(FALLBACK_BACKEND)
    kinds = sorted({r.kind for r in config.routes if r.kind}) + [OTHER_KIND]
    return backends, kinds


# How a backend's counters in /lb-stats add up (see Backend.__init__).
BACKEND_COUNTS = ("requests == sum(responses) + no_response + abandoned + under_way, "
                  "at every moment; requests counts attempts (retries and two-step audio "
                  "GETs included); failures also counts those after a response head came")
