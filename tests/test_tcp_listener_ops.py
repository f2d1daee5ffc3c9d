"""[[tcp]] listeners under operations: SIGHUP adding, removing and
reconfiguring listeners while a connection stays open, SIGTERM letting an
open connection run until listen.drain_timeout and then cutting it, and
check = "http" taking a backend out of the rotation and back."""

from __future__ import annotations

import signal

import pytest

from conftest import connect, get_json, lb_config, tcp_port, wait_until
from test_tcp_listener import (IO_TIMEOUT, echoed, exchange, listener, recv_exactly,
                               start_echo, tcp_backend, tcp_stats)  # noqa: F401
from test_tcp_listener_limits import closed_by_balancer, holding


def refused(port: int) -> bool:
    try:
        connect(port, 1.0).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sighup_adds_removes_and_reconfigures_listeners(start_lb, backend, start_echo, tmp_path):
    e0, e1 = start_echo(), start_echo()
    listeners = [listener("kept", [("e0", e0.port)]), listener("gone", [("e0", e0.port)])]
    balancer = start_lb([backend.url], tcp=listeners)
    kept_port, gone_port = tcp_port(balancer, "kept"), tcp_port(balancer, "gone")
    held = holding(gone_port)
    try:
        mark = len(balancer.lines)
        (tmp_path / "lb0.toml").write_text(lb_config(
            [backend.url], tcp=[listener("kept", [("e1", e1.port)], policy="round_robin"),
                                listener("new", [("e0", e0.port)])]))
        balancer.proc.send_signal(signal.SIGHUP)
        balancer.wait_for_line(r"reloaded: ", start=mark, timeout=5)
        new_port = int(balancer.wait_for_line(r"tcp new: listening on 127\.0\.0\.1:(\d+)",
                                              start=mark, timeout=5).group(1))
        assert {t["name"] for t in balancer.stats()["tcp"]} == {"kept", "new"}
        kept = tcp_stats(balancer, "kept")
        assert kept["port"] == kept_port and kept["policy"] == "round_robin", kept
        assert [b["name"] for b in kept["backends"]] == ["e1"], kept
        assert exchange(kept_port, b"to e1") == echoed(b"to e1")     # same port, new backend
        e1.wait_for_line(r"^accepted 1 open 1$")
        assert exchange(new_port, b"to new") == echoed(b"to new")
        assert refused(gone_port)                                     # no longer accepting ...
        held.sendall(b"still")                                        # ... but this runs on
        assert recv_exactly(held, 5) == b"still"
    finally:
        held.close()
    balancer.wait_for_line(r"tcp=gone .*\bbackend=e0 .*ended=client_closed", timeout=5)


def test_sigterm_lets_a_connection_run_until_drain_timeout_then_cuts_it(
        start_lb, backend, start_echo):
    echo = start_echo()
    balancer = start_lb([backend.url], tcp=[listener("d", [("e0", echo.port)])],
                        listen={"drain_timeout": 1.5})
    port = tcp_port(balancer, "d")
    held = holding(port)
    try:
        mark = len(balancer.lines)
        balancer.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: refused(port), what="the tcp listener stopped accepting")
        held.sendall(b"draining")                  # still carried while the drain waits
        assert recv_exactly(held, 8) == b"draining"
        assert closed_by_balancer(held, timeout=5), "not cut at the drain timeout"
    finally:
        held.close()
    balancer.wait_for_line(r"tcp=d .*\bbackend=e0 .*ended=shutdown", start=mark, timeout=5)
    assert balancer.proc.wait(10) == 0, balancer.output()


@pytest.mark.parametrize("health_port", ["own", "other"])
def test_an_http_check_takes_a_backend_out_and_brings_it_back(start_lb, backend, start_echo,
                                                             health_port):
    """check = "http" with the echo HTTP backend answering /health: on the
    backend's own address (an HTTP backend behind a [[tcp]] listener) or on
    health_port beside a raw echo server."""
    if health_port == "own":
        target, keys = backend.port, {}
    else:
        target, keys = start_echo().port, {"health_port": backend.port}
    balancer = start_lb(
        [backend.url], tcp=[listener("h", [("e0", target)], check="http",
                                     health_path="/health", **keys)],
        **{"health.active": {"interval": 0.2, "timeout": 1.0, "rise": 1, "fall": 1}})
    port = tcp_port(balancer, "h")
    wait_until(lambda: tcp_backend(balancer, "h", "e0")["in_rotation"], what="e0 up")
    assert get_json(backend.port, "/_mode?health=loading")["health"] == "loading"
    wait_until(lambda: not tcp_backend(balancer, "h", "e0")["in_rotation"], what="e0 down")
    assert tcp_backend(balancer, "h", "e0")["state"] == "down"
    with connect(port, IO_TIMEOUT) as sock:       # nothing in the rotation: closed at once
        assert closed_by_balancer(sock)
    balancer.wait_for_line(r"tcp=h .*\bbackend=- .*ended=no_backend")
    assert get_json(backend.port, "/_mode?health=ready")["health"] == "ready"
    wait_until(lambda: tcp_backend(balancer, "h", "e0")["in_rotation"], what="e0 back")
    if health_port == "other":
        assert exchange(port, b"back") == echoed(b"back")
    else:
        with connect(port, IO_TIMEOUT) as sock:
            sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            assert sock.recv(12).startswith(b"HTTP/1.")


def test_workers_share_a_port_0_listener(start_lb, backend, start_echo):
    """Each worker opens its own SO_REUSEPORT socket: a listener on port 0
    must still be one port, chosen once by the supervisor."""
    echo = start_echo()
    balancer = start_lb([backend.url], tcp=[listener("w", [("e0", echo.port)])],
                        listen={"workers": 2})
    ports = {int(balancer.wait_for_line(rf"worker {n}: tcp w: listening on "
                                        rf"127\.0\.0\.1:(\d+)").group(1)) for n in (1, 2)}
    assert len(ports) == 1, ports
    (port,) = ports
    for i in range(8):
        data = f"through one of two workers {i}".encode()
        assert exchange(port, data) == echoed(data)
