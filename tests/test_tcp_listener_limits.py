"""[[tcp]] listeners at their limits: the queue in front of max_connections
(waiting, queue_timeout, queue_limit = 0), a dead backend ejected while
clients keep being served, its recovery through connect checks, and the
config mistakes `--check` names."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, connect, tcp_port, wait_until
from test_tcp_listener import (IO_TIMEOUT, echoed, exchange, listener, recv_exactly,  # noqa: F401
                               start_echo, tcp_backend, tcp_stats)


def closed_by_balancer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Did the peer end the connection (EOF or reset) within `timeout`?"""
    sock.settimeout(timeout)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def holding(port: int) -> socket.socket:
    """A client that has reached the backend (its bytes came back) and stays open."""
    sock = connect(port, IO_TIMEOUT)
    sock.sendall(b"first")
    assert recv_exactly(sock, 5) == b"first"
    return sock


@pytest.fixture
def one_slot(start_lb, backend, start_echo):
    """start(**listener keys) -> (balancer, port, echo): one echo backend, max_connections = 1."""
    def start(**keys):
        echo = start_echo()
        balancer = start_lb([backend.url], tcp=[listener(
            "q", [{"name": "e0", "address": f"127.0.0.1:{echo.port}", "max_connections": 1}],
            **keys)])
        return balancer, tcp_port(balancer, "q"), echo
    return start


# --- the queue


def test_a_second_client_waits_for_the_slot(one_slot):
    balancer, port, echo = one_slot(queue_timeout=30.0)
    first = holding(port)
    with connect(port, IO_TIMEOUT) as second:
        second.sendall(b"second")
        wait_until(lambda: tcp_stats(balancer, "q")["queue"]["length"] == 1,
                   what="the second client queued")
        second.settimeout(0.5)
        with pytest.raises(socket.timeout):    # not answered while the first holds the slot
            second.recv(1)
        first.close()
        second.settimeout(IO_TIMEOUT)
        assert recv_exactly(second, 6) == b"second"
        second.shutdown(socket.SHUT_WR)
        assert second.recv(100) == b"\n6\n"
    queue = tcp_stats(balancer, "q")["queue"]
    # dispatched counts those that waited, then got a slot: the second only
    assert queue["dispatched"] == 1 and queue["timed_out"] == 0 and queue["rejected_full"] == 0
    echo.wait_for_line(r"^accepted 2 open 1$")        # the backend never had two at once
    assert tcp_backend(balancer, "q", "e0")["peak"] == 1


def test_queue_timeout_closes_a_waiting_client(one_slot):
    balancer, port, echo = one_slot(queue_timeout=0.5)
    first = holding(port)
    try:
        with connect(port, IO_TIMEOUT) as second:
            second.sendall(b"second")
            assert closed_by_balancer(second), "the waiting client was not closed"
        wait_until(lambda: tcp_stats(balancer, "q")["queue"]["timed_out"] == 1,
                   what="queue timed_out = 1")
        balancer.wait_for_line(r"tcp=q .*ended=queue_timeout")
        first.sendall(b"still")                        # the holder is untouched
        assert recv_exactly(first, 5) == b"still"
    finally:
        first.close()
    assert echo.output().count("accepted") == 1, echo.output()


def test_queue_limit_0_closes_at_once(one_slot):
    """No room in a queue of 0: closed at once, not after queue_timeout (30 s
    here, far beyond the 5 s the client waits)."""
    balancer, port, echo = one_slot(queue_limit=0, queue_timeout=30.0)
    first = holding(port)
    try:
        with connect(port, IO_TIMEOUT) as second:
            second.sendall(b"second")
            assert closed_by_balancer(second), "the client beyond the queue was not closed"
        queue = wait_until(lambda: (lambda q: q if q["rejected_full"] == 1 else None)(
            tcp_stats(balancer, "q")["queue"]), what="queue rejected_full = 1")
        assert queue["timed_out"] == 0 and queue["length"] == 0, queue
        balancer.wait_for_line(r"tcp=q .*ended=queue_full")
    finally:
        first.close()


# --- a dead backend


def test_a_dead_backend_is_ejected_and_clients_keep_succeeding(start_lb, backend, start_echo):
    """No active checks: connect failures alone (retried on the other
    backend) eject it, for long enough that it stays out for the test."""
    echoes = [start_echo(), start_echo()]
    balancer = start_lb(
        [backend.url], tcp=[listener("ej", [(f"e{i}", e.port) for i, e in enumerate(echoes)],
                                     policy="round_robin")],
        **{"health.passive": {"consecutive_failures": 1, "base_ejection": 60.0,
                              "max_ejection": 120.0}})
    port = tcp_port(balancer, "ej")
    echoes[1].stop()
    for i in range(6):
        data = f"while e1 is dead {i}".encode()
        assert exchange(port, data) == echoed(data)
    dead, alive = tcp_backend(balancer, "ej", "e1"), tcp_backend(balancer, "ej", "e0")
    assert dead["connect_failures"] >= 1 and dead["ejections"] >= 1, dead
    assert dead["in_rotation"] is False and alive["in_rotation"] is True, (dead, alive)
    assert dead["state"] != alive["state"], (dead, alive)
    assert alive["total"] == 6, alive


