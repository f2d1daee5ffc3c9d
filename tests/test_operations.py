"""Operations with real processes and sockets: worker processes on one port
(--workers / listen.workers), draining on SIGTERM, reloading on SIGHUP.

Every wait is bounded; everything listens on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import time
import urllib.request

import pytest

from conftest import (Balancer, Process, RawReader, connect, get_json, lb_config,
                      wait_until)

STREAM_CHUNKS, STREAM_SIZE = 10, 1000


# --- helpers


@pytest.fixture
def run_lb(tmp_path, http_engine):
    """Start `python -m lb -c FILE`; returns (Balancer, config path).

    At the end: SIGTERM (if still running), then no traceback in the output;
    worker processes a supervisor left behind are killed by pid.
    """
    started: list[Balancer] = []

    def start(backends: list, **sections) -> tuple[Balancer, "os.PathLike"]:
        path = tmp_path / f"lb{len(started)}.toml"
        path.write_text(lb_config(backends, **sections))
        balancer = Balancer(path, http=http_engine)
        started.append(balancer)
        return balancer, path

    yield start
    for balancer in started:
        workers = children(balancer.proc.pid)
        balancer.stop()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        output = balancer.output()
        assert "Traceback" not in output and "Exception in" not in output, output


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie whose descriptors are already closed)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, dict, bytes]:
    """One request on a fresh connection: (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def backend_port(port: int, path: str = "/item") -> int:
    status, headers, _ = get(port, path)
    assert status == 200, status
    return int(headers["x-backend-port"])


def worker_stats(port: int, want: set[int], tries: int = 200) -> dict[int, dict]:
    """/lb-stats from fresh connections until every worker number in `want`
    has answered: {worker: snapshot} (the last answer of each)."""
    seen: dict[int, dict] = {}
    for _ in range(tries):
        stats = get_json(port, "/lb-stats")
        seen[stats["worker"]] = stats
        if want <= set(seen):
            return seen
    raise AssertionError(f"workers {sorted(want)} not all seen in {tries} connections: "
                         f"{sorted(seen)}")


def ready(lb: Balancer, workers: int = 1) -> dict[int, dict]:
    """Every process has answered a request.  Signal handlers are installed
    before the event loop first runs, so from then on a signal is handled
    (see test_a_signal_during_start_up_kills_nothing for the time before)."""
    return worker_stats(lb.port, {1, 2} if workers == 2 else {0})


def count_lines(lb: Balancer, pattern: str, start: int = 0) -> int:
    regex = re.compile(pattern)
    return sum(1 for line in lb.output().splitlines()[start:] if regex.search(line))


def expected_stream(chunks: int = STREAM_CHUNKS, size: int = STREAM_SIZE) -> bytes:
    return b"".join((b"chunk-%d|" % i + b"." * size)[:size] for i in range(chunks))


def read_until(sock: socket.socket, buf: bytes, marker: bytes) -> bytes:
    while marker not in buf:
        data = sock.recv(65536)
        assert data, f"connection closed before {marker!r}; got {buf[-200:]!r}"
        buf += data
    return buf


def start_stream(port: int, chunks: int = STREAM_CHUNKS, size: int = STREAM_SIZE,
                 delay: float = 0.2, timeout: float = 10.0) -> tuple[socket.socket, bytes, int]:
    """A /stream request that has started arriving (head and the first two
    chunks read): (socket, bytes read so far, the backend's port)."""
    sock = connect(port, timeout=timeout)
    sock.sendall(f"GET /stream?chunks={chunks}&size={size}&delay={delay} HTTP/1.1\r\n"
                 "Host: x\r\n\r\n".encode())
    received = read_until(sock, b"", b"chunk-1|")
    match = re.search(rb"\r\nx-backend-port: *(\d+)", received, re.IGNORECASE)
    assert match, received[:500]
    return sock, received, int(match.group(1))


def finish_stream(sock: socket.socket, received: bytes):
    reader = RawReader(sock)
    reader.buf = received
    return reader.response()


def assert_eof(sock: socket.socket, within: float = 3.0) -> None:
    """The balancer closes this connection (FIN, nothing more) within `within` s."""
    sock.settimeout(within)
    try:
        data = sock.recv(65536)
    except socket.timeout:
        raise AssertionError(f"connection still open {within}s later") from None
    except ConnectionResetError:
        return
    assert data == b"", data


def assert_refused(port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        connect(port, timeout=2).close()


def assert_clean_exit(lb: Balancer, timeout: float = 5.0) -> str:
    try:
        code = lb.proc.wait(timeout)
    except Exception:
        raise AssertionError(f"still running {timeout}s later:\n{lb.output()}") from None
    lb._reader.join(5)
    output = lb.output()
    assert code == 0, f"exit code {code}:\n{output}"
    assert "Traceback" not in output and "Exception in" not in output, output
    return output


# --- 1, 2: worker processes


def test_workers_share_one_port_and_both_answer(start_backend, run_lb):
    backend = start_backend()
    lb, _ = run_lb([backend.url], listen={"workers": 2})
    for number in (1, 2):
        lb.wait_for_line(rf"worker {number}: listening on 127\.0\.0\.1:{lb.port}\b")
    seen: dict[int, set[int]] = {}
    for _ in range(40):   # a new connection each time: the kernel spreads them
        stats = get_json(lb.port, "/lb-stats")
        seen.setdefault(stats["worker"], set()).add(stats["pid"])
    assert set(seen) == {1, 2}, seen
    pids = seen[1] | seen[2]
    assert len(pids) == 2 and all(len(p) == 1 for p in seen.values()), seen
    assert lb.proc.pid not in pids
    assert all(ppid(pid) == lb.proc.pid for pid in pids)   # forked by the supervisor
    # Proxying works through both, too.
    backend.reset_stats()
    for _ in range(20):
        assert backend_port(lb.port) == backend.port
    assert backend.stats()["requests_total"] == 20


def test_workers_split_each_backends_limit(start_backend, run_lb):
    """Two workers, a backend limit of 4: each worker takes 2 of its slots,
    so 16 calls at once never put more than 4 on the backend (each worker
    holding its own 4 put up to 8 there)."""
    from concurrent.futures import ThreadPoolExecutor
    backend = start_backend()
    lb, _ = run_lb([{"url": backend.url, "max_concurrency": 4}], listen={"workers": 2},
                   balancer={"queue_timeout": 30})
    started = [lb.wait_for_line(rf"worker {number}: listening on ") for number in (1, 2)]
    backend.reset_stats()

    def call(_):
        conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=30)
        try:
            conn.request("GET", "/slow?delay=0.4")
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, range(16)))
    assert answers == [(200, b"ok\n")] * 16
    stats = backend.stats()
    assert stats["requests_total"] == 16
    assert 2 <= stats["max_requests_in_flight"] <= 4, stats
    assert all("(limit 4, 2 in this worker of 2)" in line.string for line in started), started
    snap = {s["worker"]: s for s in (get_json(lb.port, "/lb-stats") for _ in range(20))}
    for worker in snap.values():
        (b0,) = worker["backends"]
        assert (b0["max_concurrency"], b0["process_limit"]) == (4, 2), b0
    with urllib.request.urlopen(f"http://127.0.0.1:{lb.port}/metrics", timeout=5) as resp:
        assert 'tts_lb_backend_process_limit{backend="b0"} 2' in resp.read().decode()


