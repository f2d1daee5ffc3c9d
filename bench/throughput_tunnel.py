"""bench.throughput's tunnel and tcp workloads: bulk bytes and small round trips through a
byte tunnel of the balancer, beside HAProxy mode tcp and the backend alone.

The backend is one bench.bulk_server (its own process).  In front of it: one balancer per
HTTP engine, each with the bulk server as its [[backend]] (tunnel: a WebSocket-style
upgrade on its HTTP listener, 101, then a splice) and as the one backend of a [[tcp]]
listener (tcp: a plain splice, which no HTTP engine touches, so it is measured once, on
the first engine's process, as target "lb"); and HAProxy, nbthread 1 like the balancer,
mode tcp (for tunnel the upgrade head and the 101 just pass through it as bytes).
`direct` is the bulk server itself, with the same upgrade head (tunnel) or without (tcp).

A cell (one workload, one target, one repeat) is three measurements, one after another:
  upload    --tunnel-connections connections each write for --duration s into a sink,
            then half-close; the sink answers with the bytes it got, which must be every
            byte written; MiB/s = those bytes / (last answer - start)
  download  as many connections read a source for --duration s; MiB/s = bytes / time
  echo      one connection, ECHO_ROUNDS round trips of 64 bytes (fewer if --duration
            runs out first), each checked: p50/p99 round trip
The client is threads with blocking sockets and 1 MiB buffers in this process (a recv_into
or send releases the GIL: one syscall per buffer, no allocation).  Every socket has a
timeout, every loop a count or a deadline, every thread a bounded join.
"""
from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.processes import HOST, BenchError, Service, Services
from bench.throughput_clients import RUN_GRACE, percentile
from bench.throughput_report import format_ms
from bench.throughput_targets import lb_target, start_haproxy

TUNNEL_WORKLOADS = ("tunnel", "tcp")
TCP_TARGET = "lb"           # the [[tcp]] listener's row
IO_TIMEOUT = 10.0           # any one send/recv; a stall fails the run instead of hanging it
ECHO_ROUNDS = 5000
ECHO_WARMUP = 50            # round trips not counted (first-use costs on every hop)
ECHO_BYTES = 64
BLOCK = bytes(range(256)) * 4096     # 1 MiB written per send
ERROR_SAMPLES = 5


@dataclass(frozen=True)
class Target:
    port: int
    upgrade: bool           # tunnel: send the upgrade head and expect a 101 first


