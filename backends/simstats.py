"""The counters of a simulated GPU server, for its /_stats (see simserver.py)."""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .simserver import Conn

RECENT = 64                   # synthesis records kept for /_stats


class Stats:
    """Counters for /_stats.  Ordinary requests: every request but /_* (health checks count).
    Synthesis: requests that passed validation and the loading check and went to the GPU
    (through the lock, if the kind has one); `outcomes` says how each ended: ok, failed (500),
    hung, reset, gone (the client left first) or crashed."""

    def __init__(self):
        self.connections_open = self.requests_in_flight = self.synth_in_flight = 0
        self.crashes = 0
        self.reset()

    def reset(self):
        self.connections_total = self.requests_total = self.synth_total = 0
        self.synth_rejected = self.crashes = 0
        self.max_requests_in_flight = self.requests_in_flight
        self.max_synth_in_flight = self.synth_in_flight
        self.max_slowdown = 0.0
        self.outcomes: dict[str, int] = {}
        self.recent: deque[dict] = deque(maxlen=RECENT)

    def request_started(self, c: "Conn"):
        if not c.counted:
            c.counted = True
            self.connections_open += 1
            self.connections_total += 1
        c.in_flight = True
        self.requests_in_flight += 1
        self.requests_total += 1
        self.max_requests_in_flight = max(self.max_requests_in_flight, self.requests_in_flight)

    def request_done(self, c: "Conn"):
        if c.in_flight:
            c.in_flight = False
            self.requests_in_flight -= 1

    def conn_closed(self, c: "Conn"):
        if c.counted:
            c.counted = False
            self.connections_open -= 1

    def synth_started(self):
        self.synth_in_flight += 1
        self.synth_total += 1
        self.max_synth_in_flight = max(self.max_synth_in_flight, self.synth_in_flight)

    def synth_done(self, record: dict):
        self.synth_in_flight -= 1
        self.outcomes[record["outcome"]] = self.outcomes.get(record["outcome"], 0) + 1
        if record["work"] > 0:
            self.max_slowdown = max(self.max_slowdown, record["slowdown"])
        self.recent.append(record)

    def snapshot(self) -> dict:
        return {"connections_open": self.connections_open,
                "connections_total": self.connections_total,
                "requests_in_flight": self.requests_in_flight,
                "max_requests_in_flight": self.max_requests_in_flight,
                "requests_total": self.requests_total,
                "synth_in_flight": self.synth_in_flight,
                "max_synth_in_flight": self.max_synth_in_flight,
                "synth_total": self.synth_total, "synth_rejected": self.synth_rejected,
                "outcomes": dict(self.outcomes), "crashes": self.crashes,
                "max_slowdown": round(self.max_slowdown, 4), "recent": list(self.recent)}