def test_a_killed_worker_is_restarted_and_requests_keep_succeeding(start_backend, run_lb):
    backend = start_backend()
    lb, _ = run_lb([backend.url], listen={"workers": 2})
    before = {n: s["pid"] for n, s in worker_stats(lb.port, {1, 2}).items()}
    victim = before[1]
    mark = len(lb.lines)
    failures: list[str] = []
    answered: list[tuple[int, int]] = []

    def one_round() -> None:
        try:
            stats = get_json(lb.port, "/lb-stats")
            answered.append((stats["worker"], stats["pid"]))
            status, headers, body = get(lb.port, "/item")
            if status != 200 or body != b"ok\n":
                failures.append(f"{status} {body[:100]!r}")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            failures.append(repr(exc))

    for _ in range(10):
        one_round()
    # Killed between requests, and the next request waits until the process
    # is gone: a connection the kernel had queued on the dying worker's own
    # listening socket at that instant is reset with it
    # (net.ipv4.tcp_migrate_req=0), which no balancer can prevent.
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not alive(victim), timeout=5, what="the killed worker to be gone")
    lb.wait_for_line(rf"worker 1 \(pid {victim}\) ended with signal SIGKILL: starting it again",
                     start=mark, timeout=5)
    # Requests all along: the other worker serves alone until the new one is up.
    deadline = time.monotonic() + 10
    while not any(w == 1 and p != victim for w, p in answered):
        assert time.monotonic() < deadline, f"no new worker 1 answered: {answered[-20:]}"
        one_round()
    for _ in range(20):
        one_round()
    assert not failures, failures
    after = {n: s["pid"] for n, s in worker_stats(lb.port, {1, 2}).items()}
    assert after[2] == before[2]                 # the other worker was left alone
    assert after[1] != victim and alive(after[1]) and ppid(after[1]) == lb.proc.pid
    assert victim not in {p for w, p in answered[-20:]}
    lb.wait_for_line(rf"worker 1: listening on 127\.0\.0\.1:{lb.port}\b", start=mark)
    assert count_lines(lb, r"starting it again", mark) == 1


