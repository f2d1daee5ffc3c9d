"""Sans-io tests for lb.expiring.ExpiringMap, driven by a fake clock.

The map holds two-step TTS state (audio_url -> backend, audio_url -> WAV
bytes): bounded by count and by bytes, oldest first out, entries gone after
`ttl`.  Nothing here sleeps; time moves only when a test says so.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lb.scheduling.expiring import ExpiringMap


class Clock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


def make(clock: Clock, *, max_items: int = 100, ttl: float = 10.0, max_bytes: int = 0,
         sized: bool = False) -> ExpiringMap:
    if sized:
        return ExpiringMap(max_items=max_items, ttl=ttl, max_bytes=max_bytes, size=len,
                           clock=clock)
    return ExpiringMap(max_items=max_items, ttl=ttl, max_bytes=max_bytes, clock=clock)


def keys_of(m: ExpiringMap, candidates) -> list:
    """Which of `candidates` a get() still finds (get drops what has expired)."""
    return [k for k in candidates if m.get(k) is not None]


# --- get / put


def test_empty_map():
    m = make(Clock())
    assert len(m) == 0 and m.bytes == 0 and m.evicted == 0
    assert m.get(b"/audio/x.wav") is None
    m.expire()
    assert len(m) == 0


def test_put_then_get():
    m = make(Clock())
    m.put(b"/audio/a.wav", "gpu0")
    m.put(b"/audio/b.wav", "gpu1")
    assert m.get(b"/audio/a.wav") == "gpu0"
    assert m.get(b"/audio/b.wav") == "gpu1"
    assert m.get(b"/audio/c.wav") is None
    assert len(m) == 2


def test_get_does_not_remove():
    m = make(Clock())
    m.put(b"k", "v")
    assert m.get(b"k") == "v" and m.get(b"k") == "v"
    assert len(m) == 1


def test_put_replaces_the_value():
    m = make(Clock())
    m.put(b"k", "old")
    m.put(b"k", "new")
    assert m.get(b"k") == "new"
    assert len(m) == 1 and m.evicted == 0


def test_falsy_values_are_found():
    m = make(Clock(), sized=True)
    m.put(b"empty", b"")
    assert m.get(b"empty") == b""
    assert len(m) == 1 and m.bytes == 0


def test_default_clock_is_monotonic():
    m = ExpiringMap(max_items=2, ttl=60.0)
    m.put(b"k", 1)
    assert m.get(b"k") == 1


# --- expiry


def test_entry_lives_until_ttl_and_not_at_it():
    clock = Clock()
    m = make(clock, ttl=10.0)
    m.put(b"k", "v")
    clock.advance(9.999)
    assert m.get(b"k") == "v"
    clock.advance(0.001)          # exactly ttl after the put
    assert m.get(b"k") is None
    assert len(m) == 0            # get dropped it


def test_expired_entry_is_gone_after_ttl():
    clock = Clock()
    m = make(clock, ttl=5.0)
    m.put(b"k", "v")
    clock.advance(60)
    assert m.get(b"k") is None
    assert len(m) == 0


def test_expired_entry_is_not_counted_as_evicted():
    clock = Clock()
    m = make(clock, ttl=1.0, sized=True)
    m.put(b"k", b"xyz")
    clock.advance(1)
    assert m.get(b"k") is None
    assert m.evicted == 0 and m.bytes == 0


def test_each_entry_has_its_own_deadline():
    clock = Clock()
    m = make(clock, ttl=10.0)
    m.put(b"a", 1)
    clock.advance(4)
    m.put(b"b", 2)
    clock.advance(6)              # a: 10 s old, b: 6 s
    assert m.get(b"a") is None and m.get(b"b") == 2
    clock.advance(4)              # b: 10 s
    assert m.get(b"b") is None


def test_reput_refreshes_the_deadline():
    clock = Clock()
    m = make(clock, ttl=10.0)
    m.put(b"k", "v1")
    clock.advance(8)
    m.put(b"k", "v2")
    clock.advance(8)              # 16 s after the first put, 8 after the second
    assert m.get(b"k") == "v2"
    clock.advance(2)
    assert m.get(b"k") is None


def test_get_does_not_refresh_the_deadline():
    clock = Clock()
    m = make(clock, ttl=10.0)
    m.put(b"k", "v")
    clock.advance(9)
    assert m.get(b"k") == "v"
    clock.advance(1)
    assert m.get(b"k") is None


def test_expire_drops_only_expired_entries():
    clock = Clock()
    m = make(clock, ttl=10.0, sized=True)
    m.put(b"a", b"1")
    clock.advance(3)
    m.put(b"b", b"22")
    clock.advance(3)
    m.put(b"c", b"333")
    clock.advance(4)              # a: 10 s (expired), b: 7, c: 4
    m.expire()
    assert len(m) == 2 and m.bytes == 5
    clock.advance(3)              # b: 10 s (expired), c: 7
    m.expire()
    assert len(m) == 1 and m.bytes == 3
    assert m.get(b"c") == b"333"
    clock.advance(2.5)
    m.expire()
    assert len(m) == 1
    assert m.evicted == 0


def test_expire_with_nothing_expired_keeps_everything():
    clock = Clock()
    m = make(clock, ttl=10.0)
    for i in range(5):
        m.put(bytes([i]), i)
    clock.advance(9.5)
    m.expire()
    assert len(m) == 5
    assert keys_of(m, [bytes([i]) for i in range(5)]) == [bytes([i]) for i in range(5)]


def test_expire_everything():
    clock = Clock()
    m = make(clock, ttl=10.0, sized=True)
    for i in range(5):
        m.put(bytes([i]), b"x" * i)
        clock.advance(1)
    clock.advance(100)
    m.expire()
    assert len(m) == 0 and m.bytes == 0 and m.evicted == 0


def test_expire_respects_a_refreshed_key():
    # Re-putting moves a key to the back: expire() must not stop at, or drop, it early.
    clock = Clock()
    m = make(clock, ttl=10.0)
    m.put(b"a", 1)
    m.put(b"b", 2)
    clock.advance(5)
    m.put(b"a", 3)                # a now expires at +15, b at +10
    clock.advance(5)
    m.expire()
    assert len(m) == 1 and m.get(b"a") == 3 and m.get(b"b") is None


# --- bounded by count


def test_max_items_evicts_the_oldest():
    m = make(Clock(), max_items=3)
    for key in (b"a", b"b", b"c", b"d"):
        m.put(key, key.decode())
    assert len(m) == 3 and m.evicted == 1
    assert m.get(b"a") is None
    assert keys_of(m, [b"b", b"c", b"d"]) == [b"b", b"c", b"d"]
    m.put(b"e", "e")
    m.put(b"f", "f")
    assert m.evicted == 3
    assert keys_of(m, [b"a", b"b", b"c", b"d", b"e", b"f"]) == [b"d", b"e", b"f"]


def test_replacing_at_the_bound_evicts_nothing():
    m = make(Clock(), max_items=2)
    m.put(b"a", 1)
    m.put(b"b", 2)
    m.put(b"a", 3)
    assert len(m) == 2 and m.evicted == 0
    assert m.get(b"a") == 3 and m.get(b"b") == 2


def test_reput_makes_a_key_the_newest():
    m = make(Clock(), max_items=2)
    m.put(b"a", 1)
    m.put(b"b", 2)
    m.put(b"a", 3)                # a is now newer than b
    m.put(b"c", 4)                # so b goes
    assert m.get(b"b") is None
    assert m.get(b"a") == 3 and m.get(b"c") == 4
    assert m.evicted == 1


def test_get_does_not_make_a_key_newer():
    m = make(Clock(), max_items=2)
    m.put(b"a", 1)
    m.put(b"b", 2)
    assert m.get(b"a") == 1
    m.put(b"c", 3)                # oldest by insertion: a (not least recently used)
    assert m.get(b"a") is None and m.get(b"b") == 2


def test_max_items_one():
    m = make(Clock(), max_items=1)
    for i in range(10):
        m.put(bytes([i]), i)
        assert len(m) == 1 and m.get(bytes([i])) == i
    assert m.evicted == 9


# --- bounded by bytes (size=len)


def test_bytes_accounting_after_puts():
    m = make(Clock(), max_bytes=1000, sized=True)
    m.put(b"a", b"x" * 100)
    m.put(b"b", b"y" * 250)
    m.put(b"c", b"")
    assert m.bytes == 350 and len(m) == 3


def test_bytes_accounting_after_replacement():
    m = make(Clock(), max_bytes=1000, sized=True)
    m.put(b"a", b"x" * 100)
    m.put(b"a", b"y" * 30)
    assert m.bytes == 30
    m.put(b"a", b"z" * 700)
    assert m.bytes == 700 and len(m) == 1 and m.evicted == 0


def test_max_bytes_evicts_the_oldest_until_it_fits():
    m = make(Clock(), max_bytes=1000, sized=True)
    m.put(b"a", b"a" * 400)
    m.put(b"b", b"b" * 400)
    m.put(b"c", b"c" * 150)
    assert m.bytes == 950 and m.evicted == 0
    m.put(b"d", b"d" * 500)       # 1450: a goes (1050), then b (650)
    assert m.bytes == 650 and m.evicted == 2
    assert keys_of(m, [b"a", b"b", b"c", b"d"]) == [b"c", b"d"]


def test_max_bytes_is_inclusive():
    m = make(Clock(), max_bytes=100, sized=True)
    m.put(b"a", b"x" * 60)
    m.put(b"b", b"x" * 40)
    assert m.bytes == 100 and m.evicted == 0 and len(m) == 2


def test_growing_a_value_in_place_evicts_older_ones():
    m = make(Clock(), max_bytes=100, sized=True)
    m.put(b"a", b"x" * 40)
    m.put(b"b", b"x" * 40)
    m.put(b"b", b"x" * 90)        # b becomes the newest; a must go for it to fit
    assert m.get(b"a") is None and m.get(b"b") == b"x" * 90
    assert m.bytes == 90 and m.evicted == 1


def test_value_larger_than_max_bytes_is_not_kept():
    m = make(Clock(), max_bytes=100, sized=True)
    m.put(b"big", b"x" * 101)
    assert m.get(b"big") is None
    assert m.bytes == 0 and len(m) == 0 and m.evicted == 1


def test_zero_max_bytes_means_no_byte_bound():
    m = make(Clock(), max_items=10, max_bytes=0, sized=True)
    m.put(b"a", b"x" * 10_000_000)
    m.put(b"b", b"x" * 10_000_000)
    assert len(m) == 2 and m.bytes == 20_000_000 and m.evicted == 0


def test_both_bounds_apply():
    m = make(Clock(), max_items=3, max_bytes=100, sized=True)
    for key in (b"a", b"b", b"c", b"d"):
        m.put(key, b"x" * 10)
    assert len(m) == 3 and m.bytes == 30 and m.evicted == 1   # by count
    m.put(b"e", b"x" * 90)        # 4 items, 120 bytes: b goes (count), then c (bytes: 110)
    assert keys_of(m, [b"b", b"c", b"d", b"e"]) == [b"d", b"e"]
    assert m.bytes == 100 and m.evicted == 3


def test_bytes_accounting_after_expiry():
    clock = Clock()
    m = make(clock, ttl=10.0, max_bytes=1000, sized=True)
    m.put(b"a", b"x" * 300)
    clock.advance(5)
    m.put(b"b", b"x" * 200)
    clock.advance(5)
    assert m.get(b"a") is None          # dropped by get
    assert m.bytes == 200
    clock.advance(5)
    m.expire()                          # dropped by expire
    assert m.bytes == 0 and len(m) == 0 and m.evicted == 0


def test_bytes_accounting_is_exact_over_a_mix():
    clock = Clock()
    m = make(clock, ttl=10.0, max_items=4, max_bytes=100, sized=True)
    m.put(b"a", b"x" * 30)              # a30
    m.put(b"b", b"x" * 30)              # a30 b30
    m.put(b"a", b"x" * 10)              # b30 a10
    clock.advance(5)
    m.put(b"c", b"x" * 50)              # b30 a10 c50 = 90
    m.put(b"d", b"x" * 20)              # 110 -> b goes: a10 c50 d20 = 80
    assert (m.bytes, m.evicted) == (80, 1)
    clock.advance(5)                    # a expires (put at 0, refreshed at 0)
    m.expire()
    assert (m.bytes, len(m)) == (70, 2)
    m.put(b"e", b"")                    # c50 d20 e0
    m.put(b"f", b"x" * 5)               # 4 items: c50 d20 e0 f5 = 75
    m.put(b"g", b"x" * 1)               # 5 items -> c goes: d20 e0 f5 g1 = 26
    assert (m.bytes, len(m), m.evicted) == (26, 4, 2)
    assert m.bytes == sum(len(m.get(k) or b"") for k in (b"d", b"e", b"f", b"g"))


# --- property: the map against a simple model


class Model:
    """The behaviour spelt out: a list of [key, deadline, value], oldest first."""

    def __init__(self, max_items: int, max_bytes: int, ttl: float):
        self.max_items, self.max_bytes, self.ttl = max_items, max_bytes, ttl
        self.entries: list[list] = []
        self.evicted = 0

    @property
    def bytes(self) -> int:
        return sum(len(value) for _, _, value in self.entries)

    def _over(self) -> bool:
        return len(self.entries) > self.max_items or (
            self.max_bytes > 0 and self.bytes > self.max_bytes)

    def put(self, now: float, key: bytes, value: bytes) -> None:
        self.entries = [e for e in self.entries if e[0] != key]
        self.entries.append([key, now + self.ttl, value])
        # Entries not yet dropped still take room, expired or not.
        while self.entries and self._over():
            self.entries.pop(0)
            self.evicted += 1

    def get(self, now: float, key: bytes) -> bytes | None:
        for i, (k, deadline, value) in enumerate(self.entries):
            if k == key:
                if now >= deadline:
                    del self.entries[i]
                    return None
                return value
        return None

    def expire(self, now: float) -> None:
        self.entries = [e for e in self.entries if e[1] > now]


KEYS = [b"/audio/%d.wav" % i for i in range(6)]

operations = st.lists(st.one_of(
    st.tuples(st.just("put"), st.sampled_from(KEYS), st.binary(max_size=40)),
    st.tuples(st.just("get"), st.sampled_from(KEYS)),
    st.tuples(st.just("expire")),
    st.tuples(st.just("tick"), st.sampled_from([0, 0.5, 1, 2.5, 4, 10])),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops=operations, max_items=st.integers(1, 5), max_bytes=st.sampled_from([0, 1, 30, 64, 120]),
       ttl=st.sampled_from([0.5, 1, 3, 10]))
def test_matches_the_model(ops, max_items, max_bytes, ttl):
    clock = Clock()
    m = ExpiringMap(max_items=max_items, ttl=ttl, max_bytes=max_bytes, size=len, clock=clock)
    model = Model(max_items, max_bytes, ttl)
    for op in ops:
        if op[0] == "put":
            m.put(op[1], op[2])
            model.put(clock.now, op[1], op[2])
        elif op[0] == "get":
            assert m.get(op[1]) == model.get(clock.now, op[1]), op
        elif op[0] == "expire":
            m.expire()
            model.expire(clock.now)
        else:
            clock.advance(op[1])
        assert len(m) == len(model.entries), op
        assert m.bytes == model.bytes, op
        assert m.evicted == model.evicted, op
        assert len(m) <= max_items
        assert max_bytes == 0 or m.bytes <= max_bytes
    # Every key agrees at the end, and the accounting matches what is really held.
    for key in KEYS:
        assert m.get(key) == model.get(clock.now, key)
    assert m.bytes == sum(len(m.get(k) or b"") for k in KEYS) == model.bytes
    m.expire()
    model.expire(clock.now)
    assert len(m) == len(model.entries) and m.bytes == model.bytes
