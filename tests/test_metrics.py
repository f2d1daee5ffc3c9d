"""/metrics and /lb-stats with real processes on 127.0.0.1: latency
histograms that land where the time went, families present from the first
scrape, per-backend counters that add up, and the HTML page.

The whole /metrics text is read with prometheus_client's own parser, so
anything a Prometheus server would refuse fails here.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import (Backend, Process, ScriptedBackend, connect, env_without_proxies,
                      get_json, read_head, wait_until)
from lb.tts.cartesia import OUTCOMES
from lb.proxy.phases import FALLBACK_REASONS
from lb.proxy.latency import BOUNDS
from lb.scheduling.retry import DENIAL_REASONS, RETRYABLE_KINDS

ROUTES = [("/v1/audio/speech", "openai"), ("/synthesize-json", "chatterbox")]
KINDS = ["chatterbox", "openai", "other"]
HISTOGRAMS = ("tts_lb_request_duration_seconds", "tts_lb_first_byte_seconds",
              "tts_lb_queue_wait_seconds")
KEY_ENV = "TTS_LB_TEST_METRICS_KEY"
KEY = "sk_test_metrics_key"
VOICE = "694f9389-aac1-45b6-b726-9d9369183238"


# --- processes and requests


@pytest.fixture
def start(start_lb):
    """start(backends, routes=ROUTES, env=None, **sections) -> a running balancer."""
    def run(backends: list, routes=ROUTES, env: dict | None = None, **sections):
        return start_lb(backends, env=env, routes=routes, **sections)
    return run


@pytest.fixture
def processes():
    """Other processes a test starts (echo backends, simulators, the fake Cartesia)."""
    started: list[Process] = []
    yield started
    for proc in reversed(started):
        proc.stop()


def listening(proc: Process, processes: list) -> Process:
    processes.append(proc)
    proc.port = int(proc.wait_for_line(r"listening on 127\.0\.0\.1:(\d+)").group(1))
    proc.url = f"http://127.0.0.1:{proc.port}"
    return proc


def call(port: int, method: str, path: str, body: bytes | None = None,
         headers: dict | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def post_json(port: int, path: str, doc: dict) -> tuple[int, bytes]:
    return call(port, "POST", path, json.dumps(doc).encode(),
                {"Content-Type": "application/json"})


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# --- reading /metrics


class Scrape:
    """One /metrics answer, parsed by prometheus_client."""

    def __init__(self, port: int):
        status, body = call(port, "GET", "/metrics")
        assert status == 200
        self.text = body.decode()
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}
        self.samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                        for f in self.families.values() for s in f.samples}

    def value(self, name: str, **labels) -> float:
        return self.samples[name, tuple(sorted(labels.items()))]

    def labels(self, name: str, label: str) -> set[str]:
        return {dict(key)[label] for (sample, key) in self.samples
                if sample == name and label in dict(key)}

    def histogram(self, name: str, **labels) -> tuple[list[tuple[float, float]], float, float]:
        """([(le, cumulative count)...] in bound order, _sum, _count) of one series."""
        buckets = [(float(dict(key)["le"]), v) for (sample, key), v in self.samples.items()
                   if sample == name + "_bucket"
                   and {k: x for k, x in key if k != "le"} == labels]
        return (sorted(buckets), self.value(name + "_sum", **labels),
                self.value(name + "_count", **labels))


def check_histograms(scrape: Scrape) -> int:
    """Every series of the three histograms is well formed; returns how many there are."""
    series = 0
    for name in HISTOGRAMS:
        family = scrape.families[name]
        assert family.type == "histogram"
        label_sets = {tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                      for s in family.samples}
        for labels in label_sets:
            buckets, total, count = scrape.histogram(name, **dict(labels))
            assert [le for le, _ in buckets] == [*BOUNDS, float("inf")], (name, labels)
            counts = [n for _, n in buckets]
            assert counts == sorted(counts), (name, labels, counts)     # cumulative
            assert counts[-1] == count, (name, labels)                  # +Inf == _count
            assert total >= 0 and (count > 0 or total == 0)
            series += 1
    return series


# --- 1. every family at 0 from the first scrape


def test_every_known_series_is_there_from_the_first_scrape(start, processes):
    backend = Backend()
    processes.append(backend)
    lb = start([backend.url, closed_port_url()], retry={"statuses": [502, 503]})
    scrape = Scrape(lb.port)
    assert check_histograms(scrape) == 3 * 3 * len(KINDS)      # b0, b1, "-" by three kinds
    for name in HISTOGRAMS:
        assert scrape.labels(name + "_count", "backend") == {"b0", "b1", "-"}
        assert scrape.labels(name + "_count", "kind") == set(KINDS)
        assert scrape.value(name + "_count", backend="b0", kind="openai") == 0
    for reason in [*RETRYABLE_KINDS, "status_502", "status_503"]:
        assert scrape.value("tts_lb_retries_total", reason=reason) == 0
    for reason in DENIAL_REASONS:
        assert scrape.value("tts_lb_retries_denied_total", reason=reason) == 0
    for reason in [*FALLBACK_REASONS, "status_500", "status_502", "status_503", "status_504"]:
        assert scrape.value("tts_lb_fallback_total", reason=reason) == 0
    for outcome in OUTCOMES:
        assert scrape.value("tts_lb_fallback_outcomes_total", outcome=outcome) == 0
    for reason in ("full", "timeout", "no_backend"):
        assert scrape.value("tts_lb_queue_rejected_total", reason=reason) == 0
    for code in ("200", "502", "503", "504", "499"):
        assert scrape.value("tts_lb_requests_finished_total", code=code) == 0
    for name in ("b0", "b1"):
        for why in ("no_response", "abandoned"):
            assert scrape.value("tts_lb_backend_unanswered_total", backend=name, reason=why) == 0
        assert scrape.value("tts_lb_backend_attempts_under_way", backend=name) == 0
    # No Cartesia fallback configured: no "cartesia" series.
    assert "cartesia" not in scrape.labels("tts_lb_request_duration_seconds_count", "backend")


# --- 2. observations land where the time went


def test_a_slow_answer_lands_in_the_buckets_of_its_duration(start, processes):
    backend = Backend()
    processes.append(backend)
    lb = start([backend.url])
    before = Scrape(lb.port)
    assert call(lb.port, "GET", "/slow?delay=0.3")[0] == 200
    after = Scrape(lb.port)
    check_histograms(after)
    series = dict(backend="b0", kind="other")
    for name in ("tts_lb_request_duration_seconds", "tts_lb_first_byte_seconds"):
        b_buckets, b_sum, b_count = before.histogram(name, **series)
        a_buckets, a_sum, a_count = after.histogram(name, **series)
        assert a_count == b_count + 1, name
        assert a_sum - b_sum >= 0.3, name
        grew = [le for (le, n), (_, m) in zip(a_buckets, b_buckets) if n > m]
        assert min(grew) >= 0.5 and float("inf") in grew, (name, grew)   # not in le=0.25
    # It got a slot at once: the queue wait is in the first bucket.
    buckets, _, count = after.histogram("tts_lb_queue_wait_seconds", **series)
    assert count == 1 and buckets[0] == (0.005, 1)
    # The scrapes themselves (and /health, /lb-stats) are not timed.
    call(lb.port, "GET", "/health")
    get_json(lb.port, "/lb-stats")
    again = Scrape(lb.port)
    for name in HISTOGRAMS:
        assert sum(again.samples[k] for k in again.samples if k[0] == name + "_count") == 1
    assert again.value("tts_lb_requests_total") >= 5
    # /lb-stats: the same observation in the window's percentiles.
    latency = get_json(lb.port, "/lb-stats")["latency"]
    b0 = latency["backends"]["b0"]
    assert b0["duration"]["count"] == 1 and 0.25 <= b0["duration"]["p50"] <= 0.5
    assert b0["first_byte"]["count"] == 1 and 0.25 <= b0["first_byte"]["p99"] <= 0.5
    assert b0["queue_wait"]["p95"] <= 0.005
    assert latency["backends"]["-"]["duration"] == {"count": 0, "p50": None, "p95": None,
                                                    "p99": None}
    assert latency["window_s"] == 300


def test_a_reload_keeps_the_counts_of_kept_series_and_adds_new_ones_at_zero(
        start, processes, tmp_path):
    backends = [Backend(), Backend()]
    processes.extend(backends)
    lb = start([backends[0].url])
    assert call(lb.port, "GET", "/hello")[0] == 200
    assert Scrape(lb.port).value("tts_lb_request_duration_seconds_count",
                                 backend="b0", kind="other") == 1
    config = tmp_path / "lb0.toml"     # what start() wrote; now with a second backend
    config.write_text(config.read_text().replace(
        "[[route]]", f'[[backend]]\nname = "b1"\nurl = "{backends[1].url}"\n[[route]]', 1))
    mark = len(lb.lines)
    lb.proc.send_signal(signal.SIGHUP)
    lb.wait_for_line(r"reloaded: 2 backend\(s\), added b1", start=mark)
    scrape = Scrape(lb.port)
    check_histograms(scrape)
    assert scrape.value("tts_lb_request_duration_seconds_count", backend="b0", kind="other") == 1
    for kind in KINDS:
        assert scrape.value("tts_lb_request_duration_seconds_count", backend="b1", kind=kind) == 0
    assert "b1" in get_json(lb.port, "/lb-stats")["latency"]["backends"]


def test_route_kind_label_and_requests_with_no_backend(start, processes):
    backend = Backend()
    processes.append(backend)
    lb = start([{"url": backend.url, "max_concurrency": 1}],
               balancer={"queue_limit": 1, "queue_timeout": 10})
    # A call on a [[route]] is labelled with its kind (the echo server answers it 200).
    assert post_json(lb.port, "/v1/audio/speech", {"input": "hi"})[0] == 200
    results: dict[str, int] = {}

    def hold(name: str, path: str) -> None:
        results[name] = call(lb.port, "GET", path, timeout=15)[0]

    first = threading.Thread(target=hold, args=("first", "/slow?delay=1.0"))
    first.start()
    wait_until(lambda: get_json(lb.port, "/lb-stats")["backends"][0]["in_flight"] == 1,
               what="the slot taken")
    second = threading.Thread(target=hold, args=("second", "/hello"))
    second.start()
    wait_until(lambda: get_json(lb.port, "/lb-stats")["queue"]["length"] == 1,
               what="one request queued")
    status, body = call(lb.port, "GET", "/hello")            # the queue is full: 503 at once
    assert status == 503, body
    first.join(15)
    second.join(15)
    assert results == {"first": 200, "second": 200}
    scrape = Scrape(lb.port)
    check_histograms(scrape)
    assert scrape.value("tts_lb_request_duration_seconds_count", backend="b0", kind="openai") == 1
    assert scrape.value("tts_lb_request_duration_seconds_count", backend="b0", kind="other") == 2
    # The 503 had no backend: backend "-"; its answer was its first byte; it did not wait.
    for name in HISTOGRAMS:
        assert scrape.value(name + "_count", backend="-", kind="other") == 1, name
    buckets, _, _ = scrape.histogram("tts_lb_queue_wait_seconds", backend="-", kind="other")
    assert buckets[0] == (0.005, 1)
    # The second one waited for the first's slot (about a second, at least 0.25 s).
    buckets, wait_sum, count = scrape.histogram("tts_lb_queue_wait_seconds", backend="b0",
                                                kind="other")
    assert count == 2
    assert dict(buckets)[0.25] == 1 and wait_sum >= 0.25     # the first did not wait
    assert get_json(lb.port, "/lb-stats")["latency"]["backends"]["-"]["duration"]["count"] == 1


def test_calls_the_fallback_answers_are_labelled_cartesia(start, processes):
    env = env_without_proxies()
    env["FAKE_METRICS_KEY"] = KEY
    fake = listening(Process(["-m", "backends.cartesia", "--port", "0", "--api-key-env",
                              "FAKE_METRICS_KEY", "--rtf", "0"], env=env), processes)
    lb_env = env_without_proxies()
    lb_env[KEY_ENV] = KEY
    lb = start([closed_port_url()], env=lb_env, timeouts={"connect": 1},
               **{"fallback.cartesia": {"enabled": True, "url": fake.url,
                                        "api_key_env": KEY_ENV, "timeout": 15},
                  "fallback.cartesia.voices": {"default": VOICE}})
    assert check_histograms(Scrape(lb.port)) == 3 * 3 * len(KINDS)   # b0, "-", cartesia
    status, body = post_json(lb.port, "/v1/audio/speech", {"input": "Hello there.",
                                                           "response_format": "wav"})
    assert status == 200, body
    scrape = Scrape(lb.port)
    check_histograms(scrape)
    for name in HISTOGRAMS:
        assert scrape.value(name + "_count", backend="cartesia", kind="openai") == 1, name
        assert scrape.value(name + "_count", backend="b0", kind="openai") == 0, name
    assert scrape.value("tts_lb_fallback_total", reason="failed") == 1
    assert scrape.value("tts_lb_fallback_outcomes_total", outcome="ok") == 1
    # The page shows the fallback's state.
    status, page = call(lb.port, "GET", "/lb-stats", headers={"Accept": "text/html"})
    page = page.decode()
    assert "Cartesia fallback" in page and "usable" in page and "failed 1" in page
    assert KEY not in page and KEY not in scrape.text


# --- 3. counters that agree


def assert_counts_add_up(stats: dict) -> None:
    for b in stats["backends"]:
        assert b["requests"] == (sum(b["responses"].values()) + b["no_response"]
                                 + b["abandoned"] + b["under_way"]), b


def assert_metrics_add_up(scrape: Scrape, names) -> None:
    for name in names:
        def total(family: str) -> float:
            return sum(v for (sample, key), v in scrape.samples.items()
                       if sample == family and dict(key)["backend"] == name)
        responses = total("tts_lb_backend_responses_total")
        unanswered = total("tts_lb_backend_unanswered_total")
        under_way = scrape.value("tts_lb_backend_attempts_under_way", backend=name)
        assert scrape.value("tts_lb_backend_requests_total", backend=name) == \
            responses + unanswered + under_way, name


def test_two_step_chatterbox_calls_count_every_attempt(start, processes):
    servers = [listening(Process(["-m", "backends.chatterbox", "--port", "0", "--load-time",
                                  "0", "--rtf", "0.01"]), processes) for _ in range(2)]
    lb = start([s.url for s in servers], balancer={"slow_start": 0})
    calls = 4
    for i in range(calls):
        status, body = post_json(lb.port, "/synthesize-json", {"text": f"Call number {i}."})
        assert status == 200, body
        status, wav = call(lb.port, "GET", json.loads(body)["audio_url"])
        assert status == 200 and wav[:4] == b"RIFF"
    stats = get_json(lb.port, "/lb-stats")
    assert_counts_add_up(stats)
    assert sum(b["requests"] for b in stats["backends"]) == 2 * calls
    assert sum(b["responses"]["2xx"] for b in stats["backends"]) == 2 * calls
    assert all(b["under_way"] == 0 for b in stats["backends"])
    assert "sum(responses)" in stats["backend_counts"]
    assert_metrics_add_up(Scrape(lb.port), ["b0", "b1"])
    # The audio GETs asked no scheduler: only the POSTs have a queue wait.
    scrape = Scrape(lb.port)
    waits = sum(scrape.value("tts_lb_queue_wait_seconds_count", backend=b, kind=k)
                for b in ("b0", "b1") for k in KINDS)
    assert waits == calls
    durations = sum(scrape.value("tts_lb_request_duration_seconds_count", backend=b, kind=k)
                    for b in ("b0", "b1") for k in KINDS)
    assert durations == 2 * calls


def garbage_backend(conn: socket.socket, index: int) -> None:
    """Answers every request with a status line a browser would run as a script."""
    while read_head(conn) is not None:
        conn.sendall(b"<script>alert(1)</script>\r\n\r\n")
        return


def test_failures_and_abandoned_attempts_add_up_and_the_page_escapes_them(start, processes):
    bad = ScriptedBackend(garbage_backend)
    backend = Backend()
    processes.append(backend)
    try:
        lb = start([f"http://127.0.0.1:{bad.port}", backend.url],
                   balancer={"policy": "round_robin", "slow_start": 0},
                   **{"health.passive": {"consecutive_failures": 0}})
        for i in range(4):   # round robin: every other one tries the bad backend first
            status, _ = call(lb.port, "GET", "/hello", headers={"X-Request-ID": f"try-{i}"})
            assert status == 200
        # A client that gives up while the backend works: an abandoned attempt.
        sock = connect(lb.port)
        sock.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        # (it may try the bad backend first, then be retried there)
        wait_until(lambda: get_json(lb.port, "/lb-stats")["backends"][1]["under_way"] == 1,
                   what="the /hang request at the echo backend")
        sock.close()
        stats = wait_until(lambda: (s := get_json(lb.port, "/lb-stats"))["backends"][1]
                           ["abandoned"] == 1 and s, what="the abandoned attempt counted")
        assert_counts_add_up(stats)
        b0, b1 = stats["backends"]
        assert b0["no_response"] >= 2 and b0["no_response"] == b0["failures"]["bad_response"]
        assert sum(b0["responses"].values()) == 0
        assert b1["responses"]["2xx"] == 4 and b1["under_way"] == 0
        assert stats["retry"]["by_reason"]["bad_response"] == b0["no_response"]
        scrape = Scrape(lb.port)
        assert_metrics_add_up(scrape, ["b0", "b1"])
        assert scrape.value("tts_lb_retries_total", reason="bad_response") == b0["no_response"]
        assert scrape.value("tts_lb_requests_finished_total", code="499") == 1
        # The HTML page: refreshes itself, lists the retries, escapes what the backend sent.
        status, page = call(lb.port, "GET", "/lb-stats", headers={"Accept": "text/html"})
        page = page.decode()
        assert status == 200
        assert '<meta http-equiv=\'refresh\' content=\'5\'>' in page
        # (h11's reason quotes the bad status line, escaped; llhttp's names the fault)
        assert "<script>" not in page and "invalid response from backend" in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page or "Expected HTTP/" in page
        assert "try-0" in page or "try-1" in page
        assert "Latency, last 300s" in page and "Cartesia fallback" in page
    finally:
        bad.close()