# --- 3, 4, 5: SIGTERM drains


def test_sigterm_finishes_the_stream_refuses_new_connections_and_exits_0(start_backend, run_lb):
    backend = start_backend()
    lb, _ = run_lb([backend.url], listen={"drain_timeout": 10})
    idle = connect(lb.port)   # a keep-alive connection between requests
    idle.sendall(b"GET /item HTTP/1.1\r\nHost: x\r\n\r\n")
    assert RawReader(idle).response().status == 200
    sock, received, _ = start_stream(lb.port)
    mark = len(lb.lines)
    sent = time.monotonic()
    lb.proc.send_signal(signal.SIGTERM)
    lb.wait_for_line(r"draining: 1 request\(s\) under way", start=mark, timeout=5)
    assert_refused(lb.port)
    assert_eof(idle)           # idle: closed at once
    idle.close()
    resp = finish_stream(sock, received)
    assert resp.status == 200 and resp.complete, (resp.status, len(resp.body))
    assert resp.body == expected_stream()
    assert time.monotonic() - sent > 1.0   # it really was under way at the signal
    sock.close()
    output = assert_clean_exit(lb)
    assert re.search(r"\bdrained\b", output) and "drain timeout" not in output, output


def test_sigterm_to_the_supervisor_drains_every_worker(start_backend, run_lb):
    backend = start_backend()
    lb, _ = run_lb([backend.url], listen={"workers": 2, "drain_timeout": 10})
    workers = {n: s["pid"] for n, s in worker_stats(lb.port, {1, 2}).items()}
    sock, received, _ = start_stream(lb.port)
    mark = len(lb.lines)
    lb.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: count_lines(lb, r"draining: ", mark) == 2, timeout=5,
               what="both workers to start draining")
    assert_refused(lb.port)
    resp = finish_stream(sock, received)
    assert resp.status == 200 and resp.complete, (resp.status, len(resp.body))
    assert resp.body == expected_stream()
    sock.close()
    output = assert_clean_exit(lb, timeout=10)
    assert count_lines(lb, r"\bdrained\b", mark) == 2, output
    assert "starting it again" not in output and "drain timeout" not in output, output
    assert "supervisor: all workers stopped" in output
    assert not any(alive(pid) for pid in workers.values())


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_closes_a_keep_alive_connection_once_its_response_is_done(
        start_backend, run_lb, workers):
    # The stream's head went out before the signal, so it does not say
    # Connection: close; the client keeps the connection open, as keep-alive
    # clients (connection pools) do.  Once the response is over the balancer
    # must close it itself: nothing else is under way, and waiting for the
    # client would hold the drain up to drain_timeout for nothing.
    backend = start_backend()
    lb, _ = run_lb([backend.url], listen={"workers": workers, "drain_timeout": 6})
    ready(lb, workers)
    sock, received, _ = start_stream(lb.port)
    mark = len(lb.lines)
    lb.proc.send_signal(signal.SIGTERM)
    resp = finish_stream(sock, received)
    assert resp.status == 200 and resp.complete, (resp.status, len(resp.body))
    try:
        assert_eof(sock)
    finally:
        sock.close()
    output = assert_clean_exit(lb)
    assert count_lines(lb, r"\bdrained\b", mark) == workers, output
    assert "drain timeout" not in output, output


