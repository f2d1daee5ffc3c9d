"""What bench.throughput measures: a fast backend, the balancer and HAProxy in front of it.

The three targets all serve the same two paths (a tiny "ok\\n" and a large body), so that
the load clients can drive each one alike and the ratios compare only the proxies.  The
backend is nginx when it can be had (so that it is not the bottleneck), else the pure-Python
backends.echo.  The balancer and HAProxy are configured for the data plane only (one
backend, no limits that the load would hit; HAProxy single-threaded like the balancer).
Each target is checked once before anything is measured.  There is one balancer per HTTP
engine measured (`python -m lb --http ENGINE`), each its own target, "lb-<engine>".
"""
from __future__ import annotations

import http.client
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.processes import HOST, BenchError, Service, Services, tool_version

ENGINES = ("httptools", "h11")     # the balancer's --http choices that bench.throughput measures


def lb_target(engine: str) -> str:
    return f"lb-{engine}"


def target_order(engines: list[str]) -> list[str]:
    """The targets in the order they are run and shown: the ceiling, each balancer, HAProxy."""
    return ["direct", *(lb_target(e) for e in engines), "haproxy"]


@dataclass
class Backend:
    kind: str         # "nginx" or "echo"
    description: str
    port: int
    small_path: str
    large_path: str


def start_nginx(services: Services, tmp: Path, body_bytes: int) -> Backend:
    root = tmp / "nginx"
    www = root / "www"
    www.mkdir(parents=True)
    (www / "ok.txt").write_bytes(b"ok\n")
    _write_big_file(www / "big.bin", body_bytes)
    version = tool_version(["nginx", "-v"], r"nginx/(\S+)")

    def argv_for_port(port: int) -> list[str]:
        conf = root / "nginx.conf"
        conf.write_text(f"""\
daemon off;
master_process off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/err.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 75s;
    keepalive_requests 100000000;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen {HOST}:{port} backlog=4096;
        root {www};
        location = / {{ default_type text/plain; return 200 "ok\\n"; }}
        location = /big.bin {{ }}
        location / {{ return 404; }}
    }}
}}
""")
        return ["nginx", "-p", str(root), "-e", str(root / "err.log"), "-c", str(conf)]

    svc = services.start_on_free_port("nginx", argv_for_port, stop_signal=signal.SIGTERM)
    return Backend("nginx", f"nginx {version} (1 worker, master_process off; static "
                            f"'ok\\n' and a {_mib(body_bytes)} file)",
                   svc.port, "/", "/big.bin")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


def _write_big_file(path: Path, size: int) -> None:
    block = (b"0123456789abcdefghijklmnopqrstuvwxyz\n" * 28340)[:1 << 20]
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(block[:min(left, len(block))])
            left -= len(block)


def start_echo(services: Services, body_bytes: int) -> Backend:
    svc = services.start("echo", [sys.executable, "-m", "backends.echo", "--host", HOST,
                                  "--port", "0"])
    match = services.wait_log(svc, r"listening on [\d.]+:(\d+)")
    svc.port = int(match.group(1))
    return Backend("echo", "backends.echo (pure Python; likely the bottleneck, so lb/direct "
                           "understates the balancer's cost)",
                   svc.port, "/", f"/bytes?n={body_bytes}")


def start_lb(services: Services, tmp: Path, backend_port: int, connections: int, engine: str,
             *, name: str | None = None, profile_path: Path | None = None) -> Service:
    """`python -m lb --http ENGINE` in front of the backend on backend_port; `name` names its
    config and log in tmp (one per balancer: several run side by side)."""
    name = name or lb_target(engine) + ("-profiled" if profile_path else "")
    conf = tmp / f"{name}.toml"
    conf.write_text(f"""\
# written by bench/throughput.py
[listen]
address = "{HOST}:0"

[pool]
max_idle = {max(32, connections * 2)}   # keep every upstream connection the load needs

[log]
access = false
level = "info"

[balancer]
max_concurrency = {max(1000, connections * 2)}   # the data plane, not the GPU limit, is measured

[[backend]]
name = "bench"
url = "http://{HOST}:{backend_port}"
""")
    lb_argv = ["-m", "lb", "-c", str(conf), "--http", engine]
    if profile_path is None:
        argv = [sys.executable, *lb_argv]
    else:  # cProfile writes its file when lb returns: stop it with SIGINT, which lb handles
        argv = [sys.executable, "-m", "cProfile", "-o", str(profile_path), *lb_argv]
    svc = services.start(name, argv, stop_signal=signal.SIGINT)
    match = services.wait_log(svc, r"listening on [\d.]+:(\d+)")
    svc.port = int(match.group(1))
    return svc


def start_haproxy(services: Services, tmp: Path, backend_port: int,
                  name: str = "haproxy", streaming: bool = False,
                  mode: str = "http") -> tuple[Service, str]:
    """HAProxy in front of the backend (not bench.proxies': that one is set up for a GPU
    fleet, with limits, health checks and cookies that would only add work here).
    `streaming` adds `option http-no-delay`: by default HAProxy sends body data with
    MSG_MORE, so the kernel holds a small chunk up to 200 ms waiting for more; a streaming
    deployment turns that off, and the streams workload measures it that way.
    `mode="tcp"` (the tunnel and tcp workloads): bytes both ways, timeouts only."""
    version = tool_version(["haproxy", "-v"], r"version (\S+)")
    if mode == "tcp":
        options, http_timeouts = "", ""
    else:
        options = ("    option http-keep-alive\n    http-reuse always\n"
                   + ("    option http-no-delay\n" if streaming else ""))
        http_timeouts = "    timeout http-request 10s\n    timeout http-keep-alive 60s\n"

    def argv_for_port(port: int) -> list[str]:
        conf = tmp / f"{name}.cfg"
        conf.write_text(f"""\
# written by bench/throughput.py: {mode} mode, single-threaded like the balancer
global
    nbthread 1
    maxconn 4096

defaults
    mode {mode}
{options}    timeout connect 5s
    timeout client 60s
    timeout server 60s
{http_timeouts}
frontend bench_in
    bind {HOST}:{port}
    default_backend bench_out

backend bench_out
    server backend1 {HOST}:{backend_port}
""")
        return ["haproxy", "-db", "-f", str(conf)]

    return services.start_on_free_port(name, argv_for_port), version


def sanity_check(name: str, port: int, backend: Backend, body_bytes: int) -> None:
    """One small and one full large request, checked, before measuring anything."""
    try:
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        conn.request("GET", backend.small_path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200 or body != b"ok\n":
            raise BenchError(f"{name}: GET {backend.small_path} answered {resp.status} "
                             f"{body[:100]!r}, expected 200 'ok\\n'")
        conn.request("GET", backend.large_path)
        resp = conn.getresponse()
        total, buf = 0, bytearray(1 << 20)
        deadline = time.monotonic() + 60
        while (n := resp.readinto(buf)):
            total += n
            if time.monotonic() > deadline:
                raise BenchError(f"{name}: the large body took more than 60 s")
        if resp.status != 200 or total != body_bytes:
            raise BenchError(f"{name}: GET {backend.large_path} answered {resp.status} with "
                             f"{total} bytes, expected 200 with {body_bytes}")
        conn.close()
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"{name}: sanity check on {HOST}:{port} failed: {exc!r}") from None
