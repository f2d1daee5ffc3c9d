"""bench.throughput's tunnel and tcp workloads: the bulk server's protocol (real sockets), the
options, the report's arithmetic and layout (sans-io), and a one-second run of each workload
from the command line through the balancers and HAProxy mode tcp.

No wall-time assertions: the bytes must all arrive and be counted, the rows be there and the
MiB/s positive; how fast is the benchmark's business, not the test's.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager

import pytest

from bench.bulk_server import UPGRADE_ANSWER
from bench.throughput import parse_args
from bench.throughput_report import compare_tunnel, format_tunnel_table, summarize_tunnel
from bench.throughput_tunnel import Target, TunnelRun, run_cell
from conftest import ROOT, Server, connect

UPGRADE = b"GET /%s HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: bulk\r\n\r\n"


@pytest.fixture
def bulk_port():
    server = Server("bench.bulk_server")
    try:
        yield server.port
    finally:
        server.stop()


def _read_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:            # bounded: n bytes, or the socket's timeout
        piece = s.recv(n - len(data))
        if not piece:
            break
        data += piece
    return data


def _read_all(s: socket.socket, limit: int = 1 << 16) -> bytes:
    data = b""
    while len(data) < limit and (piece := s.recv(4096)):
        data += piece
    return data


@contextmanager
def _opened(port: int, mode: bytes, upgrade: bool):
    """A connection to the bulk server in `mode`, asked the tunnel's way (an upgrade head,
    whose exact 101 is checked) or the tcp way (a mode line, no answer)."""
    with connect(port, timeout=10) as s:
        if upgrade:
            s.sendall(UPGRADE % mode)
            assert _read_exactly(s, len(UPGRADE_ANSWER)) == UPGRADE_ANSWER
        else:
            s.sendall(mode + b"\n")
        yield s


@pytest.mark.parametrize("upgrade", [False, True])
def test_sink_counts_every_byte_and_answers_at_the_half_close(bulk_port, upgrade):
    with _opened(bulk_port, b"sink", upgrade) as s:
        for _ in range(5):
            s.sendall(b"x" * 100_001)
        s.shutdown(socket.SHUT_WR)
        assert _read_all(s) == b"500005\n"


@pytest.mark.parametrize("upgrade", [False, True])
def test_source_waits_for_go_then_streams(bulk_port, upgrade):
    with _opened(bulk_port, b"source", upgrade) as s:
        s.settimeout(0.3)
        with pytest.raises(socket.timeout):      # nothing before the "go" byte
            s.recv(1)
        s.settimeout(10)
        s.sendall(b"g")
        data = _read_exactly(s, 3 << 20)
        assert len(data) == 3 << 20
        assert data[:256] == bytes(range(256))


@pytest.mark.parametrize("upgrade", [False, True])
def test_echo_writes_back_what_it_reads(bulk_port, upgrade):
    with connect(bulk_port, timeout=10) as s:
        # the head and the first bytes in one write: what follows the head is already body
        s.sendall((UPGRADE % b"echo" if upgrade else b"echo\n") + b"hello")
        if upgrade:
            assert _read_exactly(s, len(UPGRADE_ANSWER)) == UPGRADE_ANSWER
        assert _read_exactly(s, 5) == b"hello"
        for k in range(20):
            msg = b"%064d" % k
            s.sendall(msg)
            assert _read_exactly(s, 64) == msg


@pytest.mark.parametrize("first, status", [
    (b"GET /sink HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),                 # no upgrade headers
    (b"GET /nope HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n", b"400"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", b"200"),
    (b"flood\n", b"400"),
    (b"PUT / HTTP/1.1\r\n\r\n", b"400"),
])
def test_anything_else_is_answered_and_closed(bulk_port, first, status):
    with connect(bulk_port, timeout=10) as s:
        s.sendall(first)
        answer = _read_all(s)
    assert answer.split(b" ")[1] == status, answer


def test_a_cell_against_the_bulk_server_directly(bulk_port):
    # the client end to end, both ways of opening: every byte counted by the sink (run_cell
    # checks that itself), bytes downloaded, round trips checked
    for upgrade in (False, True):
        r = run_cell(Target(bulk_port, upgrade), conns=2, duration=0.3, rounds=50)
        assert r.errors == 0, r.error_samples
        assert r.upload_bytes > 0 and r.download_bytes > 0 and r.echo_rounds == 50
        assert r.upload_mib_s > 0 and r.download_mib_s > 0
        assert 0 < r.p50_ms <= r.p99_ms


def test_a_cell_says_what_failed_when_nothing_listens():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]     # closed when the block ends: nothing listens there
    r = run_cell(Target(port, True), conns=2, duration=0.2, rounds=5)
    assert r.errors == 5 and r.upload_mib_s is None and r.p50_ms is None
    assert all("ConnectionRefusedError" in e for e in r.error_samples), r.error_samples


def test_tunnel_and_tcp_options():
    assert parse_args([]).workloads == ["small", "large", "streams"]   # default unchanged
    assert parse_args(["--workloads", "tcp,tunnel"]).workloads == ["tunnel", "tcp"]
    assert parse_args(["--workloads", "tcp,small"]).workloads == ["small", "tcp"]
    assert parse_args([]).tunnel_connections == 4
    assert parse_args(["--tunnel-connections", "8"]).tunnel_connections == 8


@pytest.mark.parametrize("argv, says", [
    (["--tunnel-connections", "0"], "--tunnel-connections must be between 1 and 64"),
    (["--workloads", "tcp,tcp"], "workload 'tcp' listed twice"),
])
def test_bad_tunnel_options_exit_2(argv, says, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


def test_the_summary_is_the_median_of_the_repeats():
    runs = [TunnelRun(upload_mib_s=up, download_mib_s=down, p50_ms=p50, p99_ms=p99,
                      echo_rounds=n, errors=e)
            for up, down, p50, p99, n, e in [(300, 900, 0.04, 0.20, 5000, 0),
                                             (100, 700, 0.06, 0.10, 5000, 0),
                                             (200, None, 0.05, 0.30, 4000, 2)]]
    s = summarize_tunnel(runs)
    assert (s["upload_mib_s"], s["download_mib_s"]) == (200, 800)   # None: a run that failed
    assert (s["p50_ms"], s["p99_ms"]) == (0.05, 0.20)
    assert (s["errors"], s["echo_rounds"]) == (2, 14000)
    assert s["upload_mib_s_runs"] == [300, 100, 200]
    assert s["download_mib_s_runs"] == [900, 700, None]


def test_the_report_compares_with_haproxy_and_direct():
    def run(up, down, p50, p99):
        return [TunnelRun(upload_mib_s=up, download_mib_s=down, p50_ms=p50, p99_ms=p99,
                          echo_rounds=100)]
    summary = {"direct": summarize_tunnel(run(2000, 3000, 0.05, 0.10)),
               "lb-h11": summarize_tunnel(run(450, 300, 0.15, 0.40)),
               "haproxy": summarize_tunnel(run(500, 600, 0.08, 0.20))}
    compared = compare_tunnel(summary)
    assert compared["lb-h11"]["upload_x_haproxy"] == 0.9
    assert compared["lb-h11"]["download_x_haproxy"] == 0.5
    assert compared["lb-h11"]["p99_added_ms"] == pytest.approx(0.30)
    assert compared["haproxy"]["p50_added_ms"] == pytest.approx(0.03)
    assert "upload_x_haproxy" not in compared["haproxy"] and "direct" not in compared
    meta = {"duration_s": 3, "tunnel": {"connections": 4, "echo_rounds": 5000,
                                        "echo_bytes": 64}}
    table = format_tunnel_table("tunnel", summary, compared, meta, {})
    assert re.search(r"^lb-h11\s+450\.0\s+300\.0\s+0\.90\s+0\.50\s+150 us\s+400 us\s+"
                     r"\+100 us\s+\+300 us\s+0\b", table, re.M), table
    assert re.search(r"^target: >= 0\.90x haproxy MiB/s: lb-h11 upload 0\.90 met, "
                     r"lb-h11 download 0\.50 NOT met$", table, re.M), table
    no_haproxy = {t: s for t, s in summary.items() if t != "haproxy"}
    table = format_tunnel_table("tcp", no_haproxy, compare_tunnel(no_haproxy), meta,
                                {"haproxy": "--skip-haproxy"})
    assert re.search(r"^haproxy\s+not run \(--skip-haproxy\)", table, re.M), table
    assert "lb-h11 upload -, lb-h11 download -" in table


_ROW = re.compile(r"^(\S+)\s+([\d,]+\.\d)\s+([\d,]+\.\d)\s", re.M)


def _rows(stdout: str, workload: str) -> dict[str, tuple[float, float]]:
    """{target: (upload MiB/s, download MiB/s)} from the workload's table."""
    section = stdout.split(f"\n{workload}: ", 1)[1].split("\ntarget: ", 1)[0]
    return {m.group(1): (float(m.group(2).replace(",", "")), float(m.group(3).replace(",", "")))
            for m in _ROW.finditer(section)}


