"""Reload that cannot hurt traffic: SIGHUP with a file that is not a file,
is huge, or holds absurd arrays is refused in one log line while the
balancer keeps answering at once with the configuration it had; a good
file afterwards applies; SIGHUPs in a row end on the file's latest content.
Against a real balancer process and a real echo backend on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import Balancer, get_json, lb_config, wait_until

# Every /health answer during a refused reload: the issue asks for 100 ms.
# Unloaded, each takes about 1 ms; with the 2 cores busy the scheduler alone
# has made one take 137 ms, so the bound has that margin.  A stalled event
# loop still fails it: reading a FIFO never ends, parsing 1 MiB takes 1 s.
HEALTH_WITHIN = 0.250    # seconds
HEALTH_FOR = 1.5         # seconds of /health polling while the reload is refused
REFUSED = "reload refused, still running the previous configuration: "


@pytest.fixture
def running(tmp_path, backend, http_engine):
    """A balancer started from tmp_path/lb.toml (least_conn, limit 4) before `backend`."""
    path = tmp_path / "lb.toml"
    path.write_text(lb_config([backend.url]))
    lb = Balancer(path, http=http_engine)
    lb.config_path = path
    yield lb
    lb.stop_cleanly()   # exit 0, no traceback


def _replace(path: Path, text: str) -> None:
    """Write the file as a careful operator does: whole, then renamed into place,
    so a reload never reads it half-written."""
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    os.replace(new, path)


def _hup(lb: Balancer) -> None:
    os.kill(lb.proc.pid, signal.SIGHUP)


def _lines(lb: Balancer, text: str) -> list[str]:
    return [line for line in lb.output().splitlines() if text in line]


def _health_answers_at_once(port: int, seconds: float) -> int:
    """GET /health for `seconds`; every answer 200 within HEALTH_WITHIN. Returns how many."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    answered = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            start = time.monotonic()
            conn.request("GET", "/health")
            resp = conn.getresponse()
            resp.read()
            took = time.monotonic() - start
            assert resp.status == 200
            assert took < HEALTH_WITHIN, f"/health answered in {took * 1000:.0f} ms"
            answered += 1
            time.sleep(0.01)
    finally:
        conn.close()
    return answered