@dataclass
class TunnelRun:
    """One cell.  MiB = 2^20 bytes; round trips in ms."""
    upload_mib_s: float | None = None
    download_mib_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    upload_bytes: int = 0
    download_bytes: int = 0
    echo_rounds: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def failed(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < ERROR_SAMPLES:
            self.error_samples.append(what)


# --- the targets ---------------------------------------------------------------------------


def start_bulk_server(services: Services) -> int:
    svc = services.start("bulk-server", [sys.executable, "-m", "bench.bulk_server",
                                          "--port", "0"])
    return int(services.wait_log(svc, r"listening on [\d.]+:(\d+)").group(1))


def start_lb_bulk(services: Services, tmp: Path, bulk_port: int, engine: str,
                  with_tcp: bool) -> tuple[Service, int | None]:
    """A balancer in front of the bulk server: its HTTP port, and (`with_tcp`) the port of
    a [[tcp]] listener whose one backend is the bulk server too."""
    name = f"{lb_target(engine)}-bulk"
    conf = tmp / f"{name}.toml"
    tcp = f"""
[[tcp]]
name = "bulk"
address = "{HOST}:0"
  [[tcp.backend]]
  name = "bulk"
  address = "{HOST}:{bulk_port}"
""" if with_tcp else ""
    conf.write_text(f"""\
# written by bench/throughput_tunnel.py
[listen]
address = "{HOST}:0"

[log]
access = false
level = "info"

[balancer]
max_concurrency = 1000   # a tunnel holds a slot: the data plane, not the GPU limit, is measured

[[backend]]
name = "bulk"
url = "http://{HOST}:{bulk_port}"
{tcp}""")
    svc = services.start(name, [sys.executable, "-m", "lb", "-c", str(conf), "--http", engine],
                         stop_signal=signal.SIGINT)
    # the HTTP listener's line names its backends; the [[tcp]] one starts "tcp NAME:"
    svc.port = int(services.wait_log(svc, r"listening on [\d.]+:(\d+), \d+ backend").group(1))
    if not with_tcp:
        return svc, None
    return svc, int(services.wait_log(svc, r"tcp bulk: listening on [\d.]+:(\d+)").group(1))


def start_tunnel_targets(services: Services, tmp: Path, args, with_haproxy: bool
                         ) -> dict[str, dict[str, Target]]:
    """targets[workload][target], in the order they are run and shown."""
    bulk = start_bulk_server(services)
    targets: dict[str, dict[str, Target]] = {"tunnel": {"direct": Target(bulk, True)},
                                             "tcp": {"direct": Target(bulk, False)}}
    engines = args.engines if "tunnel" in args.workloads else args.engines[:1]
    for engine in engines:
        with_tcp = "tcp" in args.workloads and engine == args.engines[0]
        svc, tcp_port = start_lb_bulk(services, tmp, bulk, engine, with_tcp)
        targets["tunnel"][lb_target(engine)] = Target(svc.port, True)
        if with_tcp:
            targets["tcp"][TCP_TARGET] = Target(tcp_port, False)
    if with_haproxy:     # one instance for both: the upgrade head and the 101 are bytes to it
        port = start_haproxy(services, tmp, bulk, name="haproxy-tcp", mode="tcp")[0].port
        targets["tunnel"]["haproxy"] = Target(port, True)
        targets["tcp"]["haproxy"] = Target(port, False)
    return {wl: targets[wl] for wl in TUNNEL_WORKLOADS if wl in args.workloads}


# --- the client ----------------------------------------------------------------------------


def _open(target: Target, mode: str) -> socket.socket:
    """A connection to the bulk server's `mode`, through the target, ready for bytes."""
    s = socket.create_connection((HOST, target.port), timeout=IO_TIMEOUT)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not target.upgrade:
            s.sendall(mode.encode() + b"\n")
            return s
        s.sendall(f"GET /{mode} HTTP/1.1\r\nHost: {HOST}:{target.port}\r\n"
                  f"Connection: Upgrade\r\nUpgrade: bulk\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:      # bounded: 16 KiB, and the socket's timeout
            piece = s.recv(4096)
            if not piece or len(head) > 16384:
                raise OSError(f"no 101: got {head[:80]!r}")
            head += piece
        status_line, _, rest = head.partition(b"\r\n")
        if status_line.split(b" ")[1:2] != [b"101"] or not rest.endswith(b"\r\n\r\n") \
                or rest.count(b"\r\n\r\n") > 1:
            raise OSError(f"upgrade answered {status_line[:80]!r} (or bytes after the 101)")
        return s
    except BaseException:
        s.close()
        raise


def _threads(work, n: int, duration: float, run: TunnelRun) -> list:
    """`work(i, barrier, out)` on n threads that start together; out[i] as each left it."""
    barrier = threading.Barrier(n, timeout=IO_TIMEOUT + 5)
    out: list = [None] * n

    def body(i: int) -> None:
        try:
            work(i, barrier, out)
        except (OSError, ValueError, threading.BrokenBarrierError) as exc:
            out[i] = f"{type(exc).__name__}: {exc}"
            barrier.abort()

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + duration + RUN_GRACE
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():        # its socket times out by itself; this run is lost
            raise BenchError(f"a client thread did not finish within {duration + RUN_GRACE:.0f} s")
    for i, o in enumerate(out):
        if isinstance(o, str):
            run.failed(o)
        elif o is None:
            run.failed(f"connection {i} did not report")
    return [o for o in out if isinstance(o, tuple)]


def _moved(work, conns: int, duration: float, run: TunnelRun) -> tuple[int, float | None]:
    """`work` on `conns` threads, each leaving (start, end, bytes): the bytes they moved and
    the MiB/s over the whole span, first start to last end (None if none finished)."""
    done = _threads(work, conns, duration, run)
    if not done:
        return 0, None
    moved = sum(b for _, _, b in done)
    return moved, moved / (1 << 20) / (max(e for _, e, _ in done) - min(s for s, _, _ in done))


def upload(target: Target, conns: int, duration: float, run: TunnelRun) -> None:
    def work(i, barrier, out):
        with _open(target, "sink") as s:
            view = memoryview(BLOCK)
            barrier.wait()
            start = time.monotonic()
            deadline, sent = start + duration, 0
            while time.monotonic() < deadline:     # bounded by the deadline
                sent += s.send(view)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while not reply.endswith(b"\n") and len(reply) < 32:   # the sink's count
                piece = s.recv(64)
                if not piece:
                    break
                reply += piece
            end = time.monotonic()
        if not reply.endswith(b"\n"):
            raise ValueError(f"the sink's count did not come back (got {reply!r}): is the "
                             f"half-close passed on?")
        if int(reply) != sent:
            raise ValueError(f"the sink got {int(reply)} bytes, {sent} were sent")
        out[i] = (start, end, sent)
    run.upload_bytes, run.upload_mib_s = _moved(work, conns, duration, run)


def download(target: Target, conns: int, duration: float, run: TunnelRun) -> None:
    def work(i, barrier, out):
        buf = memoryview(bytearray(len(BLOCK)))
        with _open(target, "source") as s:
            barrier.wait()
            s.sendall(b"g")            # the source starts now, not before the clock
            start = time.monotonic()
            deadline, got = start + duration, 0
            while time.monotonic() < deadline:      # bounded by the deadline
                n = s.recv_into(buf)
                if n == 0:
                    raise ValueError(f"the source closed after {got} bytes")
                got += n
            end = time.monotonic()
        out[i] = (start, end, got)
    run.download_bytes, run.download_mib_s = _moved(work, conns, duration, run)


def echo(target: Target, rounds: int, duration: float, run: TunnelRun) -> None:
    def work(i, barrier, out):
        rtts: list[float] = []
        buf = memoryview(bytearray(ECHO_BYTES))
        with _open(target, "echo") as s:
            barrier.wait()
            deadline = time.monotonic() + duration
            for k in range(ECHO_WARMUP + rounds):           # bounded by the count ...
                if time.monotonic() > deadline:              # ... and by the deadline
                    break
                msg = (b"%08d" % k) * (ECHO_BYTES // 8)
                t0 = time.perf_counter_ns()
                s.sendall(msg)
                got = 0
                while got < ECHO_BYTES:
                    n = s.recv_into(buf[got:])
                    if n == 0:
                        raise ValueError(f"closed during round trip {k}")
                    got += n
                t1 = time.perf_counter_ns()
                if buf != msg:
                    raise ValueError(f"round trip {k} came back as {bytes(buf)[:16]!r}...")
                if k >= ECHO_WARMUP:
                    rtts.append((t1 - t0) / 1e6)
        out[i] = (rtts,)
    done = _threads(work, 1, duration, run)
    if done:
        rtts = sorted(done[0][0])
        run.echo_rounds = len(rtts)
        run.p50_ms, run.p99_ms = percentile(rtts, 50), percentile(rtts, 99)


def run_cell(target: Target, conns: int, duration: float, rounds: int = ECHO_ROUNDS
             ) -> TunnelRun:
    run = TunnelRun()
    upload(target, conns, duration, run)
    download(target, conns, duration, run)
    echo(target, rounds, duration, run)
    return run


def sanity_check_tunnels(targets: dict[str, dict[str, Target]]) -> None:
    """A short cell through every target (also its warm-up): every byte counted and echoed."""
    for wl, by_target in targets.items():
        for name, target in by_target.items():
            r = run_cell(target, 2, 0.2, rounds=20)
            if r.errors or not r.upload_bytes or not r.download_bytes or not r.echo_rounds:
                raise BenchError(f"{wl} {name}: sanity check on port {target.port} failed: "
                                 f"{'; '.join(r.error_samples) or 'no bytes'}")


def shown(r: TunnelRun) -> str:
    def mib(v):
        return "-" if v is None else f"{v:,.1f}"
    text = (f"up {mib(r.upload_mib_s)} MiB/s, down {mib(r.download_mib_s)} MiB/s, echo p50 "
            f"{format_ms(r.p50_ms)} p99 {format_ms(r.p99_ms)} ({r.echo_rounds} round trips)")
    if r.errors:
        text += f", {r.errors} errors ({'; '.join(r.error_samples)})"
    return text
