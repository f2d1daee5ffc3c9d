"""python -m bench.concurrency --api openai: its options, its balancer configs, and one short
real run end to end (a subprocess, from a temporary directory, as tests/test_bench_concurrency
runs the normal bench).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bench import concurrency, openai_api
from lb.control.config import parse

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv, says", [
    (["--api", "grpc"], "invalid choice: 'grpc'"),
    (["--callers", "3"], "--callers: only with --api openai"),
    (["--api", "openai", "--callers", "0"], "--callers must be from 1 to 2000"),
    (["--api", "openai", "--lb", "http://127.0.0.1:6095"], "not with --lb or --replicas"),
    (["--api", "openai", "--replicas", "2"], "not with --lb or --replicas"),
])
def test_bad_arguments_exit_2_with_a_clear_message(argv, says, capsys):
    with pytest.raises(SystemExit) as exc:
        concurrency.main(argv)
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


def test_defaults_and_what_does_not_apply():
    args = concurrency.parse_args(["--api", "openai"])
    assert (args.callers, args.duration) == (openai_api.DEFAULT_CALLERS,
                                             openai_api.DEFAULT_DURATION)
    assert args.ignored == []
    args = concurrency.parse_args(["--api", "openai", "--callers", "4", "--duration", "2",
                                   "--policies", "p2c", "--concurrency", "5"])
    assert (args.callers, args.duration) == (4, 2.0)
    assert args.ignored == ["--policies", "--concurrency"]
    assert concurrency.parse_args([]).duration == 3.0     # the normal bench's default stays


def test_the_texts_are_what_the_table_says():
    assert len(openai_api.SHORT_TEXT) == 60 and openai_api.SHORT_TEXT.count(". ") == 0
    assert len(openai_api.LONG_TEXT) == 2000 and openai_api.LONG_TEXT.count(". ") + 1 == 25


@pytest.mark.parametrize("split", [True, False])
def test_the_balancer_config_is_chatterbox_behind_the_openai_route(split):
    args = argparse.Namespace(time_scale=0.05, rtf=1.0, slots=4)
    config = parse(tomllib.loads(openai_api.lb_config([6101, 6102], args, split)))
    assert [b.api for b in config.backends] == ["chatterbox", "chatterbox"]
    (route,) = config.routes
    assert (route.path, route.kind) == ("/v1/audio/speech", "openai")
    assert route.speech.split.enabled is split          # [route.split] attached to it
    assert route.speech.split.min_chars == 300 and route.speech.split.parallel == 3
    # an unsplit long call must not run into first_byte: 133 s of audio at rtf 1
    assert config.timeouts.first_byte * 20 > 2000 / 15


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _our_processes(marker: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmd and "bench.concurrency" not in cmd:
            found.append(f"{pid}: {cmd}")
    return found


def test_a_short_run_prints_the_four_rows_and_the_ratio(tmp_path):
    """2 servers, 2 callers, 2 s a run, a fast GPU and a 100x world: every combination gets
    calls, none fails, splitting cuts the long text (and only it) and its first audio comes
    sooner than the whole text's."""
    seed = 720_000 + os.getpid() % 1000      # its simulated servers carry --seed SEED+i
    out_dir = tmp_path / "out"
    argv = [sys.executable, "-m", "bench.concurrency", "--api", "openai", "--backends", "2",
            "--callers", "2", "--duration", "2", "--rtf", "0.2", "--time-scale", "0.01",
            "--seed", str(seed), "--results", str(out_dir)]
    out = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    rows = {}
    for line in text.splitlines():
        m = re.match(r"(short|long)\s+(\d+)\s+(on|off)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s", line)
        if m:
            rows[m.group(1), m.group(3)] = [int(v) for v in m.group(2, 4, 5, 6, 7)]
    assert sorted(rows) == [("long", "off"), ("long", "on"), ("short", "off"),
                            ("short", "on")], text
    for (name, split), (chars, callers, calls, errors, pieces) in rows.items():
        assert chars == (2000 if name == "long" else 60) and callers == 2
        assert calls > 0 and errors == 0, (name, split, text)
        assert (pieces > 1) == (name == "long" and split == "on"), (name, split, pieces)
    m = re.search(r"long text, split on / split off: first audio byte p50 ([\d.]+)x", text)
    assert m and float(m.group(1)) < 0.5, text
    assert re.search(r"^summary: splitting the 2,000-character text brought its first audio",
                     text, re.M), text

    doc = json.loads((out_dir / "results.json").read_text())
    assert [(r["text"], r["split"]) for r in doc["results"]] == openai_api.RUNS
    for r in doc["results"]:
        assert r["statuses"] == {"200": r["calls"]["started"]}, r
        assert r["calls"]["ttfa_ms"]["p50"] <= r["calls"]["latency_ms"]["p50"]
        # the whole text was spoken: ~15 characters a second, 48,000 bytes a second of PCM
        assert r["audio_s"] == pytest.approx(r["characters"] / 15, rel=0.02), r
        assert r["backend_crashes"] == 0
    assert doc["long_split_on_over_off"]["ttfa_p50"] < 0.5
    assert "[route.split]\nenabled = false" in (out_dir / "lb-openai-split-off.toml").read_text()
    assert "enabled = false" not in (out_dir / "lb-openai-split-on.toml").read_text()
    assert _our_processes(f"--seed {seed}") == []
