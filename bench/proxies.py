"""The proxies bench.concurrency measures: tts-lb per policy, and HAProxy set up by an expert.

Each is started fresh per run in front of the same simulated fleet, with the fleet's GPU
times scaled like everything else; their configs are kept beside the results.
"""
from __future__ import annotations

import csv
import io
import signal
import socket
import subprocess
import sys
from pathlib import Path

from bench.fleet import Fleet, http_json, secs
from bench.processes import HOST, Service, Services, free_port
from bench.world import (BASE_EJECTION, CARTESIA_CONCURRENCY, FIRST_BYTE, KEY_ENV, MAX_EJECTION,
                         NO_LIMIT, PROBE_INTERVAL, PROBE_TIMEOUT, QUEUE_TIMEOUT, SLOW_START,
                         SYNTH_PATH, VOICE_ID)


def lb_config(fleet: Fleet, args, policy: str) -> str:
    s = args.time_scale
    limit = 100_000 if policy == NO_LIMIT else fleet.slots
    lb_policy = "random" if policy == NO_LIMIT else policy
    lines = [
        "# written by bench/concurrency.py: the simulated fleet's times are scaled by "
        f"{args.time_scale:g}",
        "[listen]", f'address = "{HOST}:0"',
        "[log]", "access = false", 'level = "info"',
        "[timeouts]", f"first_byte = {secs(FIRST_BYTE * s)}",
        "[pool]", f"max_idle = {max(32, 2 * fleet.slots)}",
        "[balancer]", f'policy = "{lb_policy}"', f"max_concurrency = {limit}",
        "queue_limit = 1024", f"queue_timeout = {secs(QUEUE_TIMEOUT * s)}",
        f"slow_start = {secs(SLOW_START * s)}",
        "[health.passive]", f"base_ejection = {secs(BASE_EJECTION * s)}",
        f"max_ejection = {secs(MAX_EJECTION * s)}",
        "[health.active]", f"interval = {secs(max(0.1, PROBE_INTERVAL * s))}",
        f"timeout = {secs(max(0.25, PROBE_TIMEOUT * s))}",
        "[fallback.cartesia]", "enabled = true", f'url = "http://{HOST}:{fleet.cartesia.port}"',
        f'api_key_env = "{KEY_ENV}"', f"max_concurrency = {CARTESIA_CONCURRENCY}",
        f"spillover = {'true' if args.spillover else 'false'}",
        "[fallback.cartesia.voices]", f'default = "{VOICE_ID}"',
    ]
    for i, port in enumerate(fleet.ports):
        lines += ["[[backend]]", f'name = "gpu{i}"', f'url = "http://{HOST}:{port}"',
                  'health_path = "/health"']
    lines += ["[[route]]", f'path = "{SYNTH_PATH}"', 'kind = "chatterbox"',
              "[[route]]", 'path = "/synthesize"', 'kind = "chatterbox"']
    return "\n".join(lines) + "\n"


def haproxy_config(ports: list[int], args, port: int, sock: Path) -> str:
    """HAProxy's config for GPU servers on `ports` (args.slots each), listening on `port`."""
    s = args.time_scale
    inter = max(0.1, PROBE_INTERVAL * s)
    ms = lambda x: f"{max(1, round(x * 1000))}ms"  # noqa: E731
    servers = "\n".join(f"    server gpu{i} {HOST}:{p} cookie gpu{i}"
                        for i, p in enumerate(ports))
    tracked = "\n".join(f"    server gpu{i} {HOST}:{p} cookie gpu{i} track gpus/gpu{i}"
                        for i, p in enumerate(ports))
    return f"""\
# written by bench/concurrency.py: HAProxy as an expert would set it up for this fleet
# (the simulated fleet's times are scaled by {s:g}).
global
    maxconn 4096
    stats socket {sock} mode 600 level user

defaults
    mode http
    option http-keep-alive
    timeout connect 2s
    timeout client 60s
    timeout server {ms(FIRST_BYTE * s)}      # the GPU answers in one go: first byte = whole call
    timeout queue {ms(QUEUE_TIMEOUT * s)}       # a call waits this long for a free slot, then 503
    timeout check {ms(max(0.25, PROBE_TIMEOUT * s))}
    retries 1                  # two tries in all, like the balancer's retry.attempts = 2
    option redispatch 1        # ... the second on another server
    retry-on conn-failure empty-response response-timeout 502 503 504

frontend tts
    bind {HOST}:{port}
    use_backend audio if {{ path_beg /audio/ }}
    default_backend gpus

# Synthesis: least connections, at most `slots` calls per server, the rest queued.
backend gpus
    balance leastconn
    # The audio file lives on the server that made it: a cookie names it, scoped to /audio
    # (the last Path wins) so that a client's next POST is not pinned to the same server.
    cookie TTSSRV insert indirect nocache httponly attr "Path=/audio"
    option httpchk GET /health
    http-check expect status 200
    default-server check inter {ms(inter)} fall 3 rise 2 slowstart {ms(SLOW_START * s)} maxconn {args.slots} observe layer4 error-limit 3 on-error mark-down
{servers}

# Audio fetches are not GPU work: no maxconn, pinned by the cookie, health from gpus.
backend audio
    cookie TTSSRV indirect nocache
    option persist
{tracked}
"""


