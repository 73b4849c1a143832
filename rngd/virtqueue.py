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

import array
import platform
import struct
import sys
import threading
from dataclasses import dataclass, field
from itertools import repeat

from rngd.memory import GuestMemory, GuestMemoryError

DESC = struct.Struct("<QIHH")
if sys.byteorder != "little":  # pragma: no cover
    # The rings are little-endian (virtio 1.x) and read through native-order views below.
    raise ImportError("rngd's virtqueue needs a little-endian host")

_TIMES_16 = (16).__mul__
#: Most descriptors in a table that is copied to look one request up (QEMU's vhost-user-rng
#: queue has 4): a copy and a compare of 64 bytes cost less than unpacking one descriptor
#: and hashing it.
SMALL_TABLE = 16

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1


class ChainError(Exception):
    """This descriptor chain is malformed; complete it with length 0."""


class RingError(Exception):
    """The ring is broken; stop processing it."""


def _bad_head(head: int, size: int) -> RingError:
    """The error for a head index out of range: built only on that branch, so the hot
    paths keep their comparison inline."""
    return RingError(f"avail ring names descriptor {head}, queue size {size}")


#: Hosts whose memory model the fence below is argued for.
_FENCED_MACHINES = ("x86_64", "amd64", "aarch64", "arm64")
if platform.machine().lower() not in _FENCED_MACHINES:  # pragma: no cover
    raise ImportError(
        f"rngd's virtqueue has no memory fence argued for {platform.machine()} hosts"
        f" (only {', '.join(_FENCED_MACHINES)})"
    )


class Fence:
    """A store->load fence, for one thread at a time: stores before a call are visible to
    other CPUs before loads after it are performed.

    The EVENT_IDX handshake needs one on both sides (we store the used index or avail_event,
    then load the driver's used_event or avail index; the driver stores its index, then loads
    ours), and so do, on a weakly ordered host, the used elements before the index that
    publishes them, and the driver's avail index before the ring entries and descriptors it
    publishes (virtio's read barrier on the device side: arm64 may satisfy a later load
    first, and neither the interpreter's branch on the index nor a wake-up we did not sleep
    for orders it). Python has no fence instruction; a lock has one inside. The lock is held
    from construction, and a fence *releases then re-acquires* it (CPython's lock is a POSIX
    semaphore: glibc's sem_post is a compare-and-swap with release order, sem_wait's fast path
    one with acquire order):

    * x86-64 (TSO): a locked read-modify-write is a full barrier by itself.
    * arm64 (ARMv8, multi-copy atomic): a store-release followed in program order by a
      load-acquire is ordered ("RCsc": [L]; po; [A] is in barrier-ordered-before), every
      access before the release is ordered before it, and every access after the acquire
      after it. A plain store or load before the fence is therefore ordered before a plain
      load after it. (Acquire-then-release, as `with lock: pass` does, orders nothing of the
      kind: the store may sink past the acquire and the load rise above the release.)

    Other architectures are refused at import until they are argued for the same way.
    """

    __slots__ = ("_lock", "acquire", "release")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        #: Bound once: the ring path calls ``release(); acquire()`` inline.
        self.release = self._lock.release
        self.acquire = self._lock.acquire

    def __call__(self) -> None:
        self.release()
        self.acquire()


#: x86 keeps stores in program order (TSO), and so does the interpreter: there, the used
#: elements are visible before the index that publishes them without a fence.
STORES_ORDERED = platform.machine().lower() in ("x86_64", "amd64")
#: TSO keeps loads in program order too: there, the ring entries and descriptors are read
#: after the avail index that published them without a fence.
LOADS_ORDERED = STORES_ORDERED


@dataclass(frozen=True)
class Segment:
    """One device-writable buffer of a chain: its guest-physical span, and the bytes of our
    mapping it names (so filling it needs no second translation)."""

    addr: int
    length: int
    buffer: memoryview | None = field(default=None, compare=False, repr=False)


#: A chain of one plain buffer: its length, its buffer.
Lone = tuple[int, memoryview]


