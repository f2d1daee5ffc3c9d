"""The balancer's own endpoints: /health, /lb-stats, /metrics.

Each handler takes the balancer and the request and returns
(status, content type, body).  They read counters only; nothing here waits.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Callable

import h11
import orjson

from . import headers as hdr

if TYPE_CHECKING:
    from .balancer import Balancer

JSON = b"application/json"
Handler = Callable[["Balancer", h11.Request], tuple[int, bytes, bytes]]


def health(balancer: "Balancer", request: h11.Request) -> tuple[int, bytes, bytes]:
    usable = sum(1 for b in balancer.backends if b.up)
    body = {"status": "ok" if usable else "unavailable",
            "backends_usable": usable, "backends_total": len(balancer.backends)}
    return (200 if usable else 503), JSON, orjson.dumps(body)


def lb_stats(balancer: "Balancer", request: h11.Request) -> tuple[int, bytes, bytes]:
    stats = balancer.snapshot()
    if hdr.wants_html(request.headers):
        return 200, b"text/html; charset=utf-8", _stats_html(stats).encode("utf-8")
    return 200, JSON, orjson.dumps(stats, option=orjson.OPT_INDENT_2)


def _stats_html(stats: dict) -> str:
    rows = []
    for b in stats["backends"]:
        last = b["last_error"]["reason"] if b["last_error"] else ""
        state = b["state"].upper()
        colour = "#2a2" if b["state"] == "up" else "#c22"
        rows.append(
            f"<tr><td>{html.escape(b['name'])}</td><td>{html.escape(b['url'])}</td>"
            f"<td style='color:{colour}'><b>{state}</b></td><td>{b['in_flight']}</td>"
            f"<td>{b['requests']}</td><td>{b['errors']}</td><td>{html.escape(last)}</td></tr>")
    conns = stats["connections"]
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>tts-lb stats</title>"
        "<style>body{font-family:sans-serif}td,th{padding:4px 10px;border-bottom:1px solid #ddd}"
        "</style></head><body><h1>tts-lb</h1>"
        f"<p>pid {stats['pid']} &middot; up {stats['uptime_s']:.0f}s &middot; "
        f"{conns['open']} of {conns['max']} connections &middot; "
        f"{stats['requests']['total']} requests</p>"
        "<table><tr><th>backend</th><th>url</th><th>state</th><th>active requests</th>"
        "<th>requests</th><th>errors</th><th>last error</th></tr>"
        + "".join(rows) + "</table></body></html>")


def metrics(balancer: "Balancer", request: h11.Request) -> tuple[int, bytes, bytes]:
    stats = balancer.snapshot()
    out: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP tts_lb_{name} {help_text}")
        out.append(f"# TYPE tts_lb_{name} {kind}")
        out.extend(f"tts_lb_{name}{labels} {value}" for labels, value in samples)

    conns, reqs = stats["connections"], stats["requests"]
    family("connections_open", "gauge", "Client connections open.", [("", conns["open"])])
    family("connections_max", "gauge", "Client connection cap.", [("", conns["max"])])
    family("connections_accepted_total", "counter", "Client connections accepted.",
           [("", conns["accepted"])])
    family("accept_pauses_total", "counter", "Times accepting paused at the cap.",
           [("", conns["accept_pauses"])])
    family("requests_total", "counter", "Requests received from clients.", [("", reqs["total"])])
    family("requests_finished_total", "counter",
           "Requests finished, by the status the client got (499: it left first).",
           [(f'{{code="{code}"}}', n) for code, n in sorted(reqs["by_status"].items())])
    backends = stats["backends"]

    def per_backend(key: str) -> list[tuple[str, float]]:
        return [(f'{{backend="{b["name"]}"}}', b[key]) for b in backends]

    family("backend_up", "gauge", "1 if the backend is usable.",
           [(f'{{backend="{b["name"]}"}}', int(b["state"] == "up")) for b in backends])
    family("backend_in_flight", "gauge", "Requests holding the backend now.", per_backend("in_flight"))
    family("backend_requests_total", "counter", "Requests sent to the backend.", per_backend("requests"))
    family("backend_responses_total", "counter", "Backend responses by status class.",
           [(f'{{backend="{b["name"]}",class="{cls}"}}', n)
            for b in backends for cls, n in b["responses"].items()])
    family("backend_failures_total", "counter", "Backend failures by kind.",
           [(f'{{backend="{b["name"]}",kind="{kind}"}}', n)
            for b in backends for kind, n in b["failures"].items()])
    family("backend_sent_bytes_total", "counter", "Request body bytes sent to the backend.",
           per_backend("bytes_sent"))
    family("backend_received_bytes_total", "counter", "Response body bytes from the backend.",
           per_backend("bytes_received"))
    family("backend_pool_idle", "gauge", "Idle pooled connections.",
           [(f'{{backend="{b["name"]}"}}', b["pool"]["idle"]) for b in backends])
    return 200, b"text/plain; version=0.0.4; charset=utf-8", ("\n".join(out) + "\n").encode()


ROUTES: dict[bytes, Handler] = {
    b"/health": health,
    b"/lb-stats": lb_stats,
    b"/metrics": metrics,
}
