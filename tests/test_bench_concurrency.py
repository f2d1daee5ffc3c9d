"""python -m bench.concurrency: argument checks, and one short real run end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import concurrency

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv, says", [
    (["--concurrency", "0"], "from 1 to 2000"),
    (["--concurrency", "abc"], "'abc' is not a whole number"),
    (["--concurrency", "10,,20"], "comma-separated"),
    (["--concurrency", "10,10"], "listed twice"),
    (["--policies", "nope"], "unknown policy 'nope'"),
    (["--policies", "haproxy"], "not a balancer policy"),
    (["--duration", "-1"], "--duration must be more than 0"),
    (["--duration", "0"], "--duration must be more than 0"),
    (["--duration", "nan"], "--duration must be more than 0"),
    (["--backends", "0"], "--backends must be from 1 to 64"),
    (["--slots", "x"], "--slots must be a whole number"),
    (["--oom-at", "-2"], "--oom-at must be from 0"),
    (["--time-scale", "2"], "--time-scale must be more than 0 and at most 1"),
    (["--lb", "ftp://127.0.0.1:6095"], "--lb wants http://HOST:PORT"),
    (["--lb", "http://127.0.0.1:6095/synthesize"], "no path"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_arguments_exit_2_with_a_clear_message(argv, says, capsys):
    with pytest.raises(SystemExit) as exc:
        concurrency.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert says in err, err
    assert "python -m bench.concurrency: error:" in err


def test_bad_arguments_from_the_command_line():
    out = subprocess.run([sys.executable, "-m", "bench.concurrency", "--concurrency", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "--concurrency: each level must be from 1 to 2000 callers, got 0" in out.stderr


def test_fleet_options_are_noted_as_ignored_with_lb():
    args = concurrency.parse_args(["--lb", "http://127.0.0.1:6095", "--backends", "3",
                                   "--spillover", "--concurrency", "5"])
    assert args.lb == ("http", "127.0.0.1", 6095)
    assert args.ignored == ["--backends", "--spillover"]
    assert args.time_scale == 1.0 and args.duration == concurrency.DEFAULT_DURATION_LB
    assert concurrency.parse_args([]).ignored == []


def _our_processes(marker: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmd and "bench.concurrency" not in cmd:
            found.append(f"{pid}: {cmd}")
    return found


def test_a_short_run_prints_the_table_and_writes_results(tmp_path):
    out_dir = tmp_path / "results"
    seed = 700_000 + os.getpid() % 1000   # its simulated servers carry --seed SEED+i
    argv = [sys.executable, "-m", "bench.concurrency", "--duration", "1.5",
            "--concurrency", "2,3", "--policies", "least_conn,random-nolimit",
            "--backends", "2", "--no-haproxy", "--seed", str(seed), "--results", str(out_dir)]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=90,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "time     : the simulated world runs at 20x real time" in text
    assert "haproxy  : not run (--no-haproxy)" in text
    header = next(line for line in text.splitlines() if line.startswith("target "))
    for column in ("callers", "calls", "errors", "p50", "p95", "p99", "crashes", "retries",
                   "cartesia", "peak"):
        assert column in header
    rows = [line.split() for line in text.splitlines()
            if line.startswith(("least_conn ", "random, no limit "))]
    assert len(rows) == 4
    assert f"results: {out_dir}/" in text
    # the non-TTY progress: a line per run
    assert "bench: [1/4] least_conn, 2 callers" in out.stderr
    assert "bench: [4/4] random, no limit, 3 callers" in out.stderr

    doc = json.loads((out_dir / "results.json").read_text())
    assert doc["meta"]["seed"] == seed and doc["meta"]["backends"] == 2
    assert doc["meta"]["concurrency"] == [2, 3]
    assert doc["not_run"] == {"haproxy": "--no-haproxy"}
    got = sorted((r["target"], r["concurrency"]) for r in doc["results"])
    assert got == [("least_conn", 2), ("least_conn", 3), ("random-nolimit", 2),
                   ("random-nolimit", 3)]
    for r in doc["results"]:
        calls = r["calls"]
        assert calls["completed"] > 0 and calls["errors"] == 0, r
        for what in ("latency_ms", "ttfa_ms", "extra_ms"):
            p = calls[what]
            assert 0 < p["p50"] <= p["p95"] <= p["p99"], (what, p)
        assert calls["ttfa_ms"]["p50"] <= calls["latency_ms"]["p50"]
        assert r["backend_crashes"] == 0          # 3 callers cannot overload one server
        assert isinstance(r["retries"], int) and isinstance(r["cartesia_calls"], int)
        assert 1 <= r["peak_gpu_in_flight"] <= 3
        assert len(r["fleet_stats"]["per_backend"]) == 2
    assert (out_dir / "lb-least_conn.toml").exists()
    if importlib.util.find_spec("matplotlib") is None:
        assert "no latency.png" in text
    else:
        assert (out_dir / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # everything it started is gone
    assert _our_processes(f"--seed {seed}") == []