class SplitQueue:
    """One ring's device-side state: where its parts live, its options, the next indices."""

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
        notify_on_empty: bool = False,
    ) -> None:
        self.memory = memory
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self.notify_on_empty = notify_on_empty
        try:
            desc_view, desc_offset = memory.span(desc, 16 * size, vmm=True)
            avail_view, avail_offset = memory.span(avail, 6 + 2 * size, vmm=True)
            used_view, used_offset = memory.span(used, 6 + 8 * size, vmm=True)
        except GuestMemoryError as exc:
            raise RingError(f"ring not in guest memory: {exc}") from exc
        self.desc = desc_view[desc_offset : desc_offset + 16 * size]
        avail_bytes = avail_view[avail_offset : avail_offset + 6 + 2 * size]
        used_bytes = used_view[used_offset : used_offset + 6 + 8 * size]
        # The indices the driver and we update under each other's feet go through typed views:
        # a memoryview item is read or written with one aligned access, where struct.pack_into
        # first zeroes the field (a driver could read a used index of 0 in between) and "<H"
        # goes a byte at a time (half an update). Element stores need no such care: the used
        # index publishes them.
        # avail: flags, idx, ring[size], used_event
        # (The ring path in rngd.ring reads and writes these views directly.)
        self.avail = avail_bytes.cast("H")
        # used: flags, idx, then {id u32, len u32}[size], then avail_event
        self.used = used_bytes.cast("H")
        self.used_elems = used_bytes[4 : 4 + 8 * size].cast("I")
        self._views = (avail_bytes, used_bytes)
        #: Item of `avail` holding used_event, and of `used` holding avail_event.
        self.used_event_slot = 2 + size
        self.avail_event_slot = 2 + 4 * size
        #: The fence of whichever thread serves the ring (one at a time).
        self.fence = Fence()
        self.next_avail = next_avail & 0xFFFF
        # We complete requests in order and never keep one across a stop, so the used index
        # always equals the avail index we have consumed.
        self.next_used = self.next_avail
        #: The used index last stored for the driver, and the one it last heard of (or chose
        #: not to): the ring path keeps them, as it keeps the next indices.
        self.signalled_used = self.published_used = self.next_used
        # Translations of the buffers drivers post: Linux reuses the same few buffers, so a
        # request usually costs one dict lookup instead of a region search and a new view.
        self._segments: dict[tuple[int, int], Segment] = {}
        #: Chains of one plain writable descriptor, by its (addr, len, flags, next): the
        #: request of the Linux driver is then one unpack and one lookup. Do not mutate them.
        self._simple: dict[tuple[int, int, int, int], list[Segment]] = {}
        #: The same chains as (length, buffer): what the ring path reads into, made once.
        self.lone: dict[tuple[int, int, int, int], Lone] = {}
        # The descriptor table as `lone_at` last saw it, and its lone chains by index.
        self._table = b""
        self._by_index: list[Lone | None] = []

    def release(self) -> None:
        """Let go of guest memory (call once the ring's task has stopped)."""
        for segment in self._segments.values():
            assert segment.buffer is not None
            segment.buffer.release()
        self._segments.clear()
        self._simple.clear()
        self.lone.clear()
        self._by_index = []
        for view in (
            self.avail,
            self.used,
            self.used_elems,
            self.desc,
            *self._views,
        ):
            view.release()

    # --- avail side ---

    def avail_idx(self) -> int:
        value: int = self.avail[1]
        return value

    def pending(self) -> int:
        """How many requests wait. A count above the queue size means the index is garbage."""
        count = (self.avail[1] - self.next_avail) & 0xFFFF
        if count > self.size:
            raise RingError(
                f"avail index {self.avail_idx()} is {count} ahead of {self.next_avail} "
                f"(queue size {self.size})"
            )
        if count and not LOADS_ORDERED:
            self.fence()  # the index before the entries and descriptors it publishes
        return count

    def head(self) -> int:
        """Descriptor index of the next request (call only when `pending()`)."""
        return self.heads(1)[0]

    def heads(self, count: int) -> list[int]:
        """Descriptor indices of the next `count` requests (call only for `count <= pending()`),
        up to the first that is out of range: RingError if that is the first."""
        if count == 1:
            head: int = self.avail[2 + self.next_avail % self.size]
            if head >= self.size:
                raise _bad_head(head, self.size)
            return [head]
        start = 2 + self.next_avail % self.size
        end = start + count
        wrap = 2 + self.size
        if end <= wrap:
            heads: list[int] = self.avail[start:end].tolist()
        else:
            heads = self.avail[start:wrap].tolist() + self.avail[2 : end - self.size].tolist()
        if max(heads) >= self.size:
            bad = next(i for i, head in enumerate(heads) if head >= self.size)
            if bad == 0:
                raise _bad_head(heads[0], self.size)
            del heads[bad:]
        return heads

    def lone_at(self, heads: list[int]) -> list[Lone | None]:
        """`lone`'s entry for the descriptor at each of `heads` (None: not a plain buffer
        seen before), at C speed.

        Drivers that keep a ring full rewrite few descriptors, if any: the whole table is
        compared with its copy from the last call, and only when it changed is it looked up
        again, every index at once. For a big table and few heads, that copy would cost more
        than looking each head up.
        """
        desc = self.desc
        if 64 * len(heads) < self.size and self.size > SMALL_TABLE:
            descriptors = map(DESC.unpack_from, repeat(desc), map(_TIMES_16, heads))
            return list(map(self.lone.get, descriptors))
        return list(map(self.lone_by_index(desc.tobytes()).__getitem__, heads))

    def lone_by_index(self, table: bytes) -> list[Lone | None]:
        """`lone`'s entry for every descriptor of `table`, a copy of the descriptor table made
        just now, looked up again only if it differs from the last one."""
        if table != self._table:
            self._table = table
            self._by_index = list(map(self.lone.get, DESC.iter_unpack(table)))
        return self._by_index

    def chain(self, head: int) -> list[Segment]:
        """The writable buffers of the chain at `head`, in order, validated.

        The walk is bounded by the queue size (and the indirect table's size), so a looping
        chain ends in ChainError instead of spinning.
        """
        first = DESC.unpack_from(self.desc, 16 * head)
        simple = self._simple.get(first)
        if simple is not None:
            return simple
        segments: list[Segment] = []
        table, base, table_size = self.desc, 0, self.size
        index, budget, indirect_seen = head, self.size, False
        while True:
            if budget == 0:
                raise ChainError("descriptor chain loops or is longer than the queue")
            budget -= 1
            addr, length, flags, nxt = DESC.unpack_from(table, base + 16 * index)
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
                    table, base = self.memory.span(addr, length)
                except GuestMemoryError as exc:
                    raise ChainError(f"indirect table: {exc}") from exc
                table_size, index, budget, indirect_seen = length // 16, 0, length // 16, True
                continue
            if not flags & DESC_F_WRITE:
                raise ChainError("device-readable descriptor in an RNG request")
            segment = self._segments.get((addr, length))
            if segment is None:
                segment = self._translate(addr, length)
            segments.append(segment)
            if not flags & DESC_F_NEXT:
                if first[2] == DESC_F_WRITE:
                    # One plain descriptor, the head itself: the whole chain is a function of
                    # its 16 bytes. (Not the last of a longer chain: its head's bytes do not
                    # say where the rest points.)
                    self._simple[first] = segments
                    assert segment.buffer is not None
                    self.lone[first] = (length, segment.buffer)
                    self._table = b""  # `lone_at`'s view of the table is out of date
                return segments
            if nxt >= table_size:
                raise ChainError(f"next index {nxt} outside a table of {table_size}")
            index = nxt

    def _translate(self, addr: int, length: int) -> Segment:
        if length == 0:
            raise ChainError("descriptor of length 0")
        try:
            region, offset = self.memory.span(addr, length)
        except GuestMemoryError as exc:
            raise ChainError(str(exc)) from exc
        if len(self._segments) >= 4 * self.size:
            # A driver that never reuses a buffer gets no help from the cache; bound it. Views
            # dropped here are freed with their last reference.
            self._segments.clear()
            self._simple.clear()
            self.lone.clear()
            self._table = b""
        segment = self._segments[addr, length] = Segment(
            addr, length, region[offset : offset + length]
        )
        return segment

    # --- used side ---

    def put_used(self, head: int, length: int) -> None:
        """Return the next request, `head`, with `length` bytes written, consuming its avail
        slot; the driver sees it at the next `publish_used`."""
        slot = 2 * (self.next_used % self.size)
        self.used_elems[slot] = head
        self.used_elems[slot + 1] = length
        self.next_used = (self.next_used + 1) & 0xFFFF
        self.next_avail = (self.next_avail + 1) & 0xFFFF

    def put_used_many(self, heads: list[int], lengths: list[int]) -> None:
        """`put_used` for the next `len(lengths)` requests: `heads[i]` with `lengths[i]`.

        The elements are made at C speed (`map`) and stored with at most two slice stores
        (the ring may wrap): no Python step per request."""
        count = len(lengths)
        if not count:
            return
        elems = array.array("I", bytes(8 * count))
        elems[0::2] = array.array("I", heads[:count] if len(heads) > count else heads)
        elems[1::2] = array.array("I", lengths)
        size, slot = self.size, self.next_used % self.size
        first = size - slot if count > size - slot else count
        self.used_elems[2 * slot : 2 * (slot + first)] = elems[: 2 * first]
        if first < count:
            self.used_elems[: 2 * (count - first)] = elems[2 * first :]
        self.next_used = (self.next_used + count) & 0xFFFF
        self.next_avail = (self.next_avail + count) & 0xFFFF

    def publish_used(self) -> None:
        """Make every used element put so far visible to the driver: one fence, one store."""
        if self.published_used != self.next_used:
            if not STORES_ORDERED:
                self.fence()  # the elements must be visible before the index that publishes them
            self.used[1] = self.published_used = self.next_used

    def publish(self) -> bool:
        """`publish_used`, then whether the driver wants an interrupt for what it now sees.
        (Per request on a ring without EVENT_IDX: the decision is written out here.)"""
        self.publish_used()
        old, new = self.signalled_used, self.next_used
        if old == new:
            return False
        self.fence()  # used idx must be visible before we read the driver's suppression state
        if self.event_idx:
            used_event: int = self.avail[self.used_event_slot]
            # vring_need_event(): did `new` pass the index the driver asked to hear about?
            wanted = (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
        else:
            flags: int = self.avail[0]
            wanted = not flags & AVAIL_F_NO_INTERRUPT
            if self.notify_on_empty and not wanted:
                wanted = self.avail[1] == self.next_avail
        self.signalled_used = new
        return wanted

    def arm(self) -> bool:
        """Ask the driver to kick for what comes after `next_avail`; True if more came already.

        With EVENT_IDX the driver kicks only when it passes avail_event, so it must be written
        before we sleep, and the avail index re-read after it (a request posted in between
        would otherwise never be kicked).
        """
        if self.event_idx:
            self.used[self.avail_event_slot] = self.next_avail
            self.fence()
        return self.pending() > 0
