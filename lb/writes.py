"""Coalesced writes, shared by the client- and backend-side protocols.

Handling one read usually produces several h11 events to send (a response
head, body, end).  Writing each at once costs a system call apiece; instead
they are gathered and go out in one writelines() at the end of the loop
iteration.  Backpressure still works: the transport's pause_writing fires
when the gathered bytes are written, at most one read's worth later.
"""

from __future__ import annotations

import asyncio


class CoalescedWrites:
    """Mixin for a Protocol with `transport`, `_loop`, `_out` and `_flush_scheduled`."""

    __slots__ = ()

    transport: asyncio.Transport
    _loop: asyncio.AbstractEventLoop
    _out: list
    _flush_scheduled: bool

    def _can_write(self) -> bool:
        return not self.transport.is_closing()

    def _write(self, parts: list) -> None:
        self._out.extend(parts)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out:
            out, self._out = self._out, []
            if self._can_write():
                self.transport.writelines(out)
