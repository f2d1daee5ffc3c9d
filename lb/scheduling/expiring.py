"""A bounded map whose entries expire: for two-step TTS calls.

Chatterbox answers a synthesis with JSON naming an `audio_url` that must be
fetched from the same server.  The balancer keeps two such maps:
`audio_url -> backend` (affinity: the follow-up GET goes where the file is)
and, for calls served by the Cartesia fallback, `audio_url -> WAV bytes`
(the balancer serves those files itself).  Both are bounded by count and,
for the audio, by bytes; the oldest entries go first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Generic, TypeVar

V = TypeVar("V")


class ExpiringMap(Generic[V]):
    def __init__(self, *, max_items: int, ttl: float, max_bytes: int = 0,
                 size: Callable[[V], int] = lambda value: 0,
                 clock: Callable[[], float] = time.monotonic):
        self.max_items = max_items
        self.max_bytes = max_bytes      # 0: no byte bound
        self.ttl = ttl
        self._size = size
        self._clock = clock
        self._items: OrderedDict[bytes, tuple[float, V]] = OrderedDict()
        self.bytes = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, key: bytes, value: V) -> None:
        self._drop(key)
        self._items[key] = (self._clock() + self.ttl, value)
        self.bytes += self._size(value)
        while self._items and (len(self._items) > self.max_items
                               or (self.max_bytes and self.bytes > self.max_bytes)):
            oldest = next(iter(self._items))
            self._drop(oldest)
            self.evicted += 1

    def get(self, key: bytes) -> V | None:
        entry = self._items.get(key)
        if entry is None:
            return None
        expires, value = entry
        if self._clock() >= expires:
            self._drop(key)
            return None
        return value

    def expire(self) -> None:
        """Drop what has expired (entries are in order of insertion, and so of expiry)."""
        now = self._clock()
        while self._items:
            key, (expires, _) = next(iter(self._items.items()))
            if expires > now:
                break
            self._drop(key)

    def _drop(self, key: bytes) -> None:
        entry = self._items.pop(key, None)
        if entry is not None:
            self.bytes -= self._size(entry[1])
