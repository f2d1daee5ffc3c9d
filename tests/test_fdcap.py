"""The connection cap derived from the file-descriptor limit, in a real process."""

from __future__ import annotations

import os
import resource
import select
import time

from conftest import RawReader, connect

SOFT_LIMIT = 64       # what the balancer starts with...
HARD_LIMIT = 160      # ...and may raise itself to
POOL_IDLE = 2         # pool.max_idle for the one backend


def _low_fd_limit():
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT_LIMIT, HARD_LIMIT))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _get(sock) -> int:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    return RawReader(sock).response().status


def test_balancer_reports_the_granted_limit_and_pauses_accepting_at_the_cap(
        start_backend, start_lb):
    backend = start_backend()
    lb = start_lb([backend.url], preexec_fn=_low_fd_limit, pool={"max_idle": POOL_IDLE})
    lb.wait_for_line(rf"RLIMIT_NOFILE: asked 65536, hard limit {HARD_LIMIT}, "
                     rf"was {SOFT_LIMIT}, granted {HARD_LIMIT}")
    cap = int(lb.wait_for_line(r"connection cap: (\d+) client connections").group(1))
    assert 0 < cap * 2 + POOL_IDLE < HARD_LIMIT

    held = []
    try:
        for _ in range(cap):
            sock = connect(lb.port)
            assert _get(sock) == 200     # accepted and served; stays open (keep-alive)
            held.append(sock)

        # One more: the kernel completes the handshake (listen backlog), but
        # the balancer does not accept it while at the cap.
        extra = connect(lb.port)
        extra.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        cpu_before = _cpu_seconds(lb.proc.pid)
        readable, _, _ = select.select([extra], [], [], 1.0)
        assert not readable, "a connection beyond the cap was served"
        lb.wait_for_line(rf"pausing accept: {cap} connections open, at the cap \({cap}\)")
        # Paused means not watching the listening socket: no accept storm
        # spinning on the waiting connection.
        cpu_at_cap = _cpu_seconds(lb.proc.pid) - cpu_before
        assert cpu_at_cap < 0.3, f"balancer used {cpu_at_cap:.2f}s of CPU in 1s while at the cap"

        # A connection closes: accepting resumes at once (no one-second
        # back-off) and the waiting one is served.
        held.pop().close()
        closed_at = time.monotonic()
        readable, _, _ = select.select([extra], [], [], 5.0)
        waited = time.monotonic() - closed_at
        assert readable and waited < 0.5, f"waiting connection served {waited:.2f}s after a close"
        resp = RawReader(extra).response()
        assert resp.status == 200 and resp.body == b"ok\n"
        lb.wait_for_line(r"resuming accept")
        held.append(extra)

        assert lb.proc.poll() is None, "balancer died at the cap"
    finally:
        for sock in held:
            sock.close()
    stats = lb.stats()["connections"]
    assert stats["max"] == cap and stats["accept_pauses"] >= 1 and stats["accepting"]
    assert stats["accepted"] >= cap + 1
    assert "Traceback" not in lb.output()
