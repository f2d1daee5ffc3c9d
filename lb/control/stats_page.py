"""/lb-stats as an HTML page for a browser (Accept: text/html): the same
snapshot as the JSON, refreshing itself every few seconds.

Everything taken from the snapshot goes through html.escape: backend names,
URLs, error reasons and retry explanations can quote what a backend or a
client sent.
"""

from __future__ import annotations

from html import escape

REFRESH_S = 5

_STATE_COLOURS = {"up": "#2a2", "busy": "#2a2", "slow-start": "#2a2", "half-open": "#c80",
                  "draining": "#c80", "drained": "#888", "maint": "#888",
                  "shared": "#2a2", "degraded": "#c80"}     # (and the cluster's modes)
_METRIC_TITLES = (("duration", "duration"), ("first_byte", "first byte"),
                  ("queue_wait", "queue wait"))


def _e(value) -> str:
    return escape(str(value))


def _ms(seconds: float | None) -> str:
    return "&ndash;" if seconds is None else f"{seconds * 1000:.1f}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    """`head` and the cells of `rows` are HTML already (escaped by the caller)."""
    return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
            + "</table>")


def _counts(counts: dict) -> str:
    return ", ".join(f"{_e(k)} {_e(v)}" for k, v in sorted(counts.items())) or "none"


def _state(state: str) -> str:
    """A backend's state, in its colour."""
    colour = _STATE_COLOURS.get(state, "#c22")
    return f"<span style='color:{colour}'><b>{_e(state.upper())}</b></span>"


def _backends(stats: dict) -> str:
    rows = []
    for b in stats["backends"]:
        last = b["last_error"]["reason"] if b["last_error"] else ""
        responses = b["responses"]
        rows.append([
            _e(b["name"]), _e(b["url"]), _state(b["state"]),
            f"{_e(b['in_flight'])} / {_e(b['limit_now'])}", _e(b["fleet_in_flight"]),
            _e(b["peak_in_flight"]), _e(b["requests"]), _e(responses["2xx"]), _e(responses["4xx"]),
            _e(responses["5xx"]), _e(b["no_response"]), _e(b["errors"]),
            f"{_e(b['tunnels']['open'])} ({_e(b['tunnels']['total'])})", _e(last)])
    return _table(["backend", "url", "state", "active requests / limit", "fleet-wide", "peak",
                   "requests",
                   "2xx", "4xx", "5xx", "no response", "errors", "tunnels open (all)",
                   "last error"], rows)


def _cluster(cluster: dict) -> str:
    if cluster["mode"] == "off":
        return ""
    acquire = cluster["acquire_ms"]
    return (f"<p>cluster {_state(cluster['mode'])}: fleet {_e(cluster['fleet'])} of "
            f"{_e(cluster['replicas'])} replicas through {_e(cluster['redis'])} &middot; "
            f"slot p50 / p99 {_e(acquire['p50'])} / {_e(acquire['p99'])} ms &middot; "
            f"{_e(cluster['lost_races'])} lost races</p>")


def _latency(stats: dict) -> str:
    latency = stats["latency"]
    head = ["backend"] + [f"{title} (n, p50 / p95 / p99 ms)" for _, title in _METRIC_TITLES]
    rows = []
    for name, metrics in latency["backends"].items():
        row = [_e(name)]
        for metric, _ in _METRIC_TITLES:
            m = metrics[metric]
            row.append(f"{_e(m['count'])}: {_ms(m['p50'])} / {_ms(m['p95'])} / "
                       f"{_ms(m['p99'])}")
        rows.append(row)
    return (f"<h2>Latency, last {latency['window_s']:.0f}s</h2>"
            f"<p>estimated {_e(latency['estimate'])}; backend &ldquo;-&rdquo;: answered "
            "without one (queue full or timed out, none in the rotation)</p>"
            + _table(head, rows))


def _fallback(stats: dict) -> str:
    fb = stats["fallback"]
    if not fb["enabled"]:
        return "<h2>Cartesia fallback</h2><p>disabled</p>"
    state = ("<b style='color:#2a2'>usable</b>" if fb["usable"]
             else f"<b style='color:#c22'>unusable</b>: {_e(fb['reason'])}")
    return (f"<h2>Cartesia fallback</h2><p>{state} &middot; {_e(fb['url'])} &middot; "
            f"{_e(fb['in_flight'])} of {_e(fb['max_concurrency'])} calls under way &middot; "
            f"{_e(fb['calls'])} calls, {_e(fb['characters'])} characters</p>"
            f"<p>handed over because: {_counts(fb['by_reason'])}</p>"
            f"<p>outcomes: {_counts(fb['outcomes'])}</p>")


def _retries(stats: dict) -> str:
    retry = stats["retry"]
    rows = [[_e(r["request_id"]), _e(r["status"]), _e(r["attempts"]),
             _e(" → ".join(r["backends"])), _e("; ".join(r["why"]))]
            for r in reversed(retry["recent"])]
    return (f"<h2>Retries</h2><p>{_e(retry['retries'])} retries &middot; "
            f"{_e(retry['retrying_now'])} retrying now &middot; at most "
            f"{_e(retry['attempts_max'])} attempts</p>"
            f"<p>by reason: {_counts(retry['by_reason'])}; not retried: "
            f"{_counts(retry['not_retried'])}</p>"
            + (_table(["request id", "status", "attempts", "backends", "why"], rows)
               if rows else "<p>no retried request yet</p>"))


def _tcp(stats: dict) -> str:
    out = []
    for t in stats.get("tcp", ()):
        rows = [[_e(b["name"]), _e(b["address"]), _state(b["state"]),
                 f"{_e(b['open'])} / {_e(b['max_connections'] or '-')}", _e(b["total"]),
                 _e(b["connect_failures"]), _e(b["bytes_to_backend"]), _e(b["bytes_to_client"])]
                for b in t["backends"]]
        out.append(f"<h2>TCP {_e(t['name'])} on {_e(t['address'])}</h2>"
                   f"<p>{_e(t['accepted'])} accepted &middot; {_e(t['open'])} open &middot; "
                   f"queue {_e(t['queue']['length'])} &middot; policy {_e(t['policy'])}</p>"
                   + _table(["backend", "address", "state", "open / limit", "total",
                             "connect failures", "bytes to backend", "bytes to client"], rows))
    return "".join(out)


def render(stats: dict) -> str:
    conns, queue = stats["connections"], stats["queue"]
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<meta http-equiv='refresh' content='{REFRESH_S}'><title>tts-lb stats</title>"
        "<style>body{font-family:sans-serif}td,th{padding:4px 10px;border-bottom:1px solid #ddd;"
        "text-align:left}</style></head><body><h1>tts-lb</h1>"
        f"<p>pid {_e(stats['pid'])} &middot; up {stats['uptime_s']:.0f}s &middot; "
        f"{_e(conns['open'])} of {_e(conns['max'])} connections &middot; "
        f"{_e(stats['requests']['total'])} requests</p>"
        f"<p>policy {_e(stats['policy'])} &middot; queue {_e(queue['length'])} of "
        f"{_e(queue['limit'])} &middot; retries {_e(stats['retry']['retries'])}</p>"
        + _cluster(stats["cluster"])
        + _backends(stats) + _tcp(stats) + _latency(stats) + _fallback(stats) + _retries(stats)
        + "</body></html>")
