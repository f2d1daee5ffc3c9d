"""The phases of a proxied request's life, and why calls went to Cartesia
(shared by `exchange` and its mixins).

An exchange's one `Deadline`; what it means depends on the phase:

    BUFFERING  a body of up to `retry.replay_max_bytes` arriving, before
               any slot is taken (a slow sender holds no GPU)
                                             -> `timeouts.idle` of silence
    QUEUED     waiting for a slot            -> `balancer.queue_timeout`, then 503
    SENDING    request body still coming     -> `timeouts.idle` of silence
    WAITING    request sent, no response yet -> `timeouts.first_byte`
    RECEIVING  response body streaming       -> `timeouts.idle` of silence
    BACKOFF    between two attempts          -> the jittered back-off
    FALLBACK   handed to Cartesia            -> `timeouts.idle` while the body
                                                still comes, then the fallback's
                                                own `fallback.cartesia.timeout`
    SPEECH     served by the OpenAI front door -> none here: each backend call
                                                it makes has its own timeouts
    TUNNEL     switched protocols (a 101)    -> none here: the tunnel's own
                                                `timeouts.tunnel_idle` (see `tunnel`)

(connecting is bounded by `timeouts.connect` in the pool).  A second
deadline, `timeouts.client_body`, bounds the whole request body from its
head on, whatever the phase: past it, 408.
"""

from __future__ import annotations

from ..scheduling.scheduler import NO_BACKEND, QUEUE_FULL, QUEUE_TIMEOUT
from ..tts.fallback import FALLBACK_FAILED

QUEUED, CONNECTING, SENDING, WAITING, RECEIVING, BACKOFF, FALLBACK, DONE, BUFFERING, TUNNEL, \
    SPEECH = range(11)

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
FALLBACK_REASONS = (NO_BACKEND, QUEUE_FULL, QUEUE_TIMEOUT, FALLBACK_FAILED)