def test_drain_timeout_cuts_what_remains_and_exits_0(start_backend, run_lb):
    backend = start_backend()
    lb, _ = run_lb([backend.url], listen={"drain_timeout": 0.5})
    sock, received, _ = start_stream(lb.port, chunks=20)   # ~4 s in all
    mark = len(lb.lines)
    sent = time.monotonic()
    lb.proc.send_signal(signal.SIGTERM)
    resp = finish_stream(sock, received)
    cut_after = time.monotonic() - sent
    sock.close()
    assert resp.status == 200 and not resp.complete
    assert 0 < len(resp.body) < 20 * STREAM_SIZE
    assert expected_stream(20).startswith(resp.body)
    assert 0.4 < cut_after < 2.5, cut_after
    lb.wait_for_line(r"drain timeout \(listen\.drain_timeout 0\.5s\): cutting 1 request",
                     start=mark, timeout=2)
    output = assert_clean_exit(lb)
    assert not re.search(r"\bdrained\b", output), output


def test_a_second_sigterm_stops_at_once(start_backend, run_lb):
    backend = start_backend()
    lb, _ = run_lb([backend.url], listen={"drain_timeout": 30})
    sock, received, _ = start_stream(lb.port, chunks=50)   # ~10 s in all
    mark = len(lb.lines)
    lb.proc.send_signal(signal.SIGTERM)
    lb.wait_for_line(r"draining: ", start=mark, timeout=5)
    # A repeat within a second is taken for the same signal arriving twice
    # (sent to the process group and forwarded): the second one comes later.
    time.sleep(1.2)
    sent = time.monotonic()
    lb.proc.send_signal(signal.SIGTERM)
    resp = finish_stream(sock, received)
    sock.close()
    assert not resp.complete and time.monotonic() - sent < 2.0
    lb.wait_for_line(r"second signal: stopping now with 1 request", start=mark, timeout=2)
    assert_clean_exit(lb)


# --- 6, 7, 8: SIGHUP reloads


def test_sighup_with_a_bad_file_keeps_the_running_configuration(start_backend, run_lb):
    backend = start_backend()
    lb, path = run_lb([backend.url], balancer={"policy": "p2c"})
    ready(lb)
    good = path.read_text()
    # Broken TOML, then valid TOML with a bad value: both rejected, with the reason.
    for text, reason in (("[listen\naddress = \n", r"TOML syntax error"),
                         (good.replace(backend.url, "ftp://127.0.0.1:1"),
                          r"backend \"b0\"\.url: scheme must be http")):
        path.write_text(text)
        mark = len(lb.lines)
        lb.proc.send_signal(signal.SIGHUP)
        match = lb.wait_for_line(
            r"reload refused, still running the previous configuration: (.*)", start=mark,
            timeout=5)
        assert re.search(reason, match.group(1)), match.group(0)
        assert lb.proc.poll() is None
        for _ in range(5):
            assert backend_port(lb.port) == backend.port
        stats = lb.stats()
        assert stats["policy"] == "p2c"
        assert [(b["name"], b["url"]) for b in stats["backends"]] == [("b0", backend.url)]
        assert count_lines(lb, r"reloaded: ", mark) == 0
    # A good file after that still applies.
    path.write_text(good.replace('"p2c"', '"random"'))
    mark = len(lb.lines)
    lb.proc.send_signal(signal.SIGHUP)
    lb.wait_for_line(r"reloaded: 1 backend\(s\); policy random", start=mark, timeout=5)
    assert lb.stats()["policy"] == "random"