def test_a_restarted_backend_comes_back_through_connect_checks(start_lb, backend, start_echo):
    echoes = [start_echo(), start_echo()]
    dead_port = echoes[1].port
    balancer = start_lb(
        [backend.url], tcp=[listener("rec", [(f"e{i}", e.port) for i, e in enumerate(echoes)],
                                     policy="round_robin", check="connect")],
        **{"health.active": {"interval": 0.2, "timeout": 0.5, "rise": 1, "fall": 1},
           "health.passive": {"consecutive_failures": 1, "base_ejection": 0.5,
                              "max_ejection": 1.0}})
    port = tcp_port(balancer, "rec")
    wait_until(lambda: all(b["in_rotation"] for b in tcp_stats(balancer, "rec")["backends"]),
               what="both backends up")
    echoes[1].stop()
    for i in range(4):                                 # served whether or not e1 is out yet
        data = f"while e1 is dead {i}".encode()
        assert exchange(port, data) == echoed(data)
    wait_until(lambda: not tcp_backend(balancer, "rec", "e1")["in_rotation"],
               what="e1 out of rotation")
    before = tcp_backend(balancer, "rec", "e1")["total"]
    revived = start_echo(dead_port)
    assert revived.port == dead_port
    wait_until(lambda: tcp_backend(balancer, "rec", "e1")["in_rotation"], timeout=10,
               what="e1 back in rotation")
    for i in range(6):
        data = f"after the restart {i}".encode()
        assert exchange(port, data) == echoed(data)
    revived.wait_for_line(r"^accepted \d+ open")       # the new server took connections
    wait_until(lambda: tcp_backend(balancer, "rec", "e1")["total"] > before,
               what="e1 counted connections again")


def test_a_backend_that_does_not_accept_in_time_is_skipped(start_lb, backend, start_echo):
    """A server whose accept queue is full (listen(0), one connection
    waiting) never completes a connect: after timeouts.connect the try goes
    to the other backend, and the access log names both."""
    echo = start_echo()
    with socket.socket() as stuck:
        stuck.bind(("127.0.0.1", 0))
        stuck.listen(0)
        filler = connect(stuck.getsockname()[1])     # fills the queue; never accepted
        try:
            balancer = start_lb(
                [backend.url], tcp=[listener("slow", [("stuck", stuck.getsockname()[1]),
                                                      ("e0", echo.port)], policy="round_robin")],
                timeouts={"connect": 0.5},
                **{"health.passive": {"consecutive_failures": 1, "base_ejection": 60.0,
                                      "max_ejection": 120.0}})
            port = tcp_port(balancer, "slow")
            for i in range(4):
                data = f"past the stuck one {i}".encode()
                assert exchange(port, data) == echoed(data)
            stuck_stats = tcp_backend(balancer, "slow", "stuck")
            assert stuck_stats["failures"]["connect_timeout"] == 1, stuck_stats
            assert stuck_stats["in_rotation"] is False and stuck_stats["total"] == 0, stuck_stats
            line = balancer.wait_for_line(r"tcp=slow .*\bbackend=e0 .*total_ms=(\d+).* "
                                          r"ended=client_closed tried=stuck,e0")
            assert int(line.group(1)) >= 500, line.string
        finally:
            filler.close()


# --- --check


BASE = ('[[backend]]\nname = "b0"\nurl = "http://127.0.0.1:6093"\n')
GOOD = ('[[tcp]]\nname = "redis"\naddress = "127.0.0.1:0"\n'
        '[[tcp.backend]]\nname = "r1"\naddress = "127.0.0.1:6379"\n')


def check(tmp_path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "lb.toml"
    path.write_text(BASE + text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTS_LB_")}
    return subprocess.run([sys.executable, "-m", "lb", "--check", "-c", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=20, env=env,
                          stdin=subprocess.DEVNULL)


def test_a_good_tcp_listener_passes_check(tmp_path):
    out = check(tmp_path, GOOD)
    assert out.returncode == 0 and out.stderr == "", out


# (the [[tcp]] tables, how the listener may be named in the message, the words it must hold)
LISTENER = ("tcp[0]", 'tcp "redis"')
BAD = {
    "missing name": ('[[tcp]]\naddress = "127.0.0.1:0"\n'
                     '[[tcp.backend]]\nname = "r1"\naddress = "127.0.0.1:6379"\n',
                     ("tcp[0]",), ["name"]),
    "bad address": (GOOD.replace('address = "127.0.0.1:0"', 'address = "nohost"'),
                    LISTENER, ["address"]),
    "unknown key": (GOOD.replace('name = "redis"\n', 'name = "redis"\nbogus = 1\n'),
                    LISTENER, ["bogus"]),
    "duplicate name": (GOOD + GOOD, ("tcp[1]", 'tcp "redis"'), ["name", "duplicate"]),
    "backend without address": (GOOD.replace('address = "127.0.0.1:6379"\n', ""),
                                LISTENER, ["backend", "r1", "address"]),
    "bad policy": (GOOD.replace('name = "redis"\n', 'name = "redis"\npolicy = "fastest"\n'),
                   LISTENER, ["policy"]),
    "max_connections -1": (GOOD + "max_connections = -1\n",
                           LISTENER, ["backend", "r1", "max_connections"]),
    "no backends": ('[[tcp]]\nname = "redis"\naddress = "127.0.0.1:0"\n',
                    LISTENER, ["backend"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_tcp_table_is_one_error_naming_the_key(tmp_path, case):
    text, listener_names, words = BAD[case]
    out = check(tmp_path, text)
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "config error" in lines[0], out.stderr
    assert any(name in lines[0] for name in listener_names), lines[0]
    assert all(word in lines[0] for word in words), lines[0]
