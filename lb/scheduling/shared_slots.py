"""Backend slots shared by every balancer process of a fleet, in Redis.

The first piece of `[cluster]` (issue 12; not wired into the scheduler
yet): the atomic operations a process needs to hold a backend to its limit
when other workers and other replicas send it calls too.

One sorted set per backend, `<fleet>:slots:<backend>`: a member per holder
(a call or tunnel under way somewhere in the fleet), scored by when its
lease runs out, in Redis's own clock (TIME), so replicas' clocks never have
to agree.  Every script first drops the holders whose lease ran out: a
replica killed with SIGKILL leaves its slots to expire within the lease.

    take     one script: drop the expired, count, add us if below the limit
             (atomic, so two processes can never both take the last slot)
    renew    push our lease out (the holder renews while its call runs);
             False if it ran out meanwhile (the slot may be someone else's)
    release  drop us, and PUBLISH the backend's name on `<fleet>:released`
             so processes with calls waiting try again at once
    counts   holders now per backend: the fleet-wide in-flight counts

A call that never gets an answer from Redis in time is the caller's to
bound (asyncio.wait_for with cluster.timeout); nothing here waits longer
than the client library's own socket timeout.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
from typing import Sequence

# KEYS[1]: the backend's set.  ARGV: limit, lease in ms, holder.
# -> {1, holders after} when taken, {0, holders} when the backend is full.
_TAKE = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[1]) then
  return {0, held}
end
redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
return {1, held + 1}
"""

# KEYS[1]: the backend's set.  ARGV: lease in ms, holder.  -> 1 renewed, 0 lost.
_RENEW = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms)
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', ms + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[1]))
return 1
"""

# KEYS: the backends' sets.  -> holders of each, the expired dropped first.
_COUNTS = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local out = {}
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', ms)
  out[i] = redis.call('ZCARD', key)
end
return out
"""


class SharedSlots:
    """The fleet's slots in Redis, for one process (`client`: a redis.asyncio.Redis)."""

    def __init__(self, client, fleet: str, lease: float):
        self.client = client
        self.fleet = fleet
        self.lease_ms = max(1, round(lease * 1000))
        self.channel = f"{fleet}:released"
        # Holders are unique across the fleet: host, pid, this instance (a
        # process may have more than one: a reload) and a counter.
        self._prefix = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}:"
        self._serial = itertools.count(1)
        self._take = client.register_script(_TAKE)
        self._renew = client.register_script(_RENEW)
        self._counts = client.register_script(_COUNTS)

    def key(self, backend: str) -> str:
        return f"{self.fleet}:slots:{backend}"

    async def take(self, backend: str, limit: int) -> str | None:
        """A slot of `backend` for a new holder (returned), or None if the
        fleet holds `limit` of them already."""
        holder = self._prefix + str(next(self._serial))
        taken, _ = await self._take(keys=[self.key(backend)],
                                    args=[limit, self.lease_ms, holder])
        return holder if taken else None

    async def renew(self, backend: str, holder: str) -> bool:
        return bool(await self._renew(keys=[self.key(backend)], args=[self.lease_ms, holder]))

    async def release(self, backend: str, holder: str) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zrem(self.key(backend), holder)
            pipe.publish(self.channel, backend)
            await pipe.execute()

    async def counts(self, backends: Sequence[str]) -> dict[str, int]:
        """Holders of each backend across the fleet now."""
        if not backends:
            return {}
        held = await self._counts(keys=[self.key(b) for b in backends], args=[])
        return dict(zip(backends, (int(n) for n in held)))
