"""The balancer's own endpoints: /health, /lb-stats, /metrics, and the
operator's POST /lb/backends/<name>/drain|ready|maint.

Each handler takes the balancer, the request and the client's address and
returns (status, content type, body), or raises EndpointError.  They read
counters or flip a state; nothing here waits, and nothing here queues behind
backend work.
"""

from __future__ import annotations

import ipaddress
import time
from typing import TYPE_CHECKING, Callable

import orjson

from ..wire import headers as hdr
from ..wire.framing import Request
from .. import __version__
from . import cluster_service, stats_page, tcp_service
from . import openai_endpoints
from ..tts import speech_counters
from ..tts.cartesia import OUTCOMES
from ..proxy.phases import FALLBACK_REASONS
from ..scheduling.health import ADMIN_STATES
from ..proxy.latency import BOUNDS, LatencyBook
from ..scheduling.retry import DENIAL_REASONS, retry_reasons, status_reason

if TYPE_CHECKING:
    from .balancer import Balancer
    from .config import Config

JSON = b"application/json"
Handler = Callable[["Balancer", Request, str], tuple[int, bytes, bytes]]
Route = tuple[Handler, tuple[bytes, ...]]   # handler, methods it takes

ADMIN_PREFIX = b"/lb/backends/"


class EndpointError(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def health(balancer: "Balancer", request: Request, peer: str) -> tuple[int, bytes, bytes]:
    now = time.monotonic()
    usable = sum(1 for b in balancer.backends if b.health.in_rotation(now))
    fallback = balancer.fallback_snapshot()
    # With no backend in the rotation, TTS calls still get a voice while
    # the Cartesia fallback is usable: this balancer can still serve.
    status = "ok" if usable else "fallback" if fallback["usable"] else "unavailable"
    cluster = balancer.cluster
    body = {"status": status,
            "backends_usable": usable, "backends_total": len(balancer.backends),
            "cluster": cluster.gate.mode if cluster is not None else "off",
            "fallback": {k: fallback[k] for k in ("enabled", "usable", "reason")}}
    return (503 if status == "unavailable" else 200), JSON, orjson.dumps(body)


def lb_stats(balancer: "Balancer", request: Request, peer: str) -> tuple[int, bytes, bytes]:
    stats = balancer.snapshot()
    if hdr.wants_html(request.headers):
        return 200, b"text/html; charset=utf-8", stats_page.render(stats).encode("utf-8")
    return 200, JSON, orjson.dumps(stats, option=orjson.OPT_INDENT_2)


def metrics(balancer: "Balancer", request: Request, peer: str) -> tuple[int, bytes, bytes]:
    """Prometheus text format.  Every labelled family the balancer knows of
    has each of its label values from the first scrape, at 0 until it
    happens, so an alert on it has a series to look at.  Label values need
    no escaping: backend names are letters, digits, '.', '_' and '-', and
    the rest are the balancer's own words."""
    stats = balancer.snapshot()
    config = balancer.config
    out: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP tts_lb_{name} {help_text}")
        out.append(f"# TYPE tts_lb_{name} {kind}")
        out.extend(f"tts_lb_{name}{labels} {value}" for labels, value in samples)

    def by(label: str, counts: dict, known) -> list[tuple[str, float]]:
        """One sample per known value (0 if not counted yet) and per counted one."""
        names = dict.fromkeys(known, 0) | counts
        return [(f'{{{label}="{key}"}}', n) for key, n in sorted(names.items())]

    conns, reqs = stats["connections"], stats["requests"]
    family("info", "gauge", "The running balancer: version and HTTP engine.",
           [(f'{{version="{__version__}",http_engine="{stats["http_engine"]}"}}', 1)])
    family("connections_open", "gauge", "Client connections open.", [("", conns["open"])])
    family("connections_max", "gauge", "Client connection cap.", [("", conns["max"])])
    family("connections_accepted_total", "counter", "Client connections accepted.",
           [("", conns["accepted"])])
    family("accept_pauses_total", "counter", "Times accepting paused at the cap.",
           [("", conns["accept_pauses"])])
    family("requests_total", "counter", "Requests received from clients.", [("", reqs["total"])])
    family("requests_finished_total", "counter",
           "Requests finished, by the status the client got (499: it left first).",
           by("code", reqs["by_status"], (str(code) for code in COMMON_STATUSES)))
    backends = stats["backends"]

    def per_backend(key: str) -> list[tuple[str, float]]:
        return [(f'{{backend="{b["name"]}"}}', b[key]) for b in backends]

    queue, retry = stats["queue"], stats["retry"]
    family("queue_length", "gauge", "Requests waiting for a free backend slot.",
           [("", queue["length"])])
    family("queue_dispatched_total", "counter", "Requests that waited, then got a slot.",
           [("", queue["dispatched"])])
    family("queue_rejected_total", "counter", "Requests answered 503 by the queue.",
           [('{reason="full"}', queue["rejected_full"]),
            ('{reason="timeout"}', queue["timed_out"]),
            ('{reason="no_backend"}', queue["no_backend"])])
    family("retries_total", "counter", "Retries on another backend, by why.",
           by("reason", retry["by_reason"], retry_reasons(config.retry.statuses)))
    family("retries_denied_total", "counter", "Retries wanted but not made, by why.",
           by("reason", retry["not_retried"], DENIAL_REASONS))
    fallback = stats["fallback"]
    family("fallback_usable", "gauge", "1 if the Cartesia fallback can take calls.",
           [("", int(fallback["usable"]))])
    family("fallback_total", "counter", "Calls handed to Cartesia, by why.",
           by("reason", fallback.get("by_reason", {}),
              [*FALLBACK_REASONS, *(status_reason(s) for s in _fallback_statuses(config))]))
    family("fallback_characters_total", "counter",
           "Transcript characters sent to Cartesia (what it bills).",
           [("", fallback.get("characters", 0))])
    family("fallback_outcomes_total", "counter", "Cartesia requests by outcome.",
           by("outcome", fallback.get("outcomes", {}), OUTCOMES))
    family("backend_up", "gauge", "1 if the backend is in the rotation.",
           [(f'{{backend="{b["name"]}"}}', int(b["in_rotation"])) for b in backends])
    family("backend_state", "gauge", "The backend's state (1 for the current one).",
           [(f'{{backend="{b["name"]}",state="{st}"}}', int(b["state"] == st))
            for b in backends for st in BACKEND_STATES])
    family("backend_ejections_total", "counter", "Passive ejections.", per_backend("ejections"))
    family("backend_max_concurrency", "gauge", "Configured concurrency limit.",
           per_backend("max_concurrency"))
    family("backend_process_limit", "gauge",
           "What this process holds the backend to: max_concurrency while the fleet shares "
           "slots through Redis, else its static share (/ replicas, / workers, rounded down).",
           per_backend("process_limit"))
    family("backend_fleet_in_flight", "gauge",
           "Requests at the backend from every balancer of the fleet, as last seen here.",
           per_backend("fleet_in_flight"))
    family("backend_limit", "gauge", "Concurrency limit in force now (slow start, half-open).",
           per_backend("limit_now"))
    family("backend_peak_in_flight", "gauge", "Most requests ever held at once.",
           per_backend("peak_in_flight"))
    family("backend_in_flight", "gauge", "Requests holding the backend now.", per_backend("in_flight"))
    family("backend_requests_total", "counter",
           "Attempts sent to the backend (retries and two-step audio GETs included): the sum "
           "of responses, unanswered and attempts under way.", per_backend("requests"))
    family("backend_responses_total", "counter", "Backend responses by status class.",
           [(f'{{backend="{b["name"]}",class="{cls}"}}', n)
            for b in backends for cls, n in b["responses"].items()])
    family("backend_unanswered_total", "counter",
           "Attempts that ended with no response head: no_response (the backend failed), "
           "abandoned (the client left, or its request body broke).",
           [(f'{{backend="{b["name"]}",reason="{why}"}}', b[why])
            for b in backends for why in ("no_response", "abandoned")])
    family("backend_attempts_under_way", "gauge",
           "Attempts sent to the backend and not ended (two-step audio GETs included).",
           per_backend("under_way"))
    family("backend_failures_total", "counter", "Backend failures by kind.",
           [(f'{{backend="{b["name"]}",kind="{kind}"}}', n)
            for b in backends for kind, n in b["failures"].items()])
    family("backend_sent_bytes_total", "counter",
           "Request body bytes sent to the backend (tunnels' bytes included).",
           per_backend("bytes_sent"))
    family("backend_received_bytes_total", "counter",
           "Response body bytes from the backend (tunnels' bytes included).",
           per_backend("bytes_received"))

    def per_tunnel(key: str) -> list[tuple[str, float]]:
        return [(f'{{backend="{b["name"]}"}}', b["tunnels"][key]) for b in backends]

    family("backend_tunnels_open", "gauge", "Tunnels (after a 101) open to the backend now.",
           per_tunnel("open"))
    family("backend_tunnels_total", "counter", "Tunnels opened to the backend.",
           per_tunnel("total"))
    family("backend_tunnel_bytes_total", "counter", "Bytes through the backend's tunnels.",
           [(f'{{backend="{b["name"]}",direction="{way}"}}', b["tunnels"]["bytes_" + way])
            for b in backends for way in ("to_backend", "to_client")])
    family("backend_handshakes_refused_total", "counter",
           "Upgrade requests the backend answered with anything but a 101.",
           per_tunnel("refused"))
    family("backend_pool_idle", "gauge", "Idle pooled connections.",
           [(f'{{backend="{b["name"]}"}}', b["pool"]["idle"]) for b in backends])
    for metric, name, help_text in LATENCY_FAMILIES:
        _histogram(out, name, help_text, metric, balancer.latency)
    tcp_service.metrics(family, stats["tcp"])
    cluster_service.metrics(family, stats["cluster"])
    speech_counters.metrics(family, stats["speech"])
    return 200, b"text/plain; version=0.0.4; charset=utf-8", ("\n".join(out) + "\n").encode()


# Histograms of proxied requests (not the balancer's own endpoints), by the
# backend that answered ("cartesia": the fallback; "-": none, e.g. a 503
# when the queue was full) and the kind of its [[route]] ("other": none).
LATENCY_FAMILIES = (
    ("duration", "request_duration_seconds",
     "Proxied requests, from request head to the end of the answer."),
    ("first_byte", "first_byte_seconds",
     "Proxied requests, from request head to the first response byte sent to the caller."),
    ("queue_wait", "queue_wait_seconds",
     "Seconds waited in the queue by requests that asked for a backend slot (0: none waited)."),
)
_LE = [f'le="{bound}"' for bound in BOUNDS] + ['le="+Inf"']


def _histogram(out: list[str], name: str, help_text: str, metric: str,
               book: LatencyBook) -> None:
    out.append(f"# HELP tts_lb_{name} {help_text}")
    out.append(f"# TYPE tts_lb_{name} histogram")
    for backend, kind, series in book.series():
        hist = getattr(series, metric)
        labels = f'backend="{backend}",kind="{kind}"'
        cumulative = hist.cumulative()
        out.extend(f"tts_lb_{name}_bucket{{{labels},{le}}} {n}"
                   for le, n in zip(_LE, cumulative))
        out.append(f"tts_lb_{name}_sum{{{labels}}} {hist.sum!r}")
        out.append(f"tts_lb_{name}_count{{{labels}}} {cumulative[-1]}")


def _fallback_statuses(config: "Config") -> list[int]:
    """The 5xx answers a call most likely falls back after (any 5xx can)."""
    return sorted({500, 502, 503, 504, *config.retry.statuses, *config.passive.statuses})


def admin(balancer: "Balancer", request: Request, peer: str) -> tuple[int, bytes, bytes]:
    """POST /lb/backends/<name>/<drain|ready|maint>."""
    if not _allowed(peer, balancer.config.admin.allow):
        raise EndpointError(403, f"admin requests are only taken from the addresses in "
                            f"admin.allow, not from {peer}")
    path = request.target.split(b"?", 1)[0]
    name, _, action = path[len(ADMIN_PREFIX):].decode("ascii", "replace").partition("/")
    backend = balancer.by_name.get(name)
    if backend is None:
        raise EndpointError(404, f"no backend named {name!r} (known: "
                            f"{', '.join(balancer.by_name)})")
    if action not in ADMIN_STATES:
        raise EndpointError(404, f"unknown action {action!r}: use "
                            f"{ADMIN_PREFIX.decode()}{name}/{'|'.join(ADMIN_STATES)}")
    balancer.scheduler.set_admin(backend, action)
    if balancer.cluster is not None:
        balancer.cluster.set_admin(name, action)    # every replica of the fleet
    return 200, JSON, orjson.dumps(backend.snapshot(time.monotonic()), option=orjson.OPT_INDENT_2)


def _allowed(peer: str, networks: tuple) -> bool:
    try:
        ip = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False   # a Unix socket or an unknown peer: not from an allowed address
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped   # a dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d
    return any(ip in net for net in networks)


_READ = (b"GET", b"HEAD")
# requests_finished_total shows these from the start: success, and what
# the balancer answers itself.
COMMON_STATUSES = (200, 400, 404, 405, 408, 413, 431, 499, 500, 502, 503, 504)
BACKEND_STATES = ("up", "slow-start", "half-open", "ejected", "down", "draining", "drained",
                  "maint", "busy")

ROUTES: dict[bytes, Route] = {
    b"/health": (health, _READ),
    b"/lb-stats": (lb_stats, _READ),
    b"/metrics": (metrics, _READ),
}


def fallback_audio(balancer: "Balancer", request: Request,
                   peer: str) -> tuple[int, bytes, bytes]:
    """A WAV the Cartesia fallback made for a two-step (Chatterbox) call."""
    wav = balancer.audio.get(request.target.split(b"?", 1)[0])
    if wav is None:
        raise EndpointError(404, "audio file expired")
    return 200, b"audio/wav", wav


class LocalRequest:
    """The handler of a request for a built-in endpoint: its body (if any)
    is read and dropped, then the endpoint answers."""
    __slots__ = ("balancer", "client", "request", "route")
    keeps_time = False      # the connection bounds it with timeouts.idle

    def __init__(self, balancer: "Balancer", client, request: Request, route: Route):
        self.balancer = balancer
        self.client = client
        self.request = request
        self.route = route

    def client_data(self, data: bytes) -> None:
        pass

    def client_end(self, trailers: list) -> None:
        self.balancer.local_request(self.client, self.request, self.route)

    def client_bad_body(self, reason: str) -> None:
        self.client.close()

    def client_lost(self) -> None:
        pass

    def client_write_paused(self) -> None:
        pass

    def client_write_resumed(self) -> None:
        pass


def route(path: bytes, balancer: "Balancer") -> Route | None:
    """The built-in endpoint for a request path, if it is one."""
    found = ROUTES.get(path)
    if found is None:
        if path.startswith(ADMIN_PREFIX):
            return admin, (b"POST",)
        if path.startswith(b"/audio/") and balancer.audio.get(path) is not None:
            return fallback_audio, _READ
        speech = openai_endpoints.route(path, balancer)
        if speech is not None:
            return speech, _READ
    return found