def test_sighup_adds_a_backend_and_drains_a_removed_one(start_backend, run_lb):
    a, b = start_backend(), start_backend()
    balancing = {"policy": "round_robin"}
    lb, path = run_lb([a.url], balancer=balancing)
    assert {backend_port(lb.port) for _ in range(4)} == {a.port}

    path.write_text(lb_config([a.url, b.url], balancer=balancing))
    mark = len(lb.lines)
    lb.proc.send_signal(signal.SIGHUP)
    lb.wait_for_line(r"reloaded: 2 backend\(s\), added b1; policy round_robin", start=mark,
                     timeout=5)
    ports = [backend_port(lb.port) for _ in range(10)]
    assert b.port in ports and a.port in ports, ports
    assert [x["name"] for x in lb.stats()["backends"]] == ["b0", "b1"]

    # A stream on b1, then b1 is removed while it runs.
    for _ in range(6):
        sock, received, port = start_stream(lb.port)
        if port == b.port:
            break
        sock.close()
    else:
        raise AssertionError("no stream went to the added backend")
    path.write_text(lb_config([a.url], balancer=balancing))
    mark = len(lb.lines)
    lb.proc.send_signal(signal.SIGHUP)
    lb.wait_for_line(r"reloaded: 1 backend\(s\), removed b1 \(draining\); policy round_robin",
                     start=mark, timeout=5)
    b_requests = b.stats()["requests_total"]
    assert [x["name"] for x in lb.stats()["backends"]] == ["b0"]
    ports = [backend_port(lb.port) for _ in range(10)]
    assert set(ports) == {a.port}, ports
    resp = finish_stream(sock, received)
    sock.close()
    assert resp.status == 200 and resp.complete, (resp.status, len(resp.body))
    assert resp.body == expected_stream()
    ports = [backend_port(lb.port) for _ in range(10)]
    assert set(ports) == {a.port}, ports
    assert b.stats()["requests_total"] == b_requests   # nothing new went to b1
    stats = lb.stats()
    assert [x["name"] for x in stats["backends"]] == ["b0"]
    assert stats["requests"]["under_way"] == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_applies_a_new_limit_and_policy(start_backend, run_lb, workers):
    backend = start_backend()
    listen = {"workers": workers}
    lb, path = run_lb([{"url": backend.url, "max_concurrency": 4}], listen=listen,
                      balancer={"policy": "least_conn"})
    numbers = {1, 2} if workers == 2 else {0}
    for stats in ready(lb, workers).values():
        assert stats["policy"] == "least_conn"
        assert stats["backends"][0]["max_concurrency"] == 4
    path.write_text(lb_config([{"url": backend.url, "max_concurrency": 7}], listen=listen,
                              balancer={"policy": "round_robin"}))
    mark = len(lb.lines)
    lb.proc.send_signal(signal.SIGHUP)    # the supervisor passes it on to every worker
    wait_until(lambda: count_lines(lb, r"reloaded: 1 backend\(s\); policy round_robin",
                                   mark) == workers,
               timeout=5, what=f"{workers} reloaded line(s)")
    for stats in worker_stats(lb.port, numbers).values():
        assert stats["policy"] == "round_robin"
        assert stats["backends"][0]["max_concurrency"] == 7
        # (each of 2 workers holds it to its share: floor(7 / 2))
        assert stats["backends"][0]["limit_now"] == 7 // workers
    assert backend_port(lb.port) == backend.port
    assert lb.proc.poll() is None and "starting it again" not in lb.output()


