"""The device side of a split virtqueue (virtio 1.2, section 2.7), on guest memory, without I/O.

The guest writes the descriptor table and the avail ring; everything read from them is
untrusted. Two kinds of trouble are told apart:

* `ChainError`: one request is malformed (bad address, loop, readable buffer...). The head index
  is valid, so the request can be completed with 0 bytes and the ring goes on.
* `RingError`: the ring itself cannot be trusted (head index out of range, avail index running
  ahead, ring outside memory). Nothing sensible can be returned; the ring is stopped until the
  VMM restarts it (a guest reset does).
"""

from __future__ import annotations

import struct
import sys
import threading
from dataclasses import dataclass, field

from rngd.memory import GuestMemory, GuestMemoryError

DESC = struct.Struct("<QIHH")
if sys.byteorder != "little":  # pragma: no cover
    # The rings are little-endian (virtio 1.x) and read through native-order views below.
    raise ImportError("rngd's virtqueue needs a little-endian host")

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1

#: Largest fill of one request. virtio-rng lets the device return fewer bytes than offered; a
#: bound keeps one request with a huge buffer from holding its vring (and budget) for long.
MAX_REQUEST_BYTES = 1 << 20


class ChainError(Exception):
    """This descriptor chain is malformed; complete it with length 0."""


class RingError(Exception):
    """The ring is broken; stop processing it."""


# A store-load fence. The EVENT_IDX handshake (we publish avail_event then re-read avail idx;
# the driver publishes avail idx then reads avail_event) needs one on both sides, and Python has
# no fence instruction. Taking an uncontended lock is a locked read-modify-write, a full barrier
# on x86 and an acquire/release pair elsewhere.
_FENCE = threading.Lock()


def fence() -> None:
    with _FENCE:
        pass


@dataclass(frozen=True)
class Segment:
    """One device-writable buffer of a chain: its guest-physical span, and where the walk
    found it in our mapping (so filling it needs no second translation)."""

    addr: int
    length: int
    region: memoryview | None = field(default=None, compare=False, repr=False)
    offset: int = field(default=0, compare=False, repr=False)

    def view(self, length: int) -> memoryview:
        """The first `length` bytes of the buffer; release it promptly (it pins the map)."""
        assert self.region is not None and length <= self.length
        return self.region[self.offset : self.offset + length]