def _proxied_port(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/headers")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        return int(resp.getheader("X-Backend-Port"))
    finally:
        conn.close()


# What the refused file would have changed, had it applied.
CHANGED = {"balancer": {"policy": "random", "max_concurrency": 2}}


def _fifo(path: Path, url: str) -> None:
    os.mkfifo(path)


def _huge_sparse(path: Path, url: str) -> None:
    with open(path, "w") as f:
        f.write(lb_config([url], **CHANGED))
        f.truncate(50 << 20)


def _dev_zero(path: Path, url: str) -> None:
    os.symlink("/dev/zero", path)


def _many(key: str, values, size_ok: bool = True):
    """An array `key` holding `values`, or (values a dict) a table `key` of them."""
    section, _, name = key.rpartition(".")
    sections = {key: values} if isinstance(values, dict) else {section: {name: values}}

    def make(path: Path, url: str) -> None:
        text = lb_config([url], **CHANGED, **sections)
        assert (len(text.encode()) <= 1 << 20) == size_ok   # under or over the 1 MiB file cap
        path.write_text(text)
    return make


def _slow_to_parse(path: Path, url: str) -> None:
    """Just under 1 MiB of small nested arrays (none over the cap): about a
    second of parsing for tomllib, then refused as statuses that are not."""
    row = "[" + ",".join(["1"] * 1000) + "]"
    head = lb_config([url], **CHANGED, **{"health.passive": {}})
    rows = ((1 << 20) - len(head) - 100) // (len(row) + 1)
    text = head.replace("[health.passive]\n", "[health.passive]\nstatuses = ["
                        + ",".join([row] * rows) + "]\n")
    assert len(text) <= 1 << 20
    path.write_text(text)


@pytest.mark.parametrize("make, says", [
    (_fifo, ["a FIFO, not a regular file"]),
    (_huge_sparse, ["52428800 bytes, larger than 1024 KiB"]),
    (_dev_zero, ["a device, not a regular file"]),
    (_many("admin.allow", ["10.0.0.1"] * 300_000, size_ok=False), ["larger than 1024 KiB"]),
    (_many("admin.allow", ["10.0.0.1"] * 2000), ["admin.allow: has 2000 entries", "at most 1024"]),
    (_many("health.passive.statuses", [500] * 2000),
     ["health.passive.statuses: has 2000 entries", "at most 1024"]),
    (_many("fallback.cartesia.voices", {f"v{i}": "id" for i in range(1100)}),
     ["fallback.cartesia.voices: has 1100 entries", "at most 1024"]),
    (_slow_to_parse, ["health.passive.statuses: must hold status codes"]),
], ids=["fifo", "50MB-sparse", "symlink-dev-zero", "allow-300000", "allow-2000",
        "statuses-2000", "voices-1100", "1MiB-slow-to-parse"])
def test_a_refused_reload_keeps_traffic_and_config_then_a_good_one_applies(
        running, backend, start_backend, make, says):
    lb, path = running, running.config_path
    path.unlink()
    make(path, backend.url)
    _hup(lb)
    # The reload is being refused: the balancer answers as usual meanwhile.
    assert _health_answers_at_once(lb.port, HEALTH_FOR) > 20
    lb.wait_for_line(REFUSED)
    refused = _lines(lb, REFUSED)
    assert len(refused) == 1, lb.output()
    for words in says:
        assert words in refused[0], refused[0]
    # Still the previous configuration: same backend, policy and limit.
    stats = lb.stats()
    assert [b["name"] for b in stats["backends"]] == ["b0"]
    assert stats["policy"] == "least_conn"
    assert stats["backends"][0]["max_concurrency"] == 4
    assert _proxied_port(lb.port) == backend.port
    output = lb.output()
    assert "Traceback" not in output and "MemoryError" not in output
    assert not _lines(lb, "reloaded:")

    # A good file after it applies: a new backend, a new policy.
    other = start_backend()
    path.unlink()
    _replace(path, lb_config([backend.url, other.url], balancer={"policy": "round_robin"}))
    _hup(lb)
    lb.wait_for_line(r"reloaded: 2 backend\(s\), added b1; policy round_robin")
    stats = lb.stats()
    assert [(b["name"], b["url"]) for b in stats["backends"]] == [
        ("b0", backend.url), ("b1", other.url)]
    assert stats["policy"] == "round_robin"
    assert len(_lines(lb, REFUSED)) == 1


# About 0.2 s of parsing for tomllib: the second SIGHUP comes while the
# first reload is still under way.
SLOW_PADDING = "#\n" * 300_000


def test_two_sighups_in_quick_succession_end_on_the_latest_file(running, backend):
    lb, path = running, running.config_path
    for round_ in range(3):
        first = {"policy": "random", "max_concurrency": 2 + round_}
        latest = {"policy": "round_robin", "max_concurrency": 6 + round_}
        _replace(path, SLOW_PADDING + lb_config([backend.url], balancer=first))
        _hup(lb)
        time.sleep(0.05)   # the first reload has read its file and is parsing it
        _replace(path, SLOW_PADDING + lb_config([backend.url], balancer=latest))
        _hup(lb)

        def state() -> tuple[str, int]:
            stats = get_json(lb.port, "/lb-stats")
            return stats["policy"], stats["backends"][0]["max_concurrency"]

        wanted = (latest["policy"], latest["max_concurrency"])
        wait_until(lambda: state() == wanted, timeout=5, what=f"round {round_}: {wanted} applied")
        # Nothing older lands afterwards.
        time.sleep(0.5)
        assert state() == wanted, lb.output()
    assert not _lines(lb, REFUSED) and not _lines(lb, "reload failed")
    assert _proxied_port(lb.port) == backend.port
