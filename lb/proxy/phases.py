"""The phases of a proxied request's life, and why calls went to Cartesia.

(Shared by `exchange` and `recovery`; see exchange's docstring for what
each phase's deadline means.)
"""

from __future__ import annotations

from ..scheduling.scheduler import NO_BACKEND, QUEUE_FULL

QUEUED, CONNECTING, SENDING, WAITING, RECEIVING, BACKOFF, FALLBACK, DONE, BUFFERING = range(9)

# A backend's JSON answer to a two-step call is read (up to this much) for
# its audio_url, so the follow-up GET goes to the backend that has the file.
AFFINITY_PEEK = 64 * 1024

# The keep-alive race: a backend closes an idle pooled connection just as we
# send a request on it.  Such a request was never processed, so it is sent
# again once, to the same backend on a fresh connection, if its body is still
# kept and the loss came within REPLAY_WINDOW seconds of sending.  That is
# not a retry and not the backend's failure.  A later loss means the backend
# may have worked on it: a failure, which may be retried elsewhere.
REPLAY_WINDOW = 0.25

# While connecting, a backstop beyond timeouts.connect in case the connect
# task dies in a way nobody foresaw: the request must not hang.
CONNECT_BACKSTOP = 1.0

# Why a call went to Cartesia (balancer.fallbacks; /metrics shows each from
# the start), besides status_reason(NNN) for a backend's 5xx answer.
QUEUE_TIMEOUT = "queue_timeout"
FALLBACK_FAILED = "failed"        # the last attempt failed with no response
FALLBACK_REASONS = (NO_BACKEND, QUEUE_FULL, QUEUE_TIMEOUT, FALLBACK_FAILED)
