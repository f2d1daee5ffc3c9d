"""python -m bench.concurrency: argument checks, and short real runs end to end.

The runs start from a temporary directory (not the checkout): results must land in
./bench-results/ under the directory the bench is run from, or in --results DIR, and nowhere
near the code.  One run has its stderr on a terminal (a pty), to read the progress bar.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pty
import re
import shutil
import subprocess
import sys
import threading
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
    (["--replicas", "0"], "--replicas must be from 1 to 8"),
    (["--replicas", "9"], "--replicas must be from 1 to 8"),
    (["--no-cluster"], "--no-cluster: only with --replicas 2 or more"),
    (["--replicas", "2", "--lb", "http://127.0.0.1:6095"], "not with --lb"),
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


def _env() -> dict:
    # Run from a temporary directory: the checkout must still be importable.
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _files_beside_the_code() -> set[str]:
    return {str(p.relative_to(ROOT)) for p in (ROOT / "bench").rglob("*")
            if "__pycache__" not in p.parts}


def _run_with_stderr_on_a_terminal(argv: list[str], cwd: Path, timeout: float):
    """(exit code, stdout, what the terminal got): stderr is a pty, stdout a pipe."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, cwd=cwd, env=_env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=slave)
    finally:
        os.close(slave)
    got: list[bytes] = []

    def read():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:        # EIO: the bench has exited and closed its end
                return
            if not data:
                return
            got.append(data)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    finally:
        reader.join(10)
        os.close(master)
    return proc.returncode, out.decode(), b"".join(got).decode(errors="replace")


def _percentages(text: str, pattern: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(pattern, text)]


def _check_real_seconds(doc: dict) -> None:
    """The JSON's *_real_s are the measured wall times undone from the time scale."""
    scale = doc["meta"]["time_scale"]
    assert doc["meta"]["real_per_wall"] == pytest.approx(1 / scale)
    for r in doc["results"]:
        calls = r["calls"]
        for wall, real in (("latency_ms", "latency_real_s"), ("ttfa_ms", "ttfa_real_s"),
                           ("extra_ms", "extra_real_s")):
            for pct in ("p50", "p95", "p99", "mean", "max"):
                # wall ms are rounded to 0.1 ms: 1 ms of real-world time at x20
                assert calls[real][pct] == pytest.approx(calls[wall][pct] / 1e3 / scale,
                                                         abs=0.06e-3 / scale), (real, pct, r)
        # In real-world seconds a call takes at least the GPU's work for the shortest
        # sentence ("Got it.": 7 characters, 0.47 s at 15 a second, rtf 1) ...
        assert calls["latency_real_s"]["p50"] >= 0.45, calls
        # ... and, with nothing overloaded, less than the longest one's (12 s) plus queueing.
        assert calls["latency_real_s"]["max"] < 40, calls


def test_a_short_run_prints_the_table_and_writes_results_under_the_cwd(tmp_path):
    seed = 700_000 + os.getpid() % 1000   # its simulated servers carry --seed SEED+i
    before = _files_beside_the_code()
    argv = [sys.executable, "-m", "bench.concurrency", "--duration", "1.5",
            "--concurrency", "2,3", "--policies", "least_conn,random-nolimit",
            "--backends", "2", "--no-haproxy", "--seed", str(seed)]
    out = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=90, stdin=subprocess.DEVNULL)
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
    made = list((tmp_path / "bench-results").iterdir())
    assert len(made) == 1 and made[0].name.startswith("concurrency-"), made
    out_dir = made[0]
    assert f"results: {out_dir}/" in text
    assert _files_beside_the_code() == before      # nothing written beside the code
    # the non-TTY progress: a line per step, each with the share done, which only grows
    assert "bench: starting the simulated fleet  (0% done" in out.stderr
    assert "bench: [1/4] least_conn, 2 callers  (" in out.stderr
    assert "bench: [4/4] random, no limit, 3 callers  (" in out.stderr
    done = _percentages(out.stderr, r"\((\d+)% done")
    assert len(done) == 5 and done == sorted(done) and done[0] == 0 and done[-1] < 100, done

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
    _check_real_seconds(doc)
    assert (out_dir / "lb-least_conn.toml").exists()
    if importlib.util.find_spec("matplotlib") is None:
        assert "no latency.png" in text
    else:
        assert (out_dir / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # everything it started is gone
    assert _our_processes(f"--seed {seed}") == []


def test_results_option_and_a_progress_bar_that_only_moves_forward(tmp_path):
    """--results DIR gets the files; the terminal's bar never goes back, and ends at 100%."""
    seed = 710_000 + os.getpid() % 1000
    out_dir = tmp_path / "mine"
    argv = [sys.executable, "-m", "bench.concurrency", "--duration", "0.5",
            "--concurrency", "2,3", "--policies", "least_conn", "--backends", "1",
            "--seed", str(seed), "--results", str(out_dir)]   # HAProxy too, when installed
    code, stdout, terminal = _run_with_stderr_on_a_terminal(argv, tmp_path, timeout=90)
    assert code == 0, stdout + terminal
    assert f"results: {out_dir}/" in stdout
    assert (out_dir / "results.json").exists()
    assert not (tmp_path / "bench-results").exists()
    runs = 2 * (1 if "haproxy  : not run" in stdout else 2)
    # the bar: "\r[#####.......]  37%  run 2/4  least_conn, 3 callers  ~4 s left"
    shown = _percentages(terminal, r"\r\[[#.]+\]\s+(\d+)%")
    assert len(shown) >= runs + 2, terminal
    assert shown == sorted(shown), shown          # never backwards
    assert shown[0] == 0 and shown[-1] == 100, shown
    last = "haproxy, 3 callers" if runs == 4 else "least_conn, 3 callers"
    assert f"run {runs}/{runs}  {last}" in terminal
    assert "bench: least_conn, 2 callers: " in terminal  # a run's summary, on a line of its own
    assert _our_processes(f"--seed {seed}") == []


def test_replicas_with_and_without_shared_slots(tmp_path):
    """--replicas 3: the same callers over three balancers, first sharing slots
    through the bench's own redis-server, then each alone.  Servers of 1 slot
    that crash past 1 at once (--oom-at 1): shared, none crashes; alone, three
    replicas may each send one, and the servers crash."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    argv = [sys.executable, "-m", "bench.concurrency", "--replicas", "3", "--duration", "3",
            "--concurrency", "12", "--backends", "2", "--slots", "1", "--oom-at", "1",
            "--seed", "5", "--results", str(tmp_path / "out")]
    out = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=180, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {r["target"]: r for r in
            json.loads((tmp_path / "out" / "results.json").read_text())["results"]}
    shared, alone = rows["replicas-shared"], rows["replicas-alone"]
    assert shared["backend_crashes"] == 0 and max(shared["server_peaks"]) == 1, shared
    assert shared["slot_acquire_ms"]["count"] > 0 and shared["slot_acquire_ms"]["p99"] > 0
    # (a server crashes as it admits the call past --oom-at: that call is never counted
    # among its syntheses at once, the crash is)
    assert alone["backend_crashes"] > 0, alone
    assert alone["slot_acquire_ms"] is None
    table = [line for line in out.stdout.splitlines() if line.startswith("3 replicas ")]
    assert [line.split()[2] for line in table] == ["shared", "alone"], out.stdout
