"""bench.concurrency's output without running a bench: where results go, real-world seconds,
and a plot on which an overloaded target cannot look best."""

from __future__ import annotations

import importlib.util

import pytest

from bench import concurrency
from bench.callers import Call, summarize_calls
from bench.plot import not_served_shares, trouble, write_plot
from bench.report import results_dir
from bench.world import real_per_wall


def test_results_go_under_the_current_directory_never_beside_the_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = concurrency.parse_args([])
    first = results_dir(args, "20250101-120000")
    assert first == tmp_path / "bench-results" / "concurrency-20250101-120000"
    first.mkdir(parents=True)
    # a second run in the same second keeps both
    assert results_dir(args, "20250101-120000").name == "concurrency-20250101-120000-2"
    mine = tmp_path / "elsewhere"
    assert results_dir(concurrency.parse_args(["--results", str(mine)])) == mine


def test_results_option_names_a_file_or_a_missing_parent_precisely(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    for value, says in ((tmp_path / "f", "exists and is not a directory"),
                        (tmp_path / "no" / "such", "does not exist")):
        with pytest.raises(SystemExit) as exc:
            concurrency.parse_args(["--results", str(value)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"--results {value}: " in err and says in err, err


def test_latencies_are_also_given_in_real_world_seconds():
    calls = [Call(started=0.0, ok=True, latency=0.25, ttfa=0.2, ideal=0.2),
             Call(started=0.0, ok=True, latency=0.5, ttfa=0.45, ideal=0.3),
             Call(started=0.0, error="timeout")]
    s = summarize_calls(calls, 3.0, real_per_wall=20.0)
    assert s["latency_ms"]["p50"] == 250.0 and s["latency_real_s"]["p50"] == 5.0
    assert s["latency_real_s"]["max"] == 10.0 and s["ttfa_real_s"]["p95"] == 9.0
    assert s["extra_real_s"]["p50"] == pytest.approx(1.0)
    assert s["errors"] == 1 and s["errors_by_kind"] == {"timeout": 1}
    # the simulated fleet runs 1/time-scale times too fast; a running balancer does not
    assert real_per_wall(concurrency.parse_args(["--time-scale", "0.05"])) == 20.0
    assert real_per_wall(concurrency.parse_args(["--lb", "http://127.0.0.1:6095",
                                                 "--time-scale", "0.05"])) == 1.0


def _row(label, n, p50, crashes=0, cartesia=0, errors=0, completed=100):
    lat = {"p50": p50, "p95": p50 * 2, "p99": p50 * 3, "mean": p50, "max": p50 * 3}
    return {"target": label, "label": label, "concurrency": n, "backend_crashes": crashes,
            "cartesia_calls": cartesia,
            "calls": {"started": completed + errors, "completed": completed, "errors": errors,
                      "latency_real_s": lat, "ttfa_real_s": lat}}


def test_a_run_that_crashed_servers_or_leaned_on_cartesia_is_flagged():
    assert trouble(_row("p2c", 40, 5.0)) == []
    assert trouble(_row("random, no limit", 40, 1.5, crashes=15, cartesia=98, errors=2)) == [
        "15 crashes", "98% Cartesia", "2 failed"]
    assert trouble(_row("x", 40, 5.0, cartesia=9)) == []          # under 10 %: the fleet's
    assert not_served_shares(_row("x", 40, 5.0, cartesia=50, errors=25, completed=75)) == (
        50.0, 25.0)


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="no matplotlib")
def test_the_plot_is_written_for_fleet_and_external_runs(tmp_path):
    rows = [_row(t, n, 5.0 + n / 10) for n in (10, 20, 40)
            for t in ("random", "least_conn", "p2c", "haproxy")]
    rows += [_row("random, no limit", 10, 5.0), _row("random, no limit", 20, 5.0, crashes=5),
             _row("random, no limit", 40, 1.5, crashes=15, cartesia=98, errors=4)]
    path = tmp_path / "latency.png"
    assert write_plot(rows, path, "test", "seconds (real-world)", "x20") is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one = [_row("balancer", 5, 2.0) | {"backend_crashes": None, "cartesia_calls": 3}]
    assert write_plot(one, tmp_path / "one.png", "test", "seconds (wall clock)", "as measured",
                      crashes_known=False) is None
    assert (tmp_path / "one.png").stat().st_size > 0


def test_throughput_json_without_a_path_goes_under_the_current_directory(tmp_path, monkeypatch):
    from bench import throughput
    monkeypatch.chdir(tmp_path)
    bare = throughput.parse_args(["--json", "--skip-haproxy"])
    path = tmp_path / "bench-results"
    assert bare.json.startswith(f"{path}/throughput-") and bare.json.endswith(".json")
    assert bare.skip_haproxy
    assert throughput.parse_args(["--json", "mine.json"]).json == "mine.json"
    assert throughput.parse_args([]).json is None