def test_a_worker_started_again_after_a_reload_runs_the_reloaded_configuration(
        start_backend, run_lb):
    backend = start_backend()
    listen = {"workers": 2}
    lb, path = run_lb([{"url": backend.url, "max_concurrency": 4}], listen=listen,
                      balancer={"policy": "least_conn"})
    victim = ready(lb, 2)[1]["pid"]
    path.write_text(lb_config([{"url": backend.url, "max_concurrency": 7}], listen=listen,
                              balancer={"policy": "round_robin"}))
    mark = len(lb.lines)
    lb.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: count_lines(lb, r"reloaded: .*policy round_robin", mark) == 2,
               timeout=5, what="both workers to reload")
    os.kill(victim, signal.SIGKILL)
    lb.wait_for_line(rf"worker 1 \(pid {victim}\) ended with signal SIGKILL", start=mark,
                     timeout=5)
    lb.wait_for_line(rf"worker 1: listening on 127\.0\.0\.1:{lb.port}\b", start=mark,
                     timeout=5)
    deadline = time.monotonic() + 10
    while True:
        stats = worker_stats(lb.port, {1})[1]
        if stats["pid"] != victim:
            break
        assert time.monotonic() < deadline, "the restarted worker 1 never answered"
    # The file on disk and every other worker say round_robin and 7: a worker
    # that comes back must not quietly serve the configuration of the start.
    assert (stats["policy"], stats["backends"][0]["max_concurrency"]) == ("round_robin", 7), \
        f"restarted worker runs policy {stats['policy']}, max_concurrency " \
        f"{stats['backends'][0]['max_concurrency']}"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_signal_during_start_up_kills_nothing(start_backend, tmp_path, workers):
    # systemd may send SIGHUP (ExecReload) or SIGTERM at any moment after
    # starting the service.  A process must not die of a signal's default
    # action because its handler is not installed yet: not the single
    # process right after it says "listening on", not a worker the
    # supervisor has just forked (the supervisor passes the signal on to it).
    backend = start_backend()
    path = tmp_path / "lb.toml"
    path.write_text(lb_config([backend.url], listen={"workers": workers}))
    # The moment to signal: the single process has said "listening on"; the
    # supervisor has forked its workers (which are still starting).
    ready_line = (r"listening on 127\.0\.0\.1:(\d+)" if workers == 1
                  else r"supervisor \d+: 2 workers on port (\d+)")
    numbers = {1, 2} if workers == 2 else {0}
    for attempt in range(5):   # the single process' window is a few ms wide
        lb = Process(["-m", "lb", "-c", str(path)])
        try:
            port = int(lb.wait_for_line(ready_line).group(1))
            lb.proc.send_signal(signal.SIGHUP)
            # Settled once every process answers, or the balancer has died.
            deadline = time.monotonic() + 5
            while lb.proc.poll() is None and time.monotonic() < deadline:
                try:
                    worker_stats(port, numbers, tries=20)
                    break
                except (OSError, AssertionError):
                    time.sleep(0.05)
            time.sleep(0.2)
            output = lb.output()
            assert lb.proc.poll() is None, \
                f"attempt {attempt}: SIGHUP at start-up ended the balancer " \
                f"(exit {lb.proc.returncode}):\n{output}"
            assert "ended with signal SIGHUP" not in output, \
                f"attempt {attempt}: SIGHUP at start-up killed a worker:\n{output}"
        finally:
            workers_left = children(lb.proc.pid)
            lb.stop()
            for pid in workers_left:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)



def test_sigterm_to_the_whole_process_group_still_drains_every_worker(start_backend, tmp_path):
    # systemd stopping a unit, or Ctrl-C in a terminal, signals every process
    # of the group: each worker gets it directly and again from the
    # supervisor.  That is one request to drain, not two (which would cut).
    backend = start_backend()
    path = tmp_path / "group.toml"
    path.write_text(lb_config([backend.url], listen={"workers": 2}))
    lb = Process(["-m", "lb", "-c", str(path)], start_new_session=True)
    try:
        port = int(lb.wait_for_line(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        wait_until(lambda: len(lb.lines) and sum("listening on" in line for line in lb.lines) >= 2,
                   what="both workers listening")
        streams = [start_stream(port, chunks=8, size=100, delay=0.25) for _ in range(4)]
        os.killpg(lb.proc.pid, signal.SIGTERM)
        for sock, received, _ in streams:
            resp = finish_stream(sock, received)
            sock.close()
            assert resp.complete and len(resp.body) == 800, (resp.complete, len(resp.body))
        assert lb.proc.wait(10) == 0
        assert "second signal" not in lb.output(), lb.output()
    finally:
        if lb.proc.poll() is None:
            os.killpg(lb.proc.pid, signal.SIGKILL)
        lb.stop()
