"""An exchange that switched protocols: a WebSocket (or any HTTP Upgrade)
after the backend's 101, and routes whose calls take no slot.  A mixin of
`Exchange`, its tunnel half kept in a module of its own.

The upgrade request went out like any request (Upgrade and Connection:
upgrade kept, on a connection of its own, never retried once sent, never
handed to Cartesia).  On a 101 both connections become one byte tunnel
(`wire.splice`): the client gets the 101, the two transports are joined,
and the exchange stays open -- holding its backend slot, counted in
`in_flight` so a drain waits for it -- until the tunnel ends.  Then it is
accounted once like any request: status 101, the tunnel's bytes each way,
and why it ended.
"""

from __future__ import annotations

import time

from ..wire import headers as hdr
from ..wire.framing import Response
from ..wire.splice import SHUTDOWN, Splice
from .phases import DONE, TUNNEL


class Tunnelling:
    """For `Exchange` (which has every attribute used here)."""
    __slots__ = ()

    def _choose_slotless(self) -> None:
        """A `slot = false` route: any backend in the rotation, the policy's
        choice whatever its limit, and nothing held (like a two-step GET)."""
        tried = self.tried
        backend = self.balancer.scheduler.choose(frozenset(tried))
        if backend is None:
            self.no_backend()
        else:
            self._begin(backend, hold=False)

    def _switch(self, response: Response) -> None:
        """The backend answered 101: join the two connections."""
        backend, balancer = self.backend, self.balancer
        self._open = False
        backend.record_response(101)
        balancer.scheduler.succeeded(backend)
        self.status = 101
        self.ttfb = time.monotonic() - self.started
        self.response_started = True
        self._kept = None
        self._deadline.cancel()
        self.phase = TUNNEL
        conn, self.upstream = self.upstream, None
        backend_transport, backend_first = conn.switch_protocols()
        client_transport, client_first = self.client.switch_protocols(
            hdr.switching(response.headers, request_id=self.request_id,
                          upgrade=response.upgrade))
        balancer.tunnels.add(self)
        # (a Splice ends only from a later callback, never while it is made)
        self.splice = Splice(balancer.loop, client_transport, backend_transport,
                             idle=balancer.config.timeouts.tunnel_idle,
                             on_end=self._tunnel_ended, on_client_lost=self.client.tunnel_closed,
                             client_first=client_first, backend_first=backend_first)
        backend.tunnels.joined(self.splice)

    def _tunnel_ended(self, why: str) -> None:
        if self.phase == DONE:
            return
        splice, backend = self.splice, self.backend
        self.ended = why
        self.bytes_in = splice.bytes_to_backend
        self.bytes_out = splice.bytes_to_client
        backend.tunnels.parted(splice)
        self.balancer.tunnels.discard(self)
        self._finish()

    def close_tunnel(self, why: str = SHUTDOWN) -> None:
        """The balancer is stopping (or the drain timed out): end it now."""
        if self.splice is not None:
            self.splice.close(why)
