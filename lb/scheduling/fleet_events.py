"""What the fleet's other balancers tell this one, on `<fleet>:events`.

    released <backend>   a slot there is free: count one fewer elsewhere
                         and let a waiting call try for it now (a message
                         lost while the subscription is down is made up by
                         fleet_slots' periodic re-check)
    admin <backend> ...  an operator's drain / maint / ready on any replica
    ejected <backend> .. passive health there found it failing

Each (re)subscription first reads the admin states kept in Redis, so a
replica that starts, or reconnects, late still honours a drain.  Our own
messages come back too; they are recognised by their origin.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from .backend import Backend
from .fleet_slots import RECOVER_EVERY, REDIS_TROUBLE
from .shared_slots import event

log = logging.getLogger("lb")

ADMIN_STATES = ("ready", "drain", "maint")


class FleetEvents:
    def __init__(self, client, slots, scheduler, loop: asyncio.AbstractEventLoop,
                 by_name: Callable[[], dict[str, Backend]]):
        self.client = client
        self.slots = slots
        self.scheduler = scheduler
        self.loop = loop
        self._by_name = by_name
        self._task: asyncio.Task | None = None
        self.received = 0

    def start(self) -> None:
        self._task = self.loop.create_task(self._listen())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _listen(self) -> None:
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await asyncio.wait_for(pubsub.subscribe(self.slots.channel), RECOVER_EVERY)
                await self._sync_admin()
                while True:
                    message = await pubsub.get_message(timeout=RECOVER_EVERY)
                    if message is not None and message.get("type") == "message":
                        self.on_message(message["data"])
            except REDIS_TROUBLE:
                await asyncio.sleep(RECOVER_EVERY)   # fleet_slots reports the outage
            except Exception:
                log.exception("cluster: reading the fleet's events failed")
                await asyncio.sleep(RECOVER_EVERY)
            finally:
                try:
                    await asyncio.wait_for(pubsub.aclose(), RECOVER_EVERY)
                except BaseException:   # closing a broken subscription: nothing to keep
                    pass

    async def _sync_admin(self) -> None:
        states = await asyncio.wait_for(self.slots.admin_states(), RECOVER_EVERY)
        for name, backend in self._by_name().items():
            self._admin(backend, states.get(name, "ready"))

    def _admin(self, backend: Backend, state: str) -> None:
        if state in ADMIN_STATES and backend.health.admin != state:
            self.scheduler.set_admin(backend, state)

    def on_message(self, data: bytes) -> None:
        parsed = event(data)
        if parsed is None:
            return
        what, name, origin, argument = parsed
        backend = self._by_name().get(name)
        if backend is None:
            return      # a backend this replica does not have (config drift, reload)
        self.received += 1
        if what == "admin":
            self._admin(backend, argument)
        elif origin == self.slots.origin:
            return      # our own release or ejection coming back
        elif what == "released":
            if backend.in_flight_elsewhere > 0:
                backend.in_flight_elsewhere -= 1
            if self.scheduler.queued:
                self.scheduler.dispatch()
        elif what == "ejected":
            try:
                seconds = float(argument)
            except ValueError:
                return
            self.scheduler.ejection_reported(backend, min(seconds, 3600.0), origin)
