"""The retry budget, the back-off between attempts, and retry accounting.

A retry is only ever decided before the first response byte has gone to the
client (see exchange.py).  Here is what bounds them fleet-wide: at most
`budget_percent` of the requests under way may be retrying at once, but
never fewer than `budget_min`, so a fleet-wide outage cannot double the
load on servers that are already struggling (Envoy's retry budget).
"""

from __future__ import annotations

import random
from collections import Counter, deque

from ..config_model import Retry

# Connection-level failures worth another backend: nothing reached the
# client yet and the backend did not answer.  An idle timeout while the
# request body streams is not here: that backend was reading, then stalled.
RETRYABLE_KINDS = frozenset({"connect", "connect_timeout", "reset", "first_byte_timeout",
                             "bad_response"})

# Why a wanted retry was not made (RetryBudget.denied; /metrics shows each from the start).
DENIED_BODY_TOO_LARGE = "body_too_large"   # the body outgrew retry.replay_max_bytes
DENIED_BUDGET = "budget"                   # retry.budget_percent of those under way retry already
DENIAL_REASONS = (DENIED_BODY_TOO_LARGE, DENIED_BUDGET)

RECENT = 32   # retried requests kept for /lb-stats


def status_reason(status: int) -> str:
    """The reason a retry, or a fallback, after a backend's `status` answer is counted under."""
    return f"status_{status}"


def retry_reasons(statuses) -> list[str]:
    """Every reason RetryBudget.by_reason can count with retry.statuses = `statuses`:
    the retryable failure kinds, and one status_NNN per status."""
    return sorted(RETRYABLE_KINDS) + [status_reason(s) for s in sorted(statuses)]


class RetryBudget:
    def __init__(self, cfg: Retry, rng: random.Random | None = None):
        self.cfg = cfg
        self.rng = rng or random.Random()
        self.active = 0         # proxied requests under way
        self.retrying = 0       # of those, how many are on a second or later attempt
        self.retries = 0        # retries started, ever
        self.by_reason: Counter[str] = Counter()
        self.denied: Counter[str] = Counter()   # retries wanted but not made, by why
        self.recent: deque[dict] = deque(maxlen=RECENT)

    def allows(self) -> bool:
        """May one more request start retrying now?"""
        return self.retrying + 1 <= max(self.cfg.budget_min,
                                        self.active * self.cfg.budget_percent / 100)

    def backoff(self, retry_number: int) -> float:
        """Seconds to wait before retry number `retry_number` (1, 2, ...):
        exponential from backoff_base, at most backoff_max, the upper half jittered."""
        cap = min(self.cfg.backoff_max, self.cfg.backoff_base * 2 ** (retry_number - 1))
        return cap / 2 + self.rng.random() * cap / 2

    def remember(self, request_id: str, status: int, tried: list[str], why: list[str]) -> None:
        self.recent.append({"request_id": request_id, "status": status,
                            "attempts": len(tried), "backends": list(tried), "why": list(why)})

    def snapshot(self) -> dict:
        return {
            "attempts_max": self.cfg.attempts,
            "retries": self.retries,
            "retrying_now": self.retrying,
            "by_reason": dict(self.by_reason),
            "not_retried": dict(self.denied),
            "recent": list(self.recent),
        }