def start_lb(services: Services, tmp: Path, fleet: Fleet, args, policy: str,
             configs: dict[str, str]) -> Service:
    text = lb_config(fleet, args, policy)
    conf = tmp / f"lb-{policy}.toml"
    conf.write_text(text)
    configs.setdefault(f"lb-{policy}.toml", text)
    svc = services.start(f"lb-{policy}", [sys.executable, "-m", "lb", "-c", str(conf)],
                         stop_signal=signal.SIGINT)
    svc.port = int(services.wait_log(svc, r"listening on [\d.]+:(\d+)").group(1))
    return svc


def start_haproxy(services: Services, tmp: Path, fleet: Fleet, args,
                  configs: dict[str, str]) -> tuple[Service, Path]:
    def argv_for_port(port: int) -> list[str]:
        text = haproxy_config(fleet.ports, args, port, _stats_socket(tmp, port))
        conf = tmp / "haproxy.cfg"
        conf.write_text(text)
        configs["haproxy.cfg"] = text
        return ["haproxy", "-db", "-f", str(conf)]

    svc = services.start_on_free_port("haproxy", argv_for_port)
    return svc, _stats_socket(tmp, svc.port)


def _stats_socket(tmp: Path, port: int) -> Path:
    return tmp / f"haproxy-{port}.sock"


def check_haproxy(tmp: Path, args) -> str | None:
    """`haproxy -c` on the config, once: None if fine, else why it was refused.

    Before the fleet starts (so that the runs to come are known from the outset): the
    servers' ports are placeholders, which `haproxy -c` does not connect to."""
    conf = tmp / "haproxy-check.cfg"
    placeholders = [free_port() for _ in range(args.backends)]
    conf.write_text(haproxy_config(placeholders, args, free_port(), tmp / "check.sock"))
    try:
        out = subprocess.run(["haproxy", "-c", "-f", str(conf)], capture_output=True, text=True,
                             timeout=15, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"haproxy -c failed: {exc}"
    if out.returncode != 0:
        lines = [ln for ln in (out.stdout + out.stderr).splitlines() if "ALERT" in ln]
        return "haproxy refused its config: " + (lines[0] if lines else f"exit {out.returncode}")
    return None


def haproxy_stats(sock: Path) -> dict:
    """`show stat` on the stats socket: retries, redispatches, queue peak, 5xx answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(sock))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError as exc:
        return {"error": f"stats socket: {exc}"}
    text = data.decode("latin-1").lstrip("# ")
    rows = list(csv.DictReader(io.StringIO(text)))

    def num(row, key):
        try:
            return int(row.get(key) or 0)
        except ValueError:
            return 0
    out = {"servers": []}
    for row in rows:
        if row.get("pxname") == "gpus" and row.get("svname") == "BACKEND":
            out.update(retries=num(row, "wretr"), redispatches=num(row, "wredis"),
                       queue_peak=num(row, "qmax"), sessions_peak=num(row, "smax"),
                       responses_5xx=num(row, "hrsp_5xx"), requests=num(row, "stot"))
        elif row.get("pxname") == "gpus" and row.get("svname") not in ("FRONTEND", "BACKEND"):
            out["servers"].append({"name": row.get("svname"), "requests": num(row, "stot"),
                                   "peak": num(row, "smax"), "queue_peak": num(row, "qmax"),
                                   "retries": num(row, "wretr"), "status": row.get("status")})
        elif row.get("pxname") == "audio" and row.get("svname") == "BACKEND":
            out["audio_responses_4xx"] = num(row, "hrsp_4xx")
            out["audio_responses_5xx"] = num(row, "hrsp_5xx")
    return out


def lb_stats(host: str, port: int) -> dict | None:
    doc = http_json(host, port, "/lb-stats", timeout=5)
    if not doc or "backends" not in doc:
        return None
    fb = doc.get("fallback", {}) or {}
    return {
        "retries": (doc.get("retry") or {}).get("retries"),
        "retry_by_reason": (doc.get("retry") or {}).get("by_reason"),
        "fallback_by_reason": fb.get("by_reason"),
        "fallback_outcomes": fb.get("outcomes"),
        "queue": doc.get("queue"),
        "by_status": (doc.get("requests") or {}).get("by_status"),
        "backends": [{k: b.get(k) for k in ("name", "requests", "peak_in_flight", "state",
                                            "errors")} for b in doc["backends"]],
    }


def diff_counters(after, before):
    """Counters of a long-running balancer over one run (numbers and dicts of numbers)."""
    if isinstance(after, dict):
        before = before if isinstance(before, dict) else {}
        return {k: diff_counters(v, before.get(k)) for k, v in after.items()}
    if isinstance(after, (int, float)) and not isinstance(after, bool):
        return after - (before if isinstance(before, (int, float)) else 0)
    return after

