"""Sans-io tests of the scheduler with its slots shared (a Gate, as
fleet_slots.FleetSlots is one): a pick is a claim until the gate answers;
a lost race gives the count back and picks again, first in line; a claim
answered after its caller left gives the slot back; the fleet's calls
elsewhere count against a backend's limit; ejections go out to the gate.

The gate here is a recorder whose answers the test gives by hand: what is
tested is the scheduler's side of the protocol (Redis's side runs against
a real redis-server in test_shared_slots.py and test_cluster.py)."""

from __future__ import annotations

from lb.scheduling.fleet_slots import LOST, UNAVAILABLE
from lb.scheduling.policy import make
from lb.scheduling.scheduler import TAKEN, Scheduler, Ticket

from test_scheduler_unit import Clock, Waiter, make_backend, passive


class RecordingGate:
    def __init__(self):
        self.shared = True
        self.claims: list[tuple] = []      # (backend, done) not answered yet
        self.released: list[str] = []
        self.ejections: list[tuple[str, float]] = []

    def claim(self, backend, done) -> None:
        self.claims.append((backend, done))

    def release(self, backend) -> None:
        self.released.append(backend.name)

    def ejected(self, backend, seconds: float) -> None:
        self.ejections.append((backend.name, seconds))

    def answer(self, result: str) -> str:
        backend, done = self.claims.pop(0)
        done(result)
        return backend.name


def fleet(*limits: int, queue_limit: int = 10):
    gate = RecordingGate()
    backends = [make_backend(i, limit) for i, limit in enumerate(limits)]
    scheduler = Scheduler(backends, make("least_conn"), queue_limit=queue_limit,
                          passive=passive(), clock=Clock(), gate=gate)
    return scheduler, backends, gate


def test_a_pick_waits_for_the_gate_then_goes():
    scheduler, (b0,), gate = fleet(2)
    waiter = Waiter()
    ticket = scheduler.acquire(waiter)
    assert isinstance(ticket, Ticket) and waiter.dispatched == []
    assert b0.in_flight == 1              # counted here at once: no second pick lands on it
    assert gate.answer(TAKEN) == "b0"
    assert waiter.dispatched == [b0]
    scheduler.release(b0)
    assert gate.released == ["b0"] and b0.in_flight == 0


def test_a_lost_race_picks_another_backend():
    scheduler, (b0, b1), gate = fleet(1, 1)
    waiter = Waiter()
    scheduler.acquire(waiter)
    first = gate.claims[0][0]
    first.in_flight_elsewhere = 1         # what the gate learns: the fleet filled it
    gate.answer(LOST)
    assert first.in_flight == 0
    other = b1 if first is b0 else b0
    assert gate.claims and gate.claims[0][0] is other   # picked again, elsewhere
    gate.answer(TAKEN)
    assert waiter.dispatched == [other]


def test_a_lost_race_with_the_fleet_full_waits_first_in_line():
    scheduler, (b0,), gate = fleet(1)
    early, late = Waiter("early"), Waiter("late")
    scheduler.acquire(early)
    b0.in_flight_elsewhere = 1
    gate.answer(LOST)
    assert scheduler.queued == 1 and not gate.claims
    b0.in_flight_elsewhere = 0            # a release elsewhere ...
    scheduler.acquire(late)               # ... and a newcomer: the one who waited goes first
    assert gate.answer(TAKEN) == "b0"
    assert early.dispatched == [b0] and late.dispatched == []
    assert scheduler.queued == 1


def test_no_answer_from_redis_picks_again_under_the_static_share():
    scheduler, (b0,), gate = fleet(4)
    waiter = Waiter()
    scheduler.acquire(waiter)
    gate.shared = False                   # degraded: the scheduler no longer claims
    b0.use_shared(False)
    gate.answer(UNAVAILABLE)
    assert waiter.dispatched == [b0] and not gate.claims
    assert b0.in_flight == 1


def test_a_claim_answered_after_its_caller_left_gives_the_slot_back():
    scheduler, (b0,), gate = fleet(2)
    waiter = Waiter()
    ticket = scheduler.acquire(waiter)
    scheduler.cancel(ticket, timed_out=True)
    assert scheduler.queued == 0          # a claim is not a place in the queue
    gate.answer(TAKEN)
    assert waiter.dispatched == [] and b0.in_flight == 0 and gate.released == ["b0"]
    assert scheduler.snapshot()["timed_out"] == 1


def test_calls_elsewhere_in_the_fleet_count_against_the_limit():
    scheduler, (b0, b1), gate = fleet(2, 2)
    b0.in_flight_elsewhere = 2            # full, from the other replicas
    for _ in range(2):
        scheduler.acquire(Waiter())
    assert [b.name for b, _ in gate.claims] == ["b1", "b1"]
    assert isinstance(scheduler.acquire(Waiter()), Ticket) and scheduler.queued == 1


def test_queued_calls_claim_when_dispatched():
    scheduler, (b0,), gate = fleet(1)
    first, second = Waiter(), Waiter()
    scheduler.acquire(first)
    gate.answer(TAKEN)
    scheduler.acquire(second)
    assert scheduler.queued == 1 and not gate.claims
    scheduler.release(b0)
    assert scheduler.queued == 0 and gate.answer(TAKEN) == "b0"
    assert second.dispatched == [b0]
    assert scheduler.snapshot()["dispatched"] == 1


def test_an_ejection_here_is_told_to_the_gate():
    scheduler, (b0, b1), gate = fleet(2, 2)
    seconds = scheduler.failed(b0, local=True, reason="connect refused")
    assert gate.ejections == [("b0", seconds)]


def test_an_ejection_reported_by_another_balancer_is_honoured_within_the_cap():
    scheduler, (b0, b1), gate = fleet(2, 2)
    scheduler.ejection_reported(b0, 5.0, "elsewhere")
    assert not b0.health.in_rotation(scheduler.clock())
    assert gate.ejections == []           # not told back to the fleet
    scheduler.passive = passive(max_ejected_percent=50)
    scheduler.ejection_reported(b1, 5.0, "elsewhere")
    assert b1.health.in_rotation(scheduler.clock())   # the last one stays
