"""Workers split each backend's limit (Backend.process_share): N processes
together never hold more than the limit, unless there are more processes
than slots (each keeps one, so the backend stays usable)."""

from __future__ import annotations

from hypothesis import given, strategies as st

from lb.config_model import TcpBackendConfig
from lb.scheduling.backend import process_share
from lb.scheduling.tcp_backend import UNLIMITED, TcpBackend
from test_scheduler_unit import ACTIVE, passive


@given(limit=st.integers(1, 10_000), processes=st.integers(1, 256))
def test_the_shares_stay_within_the_limit_and_none_is_zero(limit, processes):
    share = process_share(limit, processes)
    assert share >= 1
    if processes <= limit:
        assert share * processes <= limit
        assert (share + 1) * processes > limit      # as large as it can be
    else:
        assert share == 1


def test_one_process_keeps_the_whole_limit():
    assert [process_share(n, 1) for n in (1, 4, 7)] == [1, 4, 7]


def test_a_tcp_backends_max_connections_is_split_and_no_limit_stays_none():
    def backend(max_connections: int, processes: int) -> TcpBackend:
        cfg = TcpBackendConfig(name="t", host="127.0.0.1", port=1,
                               max_connections=max_connections)
        return TcpBackend(cfg, passive=passive(), active=ACTIVE, processes=processes)

    assert backend(6, 4).max_concurrency == 1 and backend(6, 2).max_concurrency == 3
    assert backend(0, 4).max_concurrency == UNLIMITED