class SplitQueue:
    """One ring's device-side state: where its parts live and the next indices to use."""

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc: int,
        avail: int,
        used: int,
        next_avail: int,
        *,
        event_idx: bool,
        indirect: bool,
    ) -> None:
        self.memory = memory
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        try:
            self._desc_map, self._desc = memory.uva(desc, 16 * size)
            memory.uva(avail, 6 + 2 * size)
            memory.uva(used, 6 + 8 * size)
        except GuestMemoryError as exc:
            raise RingError(f"ring not in guest memory: {exc}") from exc
        avail_view = memory.uva_view(avail, 6 + 2 * size)
        used_view = memory.uva_view(used, 6 + 8 * size)
        # The indices the driver and we update under each other's feet go through typed views:
        # a memoryview item is read or written with one aligned access, where struct.pack_into
        # first zeroes the field (a driver could read a used index of 0 in between) and "<H"
        # goes a byte at a time (half an update). Element stores need no such care: the used
        # index publishes them.
        # avail: flags, idx, ring[size], used_event
        self._avail = avail_view.cast("H")
        # used: flags, idx, then {id u32, len u32}[size], then avail_event
        self._used = used_view.cast("H")
        self._used_elems = used_view[4 : 4 + 8 * size].cast("I")
        self._views = (avail_view, used_view)
        self._used_event_slot = 2 + size
        self._avail_event_slot = 2 + 4 * size
        self.next_avail = next_avail & 0xFFFF
        # We complete requests in order and never keep one across a stop, so the used index
        # always equals the avail index we have consumed.
        self.next_used = self.next_avail
        self._signalled_used = self.next_used

    def release(self) -> None:
        """Let go of guest memory (call once the ring's task has stopped)."""
        for view in (self._avail, self._used, self._used_elems, *self._views):
            view.release()

    # --- avail side ---

    def avail_idx(self) -> int:
        value: int = self._avail[1]
        return value

    def pending(self) -> int:
        """How many requests wait. A count above the queue size means the index is garbage."""
        count = (self.avail_idx() - self.next_avail) & 0xFFFF
        if count > self.size:
            raise RingError(
                f"avail index {self.avail_idx()} is {count} ahead of {self.next_avail} "
                f"(queue size {self.size})"
            )
        return count

    def head(self) -> int:
        """Descriptor index of the next request (call only when `pending()`)."""
        head: int = self._avail[2 + self.next_avail % self.size]
        if head >= self.size:
            raise RingError(f"avail ring names descriptor {head}, queue size {self.size}")
        return head

    def chain(self, head: int) -> list[Segment]:
        """The writable buffers of the chain at `head`, in order, validated.

        The walk is bounded by the queue size (and the indirect table's size), so a looping
        chain ends in ChainError instead of spinning.
        """
        segments: list[Segment] = []
        table_map, table, table_size = self._desc_map, self._desc, self.size
        index, budget, indirect_seen = head, self.size, False
        while True:
            if budget == 0:
                raise ChainError("descriptor chain loops or is longer than the queue")
            budget -= 1
            addr, length, flags, nxt = DESC.unpack_from(table_map, table + 16 * index)
            if flags & DESC_F_INDIRECT:
                if indirect_seen:
                    raise ChainError("indirect descriptor inside an indirect table")
                if not self.indirect:
                    raise ChainError("indirect descriptor but INDIRECT_DESC was not negotiated")
                if flags & DESC_F_NEXT:
                    raise ChainError("descriptor has both INDIRECT and NEXT")
                if length == 0 or length % 16 or length // 16 > self.size:
                    raise ChainError(f"indirect table of {length} bytes")
                try:
                    table_map, table = self.memory.gpa(addr, length)
                except GuestMemoryError as exc:
                    raise ChainError(f"indirect table: {exc}") from exc
                table_size, index, budget, indirect_seen = length // 16, 0, length // 16, True
                continue
            if not flags & DESC_F_WRITE:
                raise ChainError("device-readable descriptor in an RNG request")
            if length == 0:
                raise ChainError("descriptor of length 0")
            try:
                region, offset = self.memory.gpa_span(addr, length)
            except GuestMemoryError as exc:
                raise ChainError(str(exc)) from exc
            segments.append(Segment(addr, length, region, offset))
            if not flags & DESC_F_NEXT:
                return segments
            if nxt >= table_size:
                raise ChainError(f"next index {nxt} outside a table of {table_size}")
            index = nxt

    # --- used side ---

    def complete(self, head: int, length: int) -> None:
        """Return the request at `head` with `length` bytes written, and consume its avail slot."""
        slot = 2 * (self.next_used % self.size)
        self._used_elems[slot] = head
        self._used_elems[slot + 1] = length
        self.next_used = (self.next_used + 1) & 0xFFFF
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        fence()  # the element must be visible before the index that publishes it
        self._used[1] = self.next_used

    def enable_notifications(self) -> bool:
        """Ask the driver to kick for what comes after `next_avail`; True if more came already.

        With EVENT_IDX the driver kicks only when it passes avail_event, so it must be written
        before we sleep, and the avail index re-read after it (a request posted in between
        would otherwise never be kicked).
        """
        if self.event_idx:
            self._used[self._avail_event_slot] = self.next_avail
            fence()
        return self.pending() > 0

    def needs_interrupt(self, notify_on_empty: bool = False) -> bool:
        """Whether the completions since the last interrupt should be signalled now."""
        old, new = self._signalled_used, self.next_used
        if old == new:
            return False
        fence()  # used idx must be visible before we read the driver's suppression state
        if self.event_idx:
            used_event: int = self._avail[self._used_event_slot]
            # vring_need_event(): did `new` pass the index the driver asked to hear about?
            wanted = (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
        else:
            flags: int = self._avail[0]
            wanted = not flags & AVAIL_F_NO_INTERRUPT
            if notify_on_empty and not wanted:
                wanted = self.avail_idx() == self.next_avail
        self._signalled_used = new
        return wanted
