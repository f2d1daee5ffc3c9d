"""Sans-io tests for lb.policy.LeastInFlight and lb.backend.Backend."""

from __future__ import annotations

import random
from collections import Counter

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.backend import DOWN_AFTER_FAILURES, FAILURE_KINDS, Backend
from lb.config import BackendConfig
from lb.policy import LeastInFlight


class DummyPool:
    def snapshot(self) -> dict:
        return {"idle": 0, "opened": 0, "reused": 0}


def make_backend(i: int) -> Backend:
    cfg = BackendConfig(name=f"b{i}", url=f"http://127.0.0.1:{7000 + i}", host="127.0.0.1",
                        port=7000 + i)
    return Backend(cfg, DummyPool())  # type: ignore[arg-type]


class Stub:
    """The minimal shape a policy looks at."""

    def __init__(self, name: str, in_flight: int = 0, usable: bool = True):
        self.name = name
        self.in_flight = in_flight
        self.usable = usable

    def __repr__(self) -> str:
        return f"Stub({self.name}, {self.in_flight}, {self.usable})"


# --- LeastInFlight


def test_empty_list_gives_none():
    assert LeastInFlight().pick([]) is None
    assert LeastInFlight().pick(()) is None


def test_single_backend_is_always_picked_even_if_down():
    only = Stub("a", in_flight=5, usable=False)
    assert LeastInFlight().pick([only]) is only


def test_picks_least_in_flight():
    a, b, c = Stub("a", 3), Stub("b", 1), Stub("c", 2)
    assert LeastInFlight(random.Random(0)).pick([a, b, c]) is b


def test_prefers_usable_even_if_busier():
    a, b = Stub("a", 0, usable=False), Stub("b", 9)
    assert LeastInFlight(random.Random(0)).pick([a, b]) is b


def test_none_usable_picks_least_loaded_of_all():
    a, b, c = Stub("a", 4, False), Stub("b", 2, False), Stub("c", 3, False)
    assert LeastInFlight(random.Random(0)).pick([a, b, c]) is b


def test_has_a_name():
    assert LeastInFlight.name == "least_conn"


@pytest.mark.parametrize("n", [2, 3, 6])
def test_ties_are_broken_randomly(n):
    stubs = [Stub(f"s{i}", 1) for i in range(n)] + [Stub("busy", 2)]
    policy = LeastInFlight(random.Random(1234))
    counts = Counter(policy.pick(stubs).name for _ in range(200 * n))
    assert set(counts) == {f"s{i}" for i in range(n)}
    for name in counts:
        assert counts[name] > 100, counts  # roughly uniform: ~200 each


def test_tie_break_is_reproducible_with_a_seed():
    stubs = [Stub(f"s{i}") for i in range(4)]
    p1, p2 = LeastInFlight(random.Random(7)), LeastInFlight(random.Random(7))
    assert [p1.pick(stubs).name for _ in range(50)] == [p2.pick(stubs).name for _ in range(50)]


def test_ties_among_usable_only():
    stubs = [Stub("up1", 1), Stub("down", 0, False), Stub("up2", 1)]
    policy = LeastInFlight(random.Random(3))
    counts = Counter(policy.pick(stubs).name for _ in range(200))
    assert set(counts) == {"up1", "up2"}


# Events on real Backend objects: pick (the chosen one gets a request in flight),
# finish one in-flight request, a connection failure, a response.
events = st.lists(
    st.one_of(
        st.tuples(st.just("pick")),
        st.tuples(st.just("finish"), st.integers(0, 5)),
        st.tuples(st.just("fail"), st.integers(0, 5)),
        st.tuples(st.just("ok"), st.integers(0, 5)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 6), script=events, seed=st.integers(0, 2**32))
def test_pick_always_least_loaded_usable(n, script, seed):
    backends = [make_backend(i) for i in range(n)]
    policy = LeastInFlight(random.Random(seed))
    for event in script:
        if event[0] == "pick":
            usable = [b for b in backends if b.usable]
            pool = usable or backends
            chosen = policy.pick(backends)
            assert chosen is not None
            assert chosen in pool
            assert chosen.in_flight == min(b.in_flight for b in pool)
            if usable:
                assert chosen.usable
            chosen.in_flight += 1
            chosen.requests += 1
        else:
            b = backends[event[1] % n]
            if event[0] == "finish" and b.in_flight:
                b.in_flight -= 1
            elif event[0] == "fail":
                b.record_failure("connect", "refused")
            elif event[0] == "ok":
                b.record_response(200)
    assert sum(b.requests for b in backends) == sum(1 for e in script if e[0] == "pick")


@settings(max_examples=200, deadline=None)
@given(loads=st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=1, max_size=6),
       seed=st.integers(0, 2**32))
def test_pick_property_on_stubs(loads, seed):
    stubs = [Stub(f"s{i}", f, u) for i, (f, u) in enumerate(loads)]
    chosen = LeastInFlight(random.Random(seed)).pick(stubs)
    pool = [s for s in stubs if s.usable] or stubs
    assert chosen in pool
    assert chosen.in_flight == min(s.in_flight for s in pool)


