"""What a virtio-rng request is, and how one vring's requests are served.

A request is one descriptor chain of device-writable buffers. Serving it means: ask the
bandwidth budget for up to the chain's length, read that many bytes from the entropy source
straight into guest memory, and return the chain on the used ring with the count written.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Protocol

import trio

from rngd.incidents import IncidentLog
from rngd.source import EntropySource
from rngd.virtqueue import MAX_REQUEST_BYTES, ChainError, Segment, SplitQueue

#: Requests served between forced checkpoints (and interrupts) while a ring stays busy.
_BATCH = 32


class Budget(Protocol):
    """One guest's view of the bandwidth scheduler (rngd.bandwidth)."""

    def try_acquire(self, want: int) -> int:
        """Grant up to `want` bytes now without waiting; 0 if nothing is left this period."""
        ...

    async def acquire(self, want: int) -> int:
        """Grant 1..`want` bytes, parking until the next refill if nothing is left."""
        ...

    def refund(self, unused: int) -> None:
        """Give back the part of a grant that was not used."""
        ...


class RngDevice:
    """Serves the requestq of one connection's RNG device."""

    def __init__(self, source: EntropySource, budget: Budget, incident: IncidentLog) -> None:
        self.source = source
        self.budget = budget
        self.incident = incident

    async def run(
        self,
        queue: SplitQueue,
        kick_fd: int,
        interrupt: Callable[[], None],
        *,
        notify_on_empty: bool = False,
    ) -> None:
        """The kick-handler task of one vring: drain, then sleep until kicked, forever.

        The ring is drained once before the first wait: QEMU's kick eventfd starts out
        signalled, and requests may have been posted before the ring was started.
        """
        while True:
            await self.drain(queue, interrupt, notify_on_empty)
            await trio.lowlevel.wait_readable(kick_fd)
            # A spurious wake-up (EAGAIN) is harmless: drain finds nothing and we wait again.
            with contextlib.suppress(BlockingIOError):
                os.read(kick_fd, 8)

    async def drain(
        self, queue: SplitQueue, interrupt: Callable[[], None], notify_on_empty: bool = False
    ) -> None:
        """Serve every available request, then re-enable notifications and signal the guest."""

        def flush() -> None:
            if queue.needs_interrupt(notify_on_empty):
                interrupt()

        served = 0
        try:
            while True:
                while queue.pending():
                    await self.serve_one(queue, flush)
                    served += 1
                    if served % _BATCH == 0:
                        # A guest that keeps its ring full must not starve the other tasks:
                        # the fast path of serve_one never yields on its own.
                        flush()
                        await trio.lowlevel.checkpoint()
                if not queue.enable_notifications():
                    break
        finally:
            # Also when a stop or error cuts the batch short: completions already made must
            # reach the guest.
            flush()

    async def serve_one(self, queue: SplitQueue, flush: Callable[[], None]) -> None:
        head = queue.head()
        try:
            segments = queue.chain(head)
        except ChainError as exc:
            self.incident("request %d refused, completed empty: %s", head, exc)
            queue.complete(head, 0)
            return
        want = min(sum(s.length for s in segments), MAX_REQUEST_BYTES)
        granted = self.budget.try_acquire(want)
        if not granted:
            # Parking may take a whole period: let the guest see what is already done.
            flush()
            granted = await self.budget.acquire(want)
        written = 0
        try:
            written = await self.fill(segments, granted)
        finally:
            if written < granted:
                self.budget.refund(granted - written)
        queue.complete(head, written)

    async def fill(self, segments: list[Segment], limit: int) -> int:
        """Read up to `limit` bytes from the source into the chain's buffers, in order."""
        views: list[memoryview] = []
        try:
            for segment in segments:
                if limit <= 0:
                    break
                take = min(segment.length, limit)
                views.append(segment.view(take))
                limit -= take
            count = self.source.try_read(views)
            if count is None:
                count = await self.source.read_into(views)
            return count
        finally:
            # Views pin the mapping; release them now so a disconnect can unmap it.
            for view in views:
                view.release()
