"""The connection cap derived from the file-descriptor limit, in a real process."""

from __future__ import annotations

import resource
import select

from conftest import RawReader, connect

HARD_LIMIT = 160      # descriptors the balancer process may have
POOL_IDLE = 2         # pool.max_idle for the one backend


def _low_fd_limit():
    resource.setrlimit(resource.RLIMIT_NOFILE, (HARD_LIMIT, HARD_LIMIT))


def _get(sock) -> int:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    return RawReader(sock).response().status


def test_balancer_reports_the_granted_limit_and_pauses_accepting_at_the_cap(
        start_backend, start_lb):
    backend = start_backend()
    lb = start_lb([backend.url], preexec_fn=_low_fd_limit, pool={"max_idle": POOL_IDLE})
    lb.wait_for_line(rf"RLIMIT_NOFILE: asked 65536, hard limit {HARD_LIMIT}, .*granted {HARD_LIMIT}")
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
        readable, _, _ = select.select([extra], [], [], 1.0)
        assert not readable, "a connection beyond the cap was served"
        lb.wait_for_line(rf"pausing accept: {cap} connections open, at the cap \({cap}\)")

        # A connection closes: accepting resumes and the waiting one is served.
        held.pop().close()
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