# --- Backend


def test_new_backend_state():
    b = make_backend(0)
    assert (b.name, b.url, b.host, b.port) == ("b0", "http://127.0.0.1:7000", "127.0.0.1", 7000)
    assert b.state == "up" and b.usable
    assert b.in_flight == b.requests == b.consecutive_failures == 0
    assert b.last_error is None
    assert set(b.failures) == set(FAILURE_KINDS)


@pytest.mark.parametrize("status,bucket", [
    (100, "1xx"), (101, "1xx"), (200, "2xx"), (204, "2xx"), (301, "3xx"), (404, "4xx"),
    (499, "4xx"), (500, "5xx"), (503, "5xx"), (599, "5xx"), (600, "5xx"), (999, "5xx"),
])
def test_record_response_buckets(status, bucket):
    b = make_backend(0)
    b.record_response(status)
    assert b.responses[bucket] == 1
    assert sum(b.responses.values()) == 1


def test_record_failure_counts_by_kind():
    b = make_backend(0)
    for kind in FAILURE_KINDS:
        b.record_failure(kind, f"because {kind}")
    b.record_failure("reset", "again")
    assert b.failures["reset"] == 2
    assert all(b.failures[k] == (2 if k == "reset" else 1) for k in FAILURE_KINDS)
    assert b.consecutive_failures == len(FAILURE_KINDS) + 1
    assert b.last_error[1] == "again"


def test_goes_down_after_consecutive_failures_and_up_after_a_response():
    b = make_backend(0)
    for i in range(DOWN_AFTER_FAILURES - 1):
        b.record_failure("connect", "refused")
        assert b.state == "up" and b.usable
    b.record_failure("connect", "refused")
    assert b.state == "down" and not b.usable
    b.record_failure("connect_timeout", "slow")
    assert b.state == "down"
    b.record_response(502)  # any response means the backend is reachable
    assert b.state == "up" and b.usable
    assert b.consecutive_failures == 0
    assert b.failures["connect"] == DOWN_AFTER_FAILURES  # totals are kept


def test_response_between_failures_resets_the_run():
    b = make_backend(0)
    for _ in range(5):
        for _ in range(DOWN_AFTER_FAILURES - 1):
            b.record_failure("reset", "x")
        b.record_response(200)
    assert b.state == "up"
    assert b.failures["reset"] == 5 * (DOWN_AFTER_FAILURES - 1)


@settings(max_examples=200, deadline=None)
@given(script=st.lists(st.one_of(st.sampled_from(FAILURE_KINDS), st.integers(100, 599)),
                       max_size=40))
def test_state_follows_trailing_failure_run(script):
    b = make_backend(0)
    run = 0
    for item in script:
        if isinstance(item, str):
            b.record_failure(item, "r")
            run += 1
        else:
            b.record_response(item)
            run = 0
        assert b.consecutive_failures == run
        assert b.state == ("down" if run >= DOWN_AFTER_FAILURES else "up")
        assert b.usable == (b.state == "up")
    assert sum(b.failures.values()) == sum(isinstance(i, str) for i in script)
    assert sum(b.responses.values()) == sum(isinstance(i, int) for i in script)


def test_snapshot_is_json_serialisable():
    b = make_backend(3)
    b.in_flight = 2
    b.requests = 10
    b.bytes_sent = 123
    b.bytes_received = 4567
    b.record_response(200)
    b.record_failure("first_byte_timeout", "no response within 60s — ünïcode")
    snap = b.snapshot()
    decoded = orjson.loads(orjson.dumps(snap))
    assert decoded == snap
    assert decoded["name"] == "b3" and decoded["url"] == "http://127.0.0.1:7003"
    assert decoded["state"] == "up"
    assert decoded["in_flight"] == 2 and decoded["requests"] == 10
    assert decoded["responses"]["2xx"] == 1
    assert decoded["failures"]["first_byte_timeout"] == 1
    assert decoded["errors"] == 1
    assert decoded["last_error"]["reason"].endswith("ünïcode")
    assert isinstance(decoded["last_error"]["time"], float)
    assert decoded["bytes_sent"] == 123 and decoded["bytes_received"] == 4567
    assert decoded["pool"] == DummyPool().snapshot()


def test_snapshot_fresh_and_down():
    b = make_backend(0)
    assert orjson.loads(orjson.dumps(b.snapshot()))["last_error"] is None
    for _ in range(DOWN_AFTER_FAILURES):
        b.record_failure("connect", "refused")
    snap = orjson.loads(orjson.dumps(b.snapshot()))
    assert snap["state"] == "down" and snap["errors"] == DOWN_AFTER_FAILURES


def test_snapshot_is_a_copy():
    b = make_backend(0)
    snap = b.snapshot()
    snap["responses"]["2xx"] = 99
    snap["failures"]["connect"] = 99
    assert b.responses["2xx"] == 0 and b.failures["connect"] == 0
