"""Backend slots shared by every balancer process of a fleet, in Redis.

The atomic operations a process needs to hold a backend to its limit when
other workers and other replicas send it calls too (`fleet_slots` uses
them).

One sorted set per backend, `<fleet>:slots:<backend>`: a member per holder
(a call or tunnel under way somewhere in the fleet), scored by when its
lease runs out, in Redis's own clock (TIME), so replicas' clocks never have
to agree.  Every script first drops the holders whose lease ran out: a
replica killed with SIGKILL leaves its slots to expire within the lease.

    take     one script: drop the expired, count, add us if below the limit
             (atomic, so two processes can never both take the last slot)
    hold     push out the leases of all this process's holders at once (it
             renews while their calls run): a holder whose lease ran out
             meanwhile stays out, its slot may be someone else's; or adopt
             calls that started while Redis was away
    release  drop holders, and PUBLISH "released <backend>" on
             `<fleet>:events` so processes with calls waiting try again
    (hold with no holders of ours reads the fleet-wide in-flight counts)

The same channel carries an operator's drain / maint / ready (kept in the
hash `<fleet>:admin` too, for a replica that starts later) and passive
ejections, so every replica stops sending to a backend one found broken.

A call that never gets an answer from Redis in time is the caller's to
bound (asyncio.wait_for with cluster.timeout); nothing here waits longer
than the client library's own socket timeout.  Valkey runs the same.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket

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

# KEYS: the backends' sets.  ARGV: lease in ms, "XX" (renew: only holders
# still there; one whose lease ran out stays out) or "" (adopt: add them,
# whatever the count), then for each key how many holders follow and them.
# -> holders of each set after.
_HOLD = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local lease = tonumber(ARGV[1])
local at = 3
local out = {}
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', ms)
  local n = tonumber(ARGV[at])
  for j = 1, n do
    if ARGV[2] == 'XX' then
      redis.call('ZADD', key, 'XX', ms + lease, ARGV[at + j])
    else
      redis.call('ZADD', key, ms + lease, ARGV[at + j])
    end
  end
  at = at + n + 1
  if n > 0 then
    redis.call('PEXPIRE', key, 2 * lease)
  end
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
        self.channel = f"{fleet}:events"     # releases, admin states, ejections
        self.admin_key = f"{fleet}:admin"    # backend -> drain | maint (ready: absent)
        # Holders are unique across the fleet: host, pid, this instance (a
        # process may have more than one: a reload) and a counter.
        self.origin = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._serial = itertools.count(1)
        self._take = client.register_script(_TAKE)
        self._hold = client.register_script(_HOLD)

    async def reconnect(self) -> None:
        """Drop every pooled connection: after an outage they are dead, and
        each would fail one call before the pool notices."""
        await self.client.connection_pool.disconnect()

    def key(self, backend: str) -> str:
        return f"{self.fleet}:slots:{backend}"

    def new_holder(self) -> str:
        return f"{self.origin}:{next(self._serial)}"

    async def take(self, backend: str, limit: int, holder: str) -> tuple[bool, int]:
        """A slot of `backend` for `holder` unless the fleet holds `limit`
        of them already. -> (taken, holders now)."""
        taken, held = await self._take(keys=[self.key(backend)],
                                       args=[limit, self.lease_ms, holder])
        return bool(taken), int(held)

    async def hold(self, holders: dict[str, list[str]], *, adopt: bool = False) -> dict[str, int]:
        """Push out the leases of `holders` (backend -> ours); with `adopt`,
        (re)add them whatever the count (calls that started while Redis was
        away).  -> holders of each backend now, ours included."""
        names = list(holders)
        if not names:
            return {}
        args: list = [self.lease_ms, "" if adopt else "XX"]
        for name in names:
            args.append(len(holders[name]))
            args.extend(holders[name])
        held = await self._hold(keys=[self.key(n) for n in names], args=args)
        return dict(zip(names, (int(n) for n in held)))

    async def release(self, holders: list[tuple[str, str]]) -> None:
        """Drop each (backend, holder) and tell the fleet which backends have
        a free slot now, in one round trip."""
        async with self.client.pipeline(transaction=False) as pipe:
            for backend, holder in holders:
                pipe.zrem(self.key(backend), holder)
            for backend in dict.fromkeys(b for b, _ in holders):
                pipe.publish(self.channel, f"released {backend} {self.origin}")
            await pipe.execute()

    # --- what the operator and the passive checks decide, for every replica

    async def set_admin(self, backend: str, state: str) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            if state == "ready":
                pipe.hdel(self.admin_key, backend)
            else:
                pipe.hset(self.admin_key, backend, state)
            pipe.publish(self.channel, f"admin {backend} {self.origin} {state}")
            await pipe.execute()

    async def admin_states(self) -> dict[str, str]:
        """Backends an operator took out somewhere in the fleet -> drain | maint."""
        states = await self.client.hgetall(self.admin_key)
        return {k.decode("utf-8", "replace"): v.decode("ascii", "replace")
                for k, v in states.items()}

    async def ejected(self, backend: str, seconds: float) -> None:
        await self.client.publish(self.channel, f"ejected {backend} {self.origin} {seconds:.3f}")


def event(message: bytes) -> tuple[str, str, str, str] | None:
    """A message on the fleet's channel -> (what, backend, origin, argument),
    None if it is not one of ours."""
    parts = message.decode("utf-8", "replace").split(" ")
    if len(parts) == 3:
        parts.append("")
    if len(parts) != 4 or parts[0] not in ("released", "admin", "ejected"):
        return None
    return parts[0], parts[1], parts[2], parts[3]
