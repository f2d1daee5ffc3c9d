"""Tests for lb.fdlimit: the connection cap (pure) and raise_nofile.

raise_nofile changes a process-wide limit, so it runs either against a fake
`resource` module or in a subprocess; this test process's limit is untouched.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.control import fdlimit
from lb.control.fdlimit import RESERVE, FdLimit, connection_cap, raise_nofile

ROOT = Path(__file__).resolve().parent.parent


# --- connection_cap


def test_reserve_is_sane():
    assert 8 <= RESERVE <= 1024


def test_connection_cap_examples():
    assert connection_cap(65536, 64, 0) == ((65536 - RESERVE - 64) // 2, "")
    assert connection_cap(1024, 0, 100) == (100, "")
    cap, note = connection_cap(1024, 0, 10_000)
    assert cap == (1024 - RESERVE) // 2
    assert "limits.max_connections=10000" in note and "1024" in note and str(cap) in note


def test_connection_cap_tiny_limits_still_allow_one():
    assert connection_cap(1, 0, 0) == (1, "")
    assert connection_cap(RESERVE, 1000, 0) == (1, "")
    assert connection_cap(10, 0, 1)[0] == 1


@settings(max_examples=500, deadline=None)
@given(granted=st.integers(1, 10**7), pooled=st.integers(0, 10**5),
       configured=st.integers(0, 10**7))
def test_connection_cap_property(granted, pooled, configured):
    cap, note = connection_cap(granted, pooled, configured)
    derived = max(1, (granted - RESERVE - pooled) // 2)
    assert isinstance(cap, int) and cap >= 1
    if granted >= RESERVE + pooled + 2:
        # Two descriptors per proxied request, pooled idle ones and the reserve fit.
        assert cap * 2 + pooled + RESERVE <= granted
    if configured == 0:
        assert (cap, note) == (derived, "")
        if granted >= RESERVE + pooled + 2:
            assert (cap + 1) * 2 + pooled + RESERVE > granted  # the budget is used fully
    elif configured > derived:
        assert cap == derived
        assert "limits.max_connections" in note and str(configured) in note
    else:
        assert (cap, note) == (configured, "")


# --- raise_nofile against a fake resource module


class FakeResource:
    RLIMIT_NOFILE = resource.RLIMIT_NOFILE
    RLIM_INFINITY = resource.RLIM_INFINITY

    def __init__(self, soft: int, hard: int, ceiling: int = 1 << 20):
        self.limits = (soft, hard)
        self.ceiling = ceiling   # like fs.nr_open
        self.calls: list[tuple[int, int]] = []

    def getrlimit(self, which):
        assert which == self.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which, limits):
        assert which == self.RLIMIT_NOFILE
        self.calls.append(limits)
        soft, hard = limits
        if hard != self.limits[1]:
            raise AssertionError("raise_nofile must not touch the hard limit")
        if soft > hard and hard != self.RLIM_INFINITY:
            raise ValueError("not allowed to raise maximum limit")
        if soft > self.ceiling:
            raise OSError(1, "Operation not permitted")
        self.limits = (soft, hard)


@pytest.fixture
def fake(monkeypatch):
    def install(soft, hard, **kw):
        res = FakeResource(soft, hard, **kw)
        monkeypatch.setattr(fdlimit, "resource", SimpleNamespace(
            RLIMIT_NOFILE=res.RLIMIT_NOFILE, RLIM_INFINITY=res.RLIM_INFINITY,
            getrlimit=res.getrlimit, setrlimit=res.setrlimit))
        return res
    return install


def test_raise_to_asked_below_hard(fake):
    res = fake(1024, 524288)
    got = raise_nofile(65536)
    assert got == FdLimit(asked=65536, soft_before=1024, hard=524288, granted=65536)
    assert res.calls == [(65536, 524288)]


def test_capped_at_hard(fake):
    fake(1024, 4096)
    got = raise_nofile(65536)
    assert (got.granted, got.hard, got.error) == (4096, 4096, "")


def test_no_call_when_already_there(fake):
    res = fake(4096, 4096)
    assert raise_nofile(65536).granted == 4096
    assert res.calls == []


def test_unlimited_hard_and_refused_raise_keeps_soft(fake):
    fake(1024, resource.RLIM_INFINITY, ceiling=1 << 20)
    got = raise_nofile(1 << 30)
    assert got.granted == 1024
    assert got.error  # the reason is reported, not raised


def test_unlimited_hard_raises_to_asked(fake):
    fake(1024, resource.RLIM_INFINITY)
    assert raise_nofile(65536).granted == 65536


@settings(max_examples=300, deadline=None)
@given(soft=st.integers(1, 1 << 21), extra=st.integers(0, 1 << 21), asked=st.integers(1, 1 << 22),
       infinite=st.booleans())
def test_raise_nofile_never_exceeds_hard(soft, extra, asked, infinite):
    hard = resource.RLIM_INFINITY if infinite else soft + extra
    res = FakeResource(soft, hard)
    original = fdlimit.resource
    fdlimit.resource = res  # type: ignore[assignment]
    try:
        got = raise_nofile(asked)
    finally:
        fdlimit.resource = original
    assert got.asked == asked and got.soft_before == soft and got.hard == hard
    assert got.granted == res.limits[0]
    if not infinite:
        assert got.granted <= hard
        assert got.granted >= min(asked, hard) or got.error
    if got.error:
        assert got.granted == soft


def test_never_lowers_an_already_higher_soft_limit(fake):
    fake(1 << 20, 1 << 20)
    assert raise_nofile(65536).granted == 1 << 20


# --- raise_nofile for real, in a subprocess


def run_in_child(soft: int, hard: int, asked: int) -> dict:
    code = textwrap.dedent(f"""
        import json, resource
        from lb.control.fdlimit import raise_nofile
        resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))
        got = raise_nofile({asked})
        print(json.dumps(dict(asked=got.asked, soft_before=got.soft_before, hard=got.hard,
                              granted=got.granted, error=got.error,
                              now=resource.getrlimit(resource.RLIMIT_NOFILE))))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_raise_nofile_real_capped_at_lowered_hard_limit():
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    got = run_in_child(256, 512, 65536)
    assert got == dict(asked=65536, soft_before=256, hard=512, granted=512, error="",
                       now=[512, 512])
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == before


def test_raise_nofile_real_below_hard():
    got = run_in_child(128, 512, 300)
    assert (got["granted"], got["hard"], got["error"], got["now"]) == (300, 512, "", [300, 512])
