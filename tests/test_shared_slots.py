"""lb.scheduling.shared_slots against a real redis-server (started on a free
loopback port, persistence off) through redis-py's asyncio client: slots
taken up to the limit and no further, however many processes race for
them; leases that run out free their slots; renewals keep them; a release
frees one at once and is published; the fleet-wide counts.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest

pytest.importorskip("redis")
import redis.asyncio as aioredis  # noqa: E402

from lb.scheduling.shared_slots import SharedSlots  # noqa: E402
from test_tcp_listener import RedisServer  # noqa: E402


@pytest.fixture(scope="module")
def redis_server():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def run(redis_server, request):
    """run(test(make)) on a fresh event loop; make(lease) -> a SharedSlots on
    its own connection, in a fleet of this test's own (keys never collide)."""
    fleet = f"t-{request.node.name}"

    def runner(test) -> None:
        async def main():
            clients = []

            def make(lease: float = 10.0) -> SharedSlots:
                client = aioredis.Redis(host="127.0.0.1", port=redis_server.port,
                                        socket_timeout=5)
                clients.append(client)
                return SharedSlots(client, fleet, lease)

            try:
                await asyncio.wait_for(test(make), 30)
            finally:
                for client in clients:
                    await client.aclose()
        asyncio.run(main())
    return runner


def test_slots_are_taken_up_to_the_limit_and_a_release_frees_one(run):
    async def test(make):
        slots = make()
        holders = [await slots.take("gpu0", 3) for _ in range(4)]
        assert all(holders[:3]) and holders[3] is None
        assert len(set(holders[:3])) == 3
        assert await slots.counts(["gpu0", "gpu1"]) == {"gpu0": 3, "gpu1": 0}
        await slots.release("gpu0", holders[0])
        assert await slots.counts(["gpu0"]) == {"gpu0": 2}
        assert await slots.take("gpu0", 3) is not None
        assert await slots.take("gpu1", 3) is not None      # each backend its own
    run(test)


def test_many_processes_racing_never_take_more_than_the_limit(run):
    async def test(make):
        replicas = [make() for _ in range(5)]                 # five connections
        taken = await asyncio.gather(*(replicas[i % 5].take("gpu0", 4) for i in range(60)))
        assert sum(h is not None for h in taken) == 4
        assert (await replicas[0].counts(["gpu0"]))["gpu0"] == 4
    run(test)


def test_an_expired_lease_frees_its_slot_and_a_renewed_one_holds(run):
    async def test(make):
        slots = make(lease=0.3)
        kept = await slots.take("gpu0", 2)
        lost = await slots.take("gpu0", 2)
        assert await slots.take("gpu0", 2) is None
        for _ in range(4):                                    # 0.6 s: past the first lease
            await asyncio.sleep(0.15)
            assert await slots.renew("gpu0", kept)
        # `lost` was never renewed (its process died, say): gone, its slot free.
        assert await slots.counts(["gpu0"]) == {"gpu0": 1}
        assert not await slots.renew("gpu0", lost)
        assert await slots.take("gpu0", 2) is not None
        assert await slots.take("gpu0", 2) is None
    run(test)


def test_a_release_is_published_for_those_waiting(run):
    async def test(make):
        slots = make()
        holder = await slots.take("gpu0", 1)
        pubsub = slots.client.pubsub()
        await pubsub.subscribe(slots.channel)
        assert (await pubsub.get_message(timeout=2))["type"] == "subscribe"
        await make().release("gpu0", holder)                  # released elsewhere
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
        assert message is not None and message["data"] == b"gpu0", message
        await pubsub.aclose()
    run(test)


def test_an_unused_backends_key_does_not_outlive_its_leases(run, redis_server):
    async def test(make):
        slots = make(lease=0.2)
        await slots.take("gpu0", 1)
        assert await slots.client.exists(slots.key("gpu0"))
        await asyncio.sleep(0.6)                              # 2 x lease: the key expires
        assert not await slots.client.exists(slots.key("gpu0"))
    run(test)
