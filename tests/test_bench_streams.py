"""bench.throughput's streams workload and --http: the client's chunked parser (sans-io), the
options, and tiny real rounds through a balancer per engine (bench code end to end).

No wall-time assertions: the delays must be there, non-negative and ordered, and every chunk
accounted for; how small they are is the benchmark's business, not the test's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from bench.processes import Services
from bench.streams import ChunkedRecords, FramingError, record
from bench.throughput import parse_args
from bench.throughput_clients import Result
from bench.throughput_report import format_table, ratios, summarize
from bench.throughput_streams import (added_delays, format_streams_table, run_round,
                                      start_stream_targets, summarize_streams)

ROOT = Path(__file__).resolve().parent.parent
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
TINY = ["--workloads", "streams", "--streams", "5", "--stream-chunks", "3",
        "--stream-interval-ms", "10", "--repeat", "1", "--skip-haproxy"]


def _chunked(payloads: list[bytes], trailers: bytes = b"") -> bytes:
    return HEAD + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in payloads) + b"0\r\n" + \
        trailers + b"\r\n"


def _feed_in_pieces(data: bytes, cuts: list[int]) -> tuple[list[bytes], ChunkedRecords]:
    parser, out, last = ChunkedRecords(), [], 0
    for cut in sorted(set(cuts)) + [len(data)]:
        out += parser.feed(data[last:cut])
        last = cut
    return out, parser


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=8),
       st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=6),
       st.lists(st.integers(min_value=0, max_value=2000), max_size=40))
def test_records_survive_any_reframing_and_any_tcp_split(sizes, chunk_lengths, cuts):
    # records of various sizes, re-framed into chunks of other sizes (as a proxy may), and
    # the bytes split anywhere (as TCP may): the same records come out, once each
    records = [record(i, 16 + n) for i, n in enumerate(sizes)]
    body = b"".join(records)
    chunks, i = [], 0
    while i < len(body):
        step = chunk_lengths[len(chunks) % len(chunk_lengths)]
        chunks.append(body[i:i + step])
        i += step
    data = _chunked(chunks, trailers=b"x-trailer: 1\r\n")
    out, parser = _feed_in_pieces(data, [c % (len(data) + 1) for c in cuts])
    assert out == [r[:-1] for r in records]
    assert parser.done
    assert [int(r.split(b" ")[0]) for r in out] == list(range(len(records)))


def test_chunk_extensions_and_upper_case_sizes_are_read():
    data = HEAD + b"5;name=value\r\nab\ncd\r\nA\r\n\n12345678\n\r\n0\r\n\r\n"
    parser = ChunkedRecords()
    assert parser.feed(data) == [b"ab", b"cd", b"12345678"]   # "cd" spans two chunks
    assert parser.done


@pytest.mark.parametrize("data, says", [
    (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n", "status 502"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab\n", "not chunked"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x status line"),
    (HEAD + b"zz\r\nab\n\r\n0\r\n\r\n", "bad chunk size"),
    (HEAD + b"-3\r\nab\n\r\n0\r\n\r\n", "bad chunk size"),
    (HEAD + b"2\r\nab\n\r\n0\r\n\r\n", "longer than its size"),
    (HEAD + b"3\r\nab\n\r\n0\r\n\r\nHTTP/1.1", "after the end"),
    (HEAD + b"2\r\nab\r\n0\r\n\r\n", "inside a record"),
])
def test_bad_framing_is_named(data, says):
    with pytest.raises(FramingError, match=says):
        _feed_in_pieces(data, [len(data) // 2])


def test_http_and_workloads_options():
    assert parse_args([]).engines == ["httptools", "h11"]
    assert parse_args([]).workloads == ["small", "large", "streams"]
    assert parse_args(["--http", "h11"]).engines == ["h11"]
    assert parse_args(["--workloads", "streams,small"]).workloads == ["small", "streams"]


@pytest.mark.parametrize("argv, says", [
    (["--http", "auto"], "invalid choice: 'auto'"),
    (["--workloads", "small,nope"], "unknown workload 'nope'"),
    (["--workloads", "large,large"], "workload 'large' listed twice"),
    (["--workloads", "streams", "--profile"], "add small to --workloads"),
    (["--streams", "0"], "--streams must be between 1 and 2000"),
    (["--stream-chunks", "1000", "--stream-interval-ms", "1000"], "at most 600 s"),
])
def test_bad_options_exit_2_naming_the_option(argv, says, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


def test_each_engine_has_its_row_and_its_ratio_to_haproxy():
    def small(rps):
        return [Result(rps=rps, p50_ms=1.0, p99_ms=2.0)]
    summary = {"small": {"direct": summarize(small(1000)), "lb-httptools": summarize(small(400)),
                         "lb-h11": summarize(small(200)), "haproxy": summarize(small(800))}}
    rat = ratios(summary, ["httptools", "h11"])
    assert rat["lb-httptools/haproxy"]["small_rps"] == 0.5
    assert rat["lb-h11/haproxy"]["small_rps"] == 0.25
    assert rat["lb-h11/direct"]["small_rps"] == 0.2
    assert rat["lb-h11/haproxy"]["large_mib_s"] is None        # large was not run
    meta = {"connections": 50, "body_mib": 100, "large_connections": 4}
    table = format_table(summary, rat, meta, {}, ["httptools", "h11"], ["small"])
    rows = {line.split()[0]: line.split() for line in table.splitlines()
            if re.match(r"\s+lb-\w+\s+\d", line)}          # the balancers' rows (no label)
    assert rows["lb-httptools"][-1] == "0.50" and rows["lb-h11"][-1] == "0.25", table
    assert "large MiB/s" not in table


def _check_figures(summary: dict, added: dict, targets: list[str], expected: int) -> None:
    for target in targets:
        s = summary[target]
        assert s["received"] == s["expected"] == expected, s      # every chunk accounted for
        assert s["errors"] == 0, s
        assert 0 <= s["p50_ms"] <= s["p99_ms"] <= s["max_ms"], s
    for target in targets[1:]:
        assert isinstance(added[target]["p50_added_ms"], float)
        assert isinstance(added[target]["p99_added_ms"], float)


def test_a_tiny_streams_round_through_each_engine(tmp_path):
    args = parse_args(TINY)
    services = Services(tmp_path)
    try:
        ports = start_stream_targets(services, tmp_path, args, with_haproxy=False)
        for engine in ("httptools", "h11"):   # each balancer really runs its engine
            log = (tmp_path / f"lb-{engine}-streams.log").read_text()
            assert re.search(rf"engine\W+{engine}\b", log), log
        runs = {t: [run_round(port, 5, 3, 10, args.stream_chunk_bytes)]
                for t, port in ports.items()}
    finally:
        services.stop_all()
    assert list(runs) == ["direct", "lb-httptools", "lb-h11"]
    summary = {t: summarize_streams(r) for t, r in runs.items()}
    added = added_delays(summary)
    _check_figures(summary, added, list(runs), expected=15)
    meta = {"streams": {"streams": 5, "chunks": 3, "interval_ms": 10,
                        "chunk_bytes": args.stream_chunk_bytes}}
    table = format_streams_table(summary, added, meta, args.engines,
                                 {"haproxy": "--skip-haproxy"})
    for target in runs:
        assert re.search(rf"^{target}\s+\d[\d.]* (us|ms)\s.*\s15/15\s+0\b", table, re.M), table
    assert re.search(r"^target: p99 added <= 1\.00 ms: lb-httptools [+-]\d.* (met|NOT met), "
                     r"lb-h11 [+-]\d", table, re.M), table
    assert re.search(r"^haproxy\s+not run \(--skip-haproxy\)", table, re.M), table


def test_the_streams_workload_from_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.throughput", *TINY, "--http", "h11",
                          "--json", str(tmp_path / "r.json")],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "lb-h11" in out.stdout and "lb-httptools" not in out.stdout, out.stdout
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["meta"]["engines"] == ["h11"]
    summary = doc["summary"]["streams"]
    assert list(summary) == ["direct", "lb-h11"] and list(doc["summary"]) == ["streams"]
    _check_figures(summary, doc["streams_added"], ["direct", "lb-h11"], expected=15)
    assert [r["received"] for r in doc["runs"]["streams"]["lb-h11"]] == [15]
    assert list(tmp_path.iterdir()) == [tmp_path / "r.json"]   # nothing else left behind
