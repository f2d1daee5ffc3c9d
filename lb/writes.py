"""Coalesced writes, shared by the client- and backend-side protocols.

Handling one read usually produces several h11 events to send (a response
head, body, end).  Writing each at once costs a system call apiece; instead
they are gathered and go out in one writelines() at the end of the loop
iteration.

Only small writes wait.  libuv reads a ready socket up to 32 times in one
go, so a bulk body could pile up megabytes before the end of the iteration;
a body piece of COALESCE_MAX bytes or more is written at once (with what
waits before it), so the transport's pause_writing -- and with it the pause
of the other side's reading -- happens at the next read, not later.
"""

from __future__ import annotations

import asyncio

COALESCE_MAX = 16 * 1024


class CoalescedWrites:
    """Mixin for a Protocol with `transport`, `_loop`, `_out` and `_flush_scheduled`."""

    __slots__ = ()

    transport: asyncio.Transport
    _loop: asyncio.AbstractEventLoop
    _out: list
    _flush_scheduled: bool

    def _can_write(self) -> bool:
        return not self.transport.is_closing()

    def _write(self, parts: list, size: int = 0) -> None:
        """Queue h11's output; `size` is the body bytes in it, if any."""
        self._out.extend(parts)
        if size >= COALESCE_MAX:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out:
            out, self._out = self._out, []
            if self._can_write():
                self.transport.writelines(out)