# What a user reads: the rows in order, every cell's bytes and round trips there and checked
# (errors 0), ratios to HAProxy and added latencies filled in.  --duration 1 (its least):
# each cell is a second up, a second down, then the round trips.
EXPECTED_ROWS = {"tunnel": ["direct", "lb-httptools", "lb-h11", "haproxy"],
                 "tcp": ["direct", "lb", "haproxy"]}


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
@pytest.mark.parametrize("workload", ["tunnel", "tcp"])
def test_the_workload_from_the_command_line(tmp_path, workload):
    out = subprocess.run([sys.executable, "-m", "bench.throughput", "--workloads", workload,
                          "--duration", "1", "--repeat", "1", "--tunnel-connections", "2",
                          "--json", str(tmp_path / "r.json")],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = _rows(out.stdout, workload)
    assert list(rows) == EXPECTED_ROWS[workload], out.stdout
    assert all(up > 0 and down > 0 for up, down in rows.values()), out.stdout
    first_lb = EXPECTED_ROWS[workload][1]
    assert re.search(rf"^target: >= 0\.90x haproxy MiB/s: {first_lb} upload \d\.\d\d "
                     rf"(met|NOT met), {first_lb} download \d", out.stdout, re.M), out.stdout
    doc = json.loads((tmp_path / "r.json").read_text())
    assert list(doc["summary"]) == [workload]
    for target, s in doc["summary"][workload].items():
        assert s["errors"] == 0, (target, doc["runs"][workload][target])
        assert s["echo_rounds"] > 0 and 0 < s["p50_ms"] <= s["p99_ms"], (target, s)
    compared = doc["tunnel_compared"][workload]
    assert list(compared) == EXPECTED_ROWS[workload][1:]
    for target, c in compared.items():
        assert c["p50_added_ms"] is not None and c["p99_added_ms"] is not None, (target, c)
        if target != "haproxy":
            assert c["upload_x_haproxy"] > 0 and c["download_x_haproxy"] > 0, (target, c)
    assert list(tmp_path.iterdir()) == [tmp_path / "r.json"]   # nothing else left behind
