"""lb.scheduling.shared_slots against a real redis-server (started on a free
loopback port, persistence off) through redis-py's asyncio client: slots
taken up to the limit and no further, however many processes race for
them; leases that run out free their slots; renewals keep them; adopted
holders count; a release frees one at once and is published; admin states
kept; the fleet-wide counts.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest

pytest.importorskip("redis")
import redis.asyncio as aioredis  # noqa: E402

from lb.scheduling.shared_slots import SharedSlots, event  # noqa: E402
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


async def take(slots: SharedSlots, backend: str, limit: int) -> str | None:
    """A new holder of a slot of `backend`, or None if the fleet is full there."""
    holder = slots.new_holder()
    taken, _ = await slots.take(backend, limit, holder)
    return holder if taken else None


def test_slots_are_taken_up_to_the_limit_and_a_release_frees_one(run):
    async def test(make):
        slots = make()
        holders = [await take(slots, "gpu0", 3) for _ in range(4)]
        assert all(holders[:3]) and holders[3] is None
        assert len(set(holders[:3])) == 3
        assert await slots.hold({"gpu0": [], "gpu1": []}) == {"gpu0": 3, "gpu1": 0}
        await slots.release([("gpu0", holders[0])])
        assert await slots.hold({"gpu0": []}) == {"gpu0": 2}
        assert await take(slots, "gpu0", 3) is not None
        assert await take(slots, "gpu1", 3) is not None      # each backend its own
    run(test)


def test_take_says_how_many_the_fleet_holds(run):
    async def test(make):
        one, other = make(), make()
        assert await one.take("gpu0", 2, one.new_holder()) == (True, 1)
        assert await other.take("gpu0", 2, other.new_holder()) == (True, 2)
        assert await other.take("gpu0", 2, other.new_holder()) == (False, 2)
    run(test)


def test_many_processes_racing_never_take_more_than_the_limit(run):
    async def test(make):
        replicas = [make() for _ in range(5)]                 # five connections
        taken = await asyncio.gather(*(take(replicas[i % 5], "gpu0", 4) for i in range(60)))
        assert sum(h is not None for h in taken) == 4
        assert (await replicas[0].hold({"gpu0": []}))["gpu0"] == 4
    run(test)


def test_an_expired_lease_frees_its_slot_and_a_renewed_one_holds(run):
    async def test(make):
        slots = make(lease=0.3)
        kept = await take(slots, "gpu0", 2)
        lost = await take(slots, "gpu0", 2)
        assert await take(slots, "gpu0", 2) is None
        for _ in range(4):                                    # 0.6 s: past the first lease
            await asyncio.sleep(0.15)
            assert (await slots.hold({"gpu0": [kept]}))["gpu0"] >= 1   # kept is still there
        # `lost` was never renewed (its process died, say): gone, its slot free,
        # and renewing it now does not bring it back.
        assert await slots.hold({"gpu0": [lost]}) == {"gpu0": 1}
        assert await take(slots, "gpu0", 2) is not None
        assert await take(slots, "gpu0", 2) is None
    run(test)


def test_adopting_adds_holders_whatever_the_count(run):
    async def test(make):
        slots = make()
        assert await take(slots, "gpu0", 1) is not None
        # Calls that started while Redis was away are counted, even past the limit.
        adopted = [slots.new_holder(), slots.new_holder()]
        assert await slots.hold({"gpu0": adopted, "gpu1": []}, adopt=True) == {"gpu0": 3,
                                                                                "gpu1": 0}
        assert await take(slots, "gpu0", 3) is None
    run(test)


def test_a_release_is_published_for_those_waiting(run):
    async def test(make):
        slots = make()
        holder = await take(slots, "gpu0", 1)
        pubsub = slots.client.pubsub()
        await pubsub.subscribe(slots.channel)
        assert (await pubsub.get_message(timeout=2))["type"] == "subscribe"
        elsewhere = make()
        await elsewhere.release([("gpu0", holder)])           # released elsewhere
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
        assert message is not None
        assert event(message["data"]) == ("released", "gpu0", elsewhere.origin, "")
        await pubsub.aclose()
    run(test)


def test_admin_states_are_kept_for_replicas_that_start_later(run):
    async def test(make):
        await make().set_admin("gpu0", "drain")
        await make().set_admin("gpu1", "maint")
        assert await make().admin_states() == {"gpu0": "drain", "gpu1": "maint"}
        await make().set_admin("gpu0", "ready")
        assert await make().admin_states() == {"gpu1": "maint"}
    run(test)


def test_events_that_are_not_ours_are_ignored():
    assert event(b"ejected gpu0 host:1:ab 9.500") == ("ejected", "gpu0", "host:1:ab", "9.500")
    assert event(b"admin gpu0 host:1:ab drain") == ("admin", "gpu0", "host:1:ab", "drain")
    assert event(b"hello") is None
    assert event(b"reboot gpu0 host:1:ab now") is None
    assert event(b"\xff\xfe released") is None


def test_an_unused_backends_key_does_not_outlive_its_leases(run, redis_server):
    async def test(make):
        slots = make(lease=0.2)
        await take(slots, "gpu0", 1)
        assert await slots.client.exists(slots.key("gpu0"))
        await asyncio.sleep(0.6)                              # 2 x lease: the key expires
        assert not await slots.client.exists(slots.key("gpu0"))
    run(test)
