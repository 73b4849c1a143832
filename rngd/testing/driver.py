"""The guest driver's side of a split virtqueue (virtio 1.2, 2.7), laid out in `GuestMemory`.

`DriverQueue` does what the Linux virtio core does for virtio-rng: it posts device-writable
buffers (one descriptor, a NEXT chain or an INDIRECT table), publishes them in the avail ring,
decides whether to kick (EVENT_IDX's ``avail_event`` or the used ring's NO_NOTIFY flag), asks for
or suppresses calls (``used_event`` or the avail ring's NO_INTERRUPT flag) and collects used
entries with the bytes the device wrote.

It also checks the device: a used id that was not in flight, a used length longer than the
buffers, or a byte changed past the used length raise `DeviceMisbehaved`. The ``raw_*`` methods
write anything at all into the rings, for tests that play a hostile guest.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from rngd.protocol.payloads import VringAddr
from rngd.testing.guest_memory import GuestMemory

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")
_U64 = struct.Struct("<Q")

#: What the harness writes into every buffer before posting it, so that writes past the used
#: length can be seen afterwards.
POISON = 0xA5

_FENCE = threading.Lock()


def _fence() -> None:
    # EVENT_IDX needs a store-load barrier between publishing avail idx and reading
    # avail_event (the device does the mirror image). A locked RMW is one on x86.
    with _FENCE:
        pass


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event: has the index moved past ``event`` between old and new?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


def _read_eventfds(fds: Sequence[int]) -> int:
    total = 0
    for fd in fds:
        with contextlib.suppress(BlockingIOError):
            total += int(_U64.unpack(os.read(fd, 8))[0])
    return total


class DeviceMisbehaved(AssertionError):
    """The device wrote something a correct device never writes."""


class QueueFull(Exception):
    """Not enough free descriptors (or guest memory) for the buffer asked for."""


@dataclass(frozen=True)
class Used:
    """One used-ring entry, with the bytes the device wrote into the chain's buffers."""

    id: int
    len: int
    #: The first ``len`` bytes of the chain's writable buffers, in chain order.
    data: bytes
    #: What was offered (sum of writable buffer lengths); 0 for raw, untracked posts.
    capacity: int
    #: False for an entry whose id the harness did not post (raw API).
    tracked: bool = True


@dataclass
class _Posted:
    descs: list[int]
    writable: list[tuple[int, int]]
    readable: list[tuple[int, int]]
    table: tuple[int, int] | None


def _split(total: int, parts: int) -> list[int]:
    parts = max(1, min(parts, total))
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class DriverQueue:
    """One split virtqueue of ``size`` entries (a power of two), driven as a guest would.

    The eventfds are the VMM's (`Frontend` owns and closes them); the queue only uses them.
    """

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        *,
        event_idx: bool,
        index: int = 0,
        ring_region: int | None = None,
    ) -> None:
        if size <= 0 or size & (size - 1) or size > 32768:
            raise ValueError(f"queue size {size} is not a power of two up to 32768")
        self.memory = memory
        self.size = size
        self.index = index
        self.event_idx = event_idx
        self.desc_table = memory.alloc(DESC_SIZE * size, 16, region=ring_region)
        self.avail_ring = memory.alloc(6 + 2 * size, 2, region=ring_region)
        self.used_ring = memory.alloc(6 + 8 * size, 4, region=ring_region)
        memory.fill(self.desc_table, DESC_SIZE * size)
        memory.fill(self.avail_ring, 6 + 2 * size)
        memory.fill(self.used_ring, 6 + 8 * size)
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.masked_call_fd: int | None = None
        self._free = list(range(size - 1, -1, -1))
        self._avail_idx = 0
        self._kicked_at = 0
        self._last_used = 0
        self._in_flight: dict[int, _Posted] = {}
        #: Heads published by `raw_post_buffer`, with whether the descriptor was taken from
        #: the free list (and goes back to it once used).
        self._raw_heads: dict[int, bool] = {}
        self._calls_enabled = True
        #: Kicks actually sent (forced or needed), for tests of notification suppression.
        self.kicks = 0

    # -- addresses for SET_VRING_ADDR -------------------------------------------------------

    def vring_addr(self) -> VringAddr:
        """Ring addresses as the VMM sends them: user-space addresses, not guest-physical."""
        mem = self.memory
        return VringAddr(
            index=self.index,
            flags=0,
            desc=mem.uva(self.desc_table),
            used=mem.uva(self.used_ring),
            avail=mem.uva(self.avail_ring),
            log=0,
        )

    # -- ring field addresses ---------------------------------------------------------------

    @property
    def avail_idx_addr(self) -> int:
        return self.avail_ring + 2

    @property
    def used_event_addr(self) -> int:
        return self.avail_ring + 4 + 2 * self.size

    @property
    def used_idx_addr(self) -> int:
        return self.used_ring + 2

    @property
    def avail_event_addr(self) -> int:
        return self.used_ring + 4 + 8 * self.size

    @property
    def avail_idx(self) -> int:
        """The driver's (free-running, u16) avail index: what it last published."""
        return self._avail_idx

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def free_descriptors(self) -> int:
        return len(self._free)

    # -- posting ----------------------------------------------------------------------------

    def post(
        self,
        lengths: int | Sequence[int],
        *,
        indirect: bool = False,
        readable: Sequence[int] = (),
        publish: bool = True,
    ) -> int:
        """Offer device-writable buffers of ``lengths`` bytes as one request; return its head.

        An int is one descriptor, a sequence a NEXT chain; ``indirect`` puts the chain in an
        indirect table behind one descriptor. ``readable`` buffers (device-readable, which an
        RNG device must not need) come first, as virtio orders them. Buffers are spread over
        the memory regions and filled with `POISON`.
        """
        sizes = [lengths] if isinstance(lengths, int) else list(lengths)
        chain = [(n, 0) for n in readable] + [(n, DESC_F_WRITE) for n in sizes]
        if not chain or any(n <= 0 for n, _ in chain):
            raise ValueError(f"bad buffer lengths {chain}")
        needed = 1 if indirect else len(chain)
        if needed > len(self._free):
            raise QueueFull(f"{needed} descriptors wanted, {len(self._free)} free")
        buffers: list[tuple[int, int, int]] = []
        try:
            for n, flags in chain:
                gpa = self.memory.alloc(n, 8)
                buffers.append((gpa, n, flags))
                self.memory.fill(gpa, n, POISON)
            table = None
            if indirect:
                table = (self.memory.alloc(DESC_SIZE * len(chain), 16), DESC_SIZE * len(chain))
        except Exception as exc:
            for gpa, n, _ in buffers:
                self.memory.free(gpa, n)
            raise QueueFull(str(exc)) from exc
        if table is not None:
            for i, (gpa, n, flags) in enumerate(buffers):
                last = i == len(buffers) - 1
                self.memory.write(
                    table[0] + DESC_SIZE * i,
                    _DESC.pack(gpa, n, flags | (0 if last else DESC_F_NEXT), 0 if last else i + 1),
                )
            descs = [self._free.pop()]
            self.raw_write_desc(descs[0], table[0], table[1], DESC_F_INDIRECT, 0)
        else:
            descs = [self._free.pop() for _ in buffers]
            for i, (gpa, n, flags) in enumerate(buffers):
                last = i == len(buffers) - 1
                self.raw_write_desc(
                    descs[i],
                    gpa,
                    n,
                    flags | (0 if last else DESC_F_NEXT),
                    0 if last else descs[i + 1],
                )
        head = descs[0]
        self._in_flight[head] = _Posted(
            descs,
            [(g, n) for g, n, f in buffers if f & DESC_F_WRITE],
            [(g, n) for g, n, f in buffers if not f & DESC_F_WRITE],
            table,
        )
        self.raw_write_avail_entry(self._avail_idx, head)
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()
        return head

    def publish(self) -> None:
        """Make every posted entry visible to the device (write avail idx)."""
        self.memory.write_u16(self.avail_idx_addr, self._avail_idx)

    # -- notifications ----------------------------------------------------------------------

    def kick_needed(self) -> bool:
        """Would Linux kick now? EVENT_IDX: has avail idx passed ``avail_event`` since the last
        kick decision; otherwise: is NO_NOTIFY clear in the used ring."""
        _fence()
        if self.event_idx:
            event = self.memory.read_u16(self.avail_event_addr)
            return need_event(event, self._avail_idx, self._kicked_at)
        return not self.memory.read_u16(self.used_ring) & USED_F_NO_NOTIFY

    def kick(self, *, force: bool = False) -> bool:
        """Notify the device if it asked to be (or ``force``); return whether it was kicked."""
        needed = force or self.kick_needed()
        self._kicked_at = self._avail_idx
        if needed:
            if self.kick_fd is None:
                raise RuntimeError("the queue has no kick eventfd (not started)")
            os.write(self.kick_fd, _U64.pack(1))
            self.kicks += 1
        return needed

    def enable_calls(self, enabled: bool = True) -> None:
        """Ask for calls (or not): ``used_event`` with EVENT_IDX, NO_INTERRUPT without."""
        self._calls_enabled = enabled
        if self.event_idx:
            # As Linux's virtqueue_disable_cb: put used_event far away rather than leave it.
            event = self._last_used if enabled else self._last_used + 0x8000
            self.memory.write_u16(self.used_event_addr, event)
        else:
            self.memory.write_u16(self.avail_ring, 0 if enabled else AVAIL_F_NO_INTERRUPT)

    async def wait_call(self) -> int:
        """Wait until the device signals a call; return the eventfd count(s) read.

        Both the guest notifier (``call_fd``) and QEMU's masked notifier (``masked_call_fd``)
        count: QEMU polls the masked one and injects what arrives there once the vector is
        unmasked, so a call that races the last SET_VRING_CALL still reaches the guest. Tests
        that the back-end switched to the newest call fd read ``call_fd`` themselves.
        """
        fds = [fd for fd in (self.call_fd, self.masked_call_fd) if fd is not None]
        if not fds:
            raise RuntimeError("the queue has no call eventfd (not started)")
        while True:
            count = _read_eventfds(fds)
            if count:
                return count
            if len(fds) == 1:
                await trio.lowlevel.wait_readable(fds[0])
                continue
            # One epoll set over both eventfds: waiting on it costs a few syscalls, where a
            # nursery with a waiter task per fd cost more than the round trip being measured.
            with select.epoll() as either:
                for fd in fds:
                    either.register(fd, select.EPOLLIN)
                await trio.lowlevel.wait_readable(either.fileno())

    # -- completions ------------------------------------------------------------------------

    def used(self, *, strict: bool = True) -> list[Used]:
        """Used entries added since the last look, their buffers freed for reuse.

        Entries for `raw_post_buffer` heads come back with ``tracked=False`` and no data. With
        ``strict`` (the default) any other id that is not in flight raises `DeviceMisbehaved`;
        without, it too is returned with ``tracked=False``.
        """
        used_idx = self.memory.read_u16(self.used_idx_addr)
        if (used_idx - self._last_used) & 0xFFFF > self.size:
            raise DeviceMisbehaved(
                f"used idx {used_idx} is {(used_idx - self._last_used) & 0xFFFF} past "
                f"{self._last_used} on a queue of {self.size}"
            )
        out: list[Used] = []
        while self._last_used != used_idx:
            slot = self.used_ring + 4 + 8 * (self._last_used % self.size)
            head, length = self.memory.unpack("II", slot)
            self._last_used = (self._last_used + 1) & 0xFFFF
            if head in self._raw_heads:
                if self._raw_heads.pop(head):
                    self._free.append(head)
                out.append(Used(head, length, b"", 0, tracked=False))
                continue
            posted = self._in_flight.pop(head, None)
            if posted is None:
                if strict:
                    raise DeviceMisbehaved(f"used id {head} was not in flight")
                out.append(Used(head, length, b"", 0, tracked=False))
                continue
            out.append(self._complete(head, length, posted))
        if self.event_idx and self._calls_enabled:
            self.memory.write_u16(self.used_event_addr, self._last_used)
        return out

    def _complete(self, head: int, length: int, posted: _Posted) -> Used:
        capacity = sum(n for _, n in posted.writable)
        data = bytearray()
        intact = True
        remaining = length
        for gpa, n in posted.writable:
            content = self.memory.read(gpa, n)
            take = min(max(remaining, 0), n)
            data += content[:take]
            intact = intact and content[take:] == bytes([POISON]) * (n - take)
            remaining -= take
        for gpa, n in posted.readable:
            intact = intact and self.memory.read(gpa, n) == bytes([POISON]) * n
        for gpa, n in [*posted.writable, *posted.readable]:
            self.memory.free(gpa, n)
        if posted.table is not None:
            self.memory.free(*posted.table)
        self._free.extend(posted.descs)
        if length > capacity:
            raise DeviceMisbehaved(f"used len {length} for id {head} exceeds its {capacity} bytes")
        if not intact:
            raise DeviceMisbehaved(
                f"device wrote past used len {length} (or into a readable buffer) of id {head}"
            )
        return Used(head, length, bytes(data), capacity)

    async def wait_used(self, count: int = 1, *, strict: bool = True) -> list[Used]:
        """Used entries, waiting on the call eventfd until at least ``count`` have arrived."""
        out = self.used(strict=strict)
        while len(out) < count:
            await self.wait_call()
            out += self.used(strict=strict)
        return out

    async def read_random(
        self,
        nbytes: int,
        chunk: int = 64,
        *,
        in_flight: int | None = 1,
        segments: int = 1,
        indirect: bool = False,
    ) -> bytes:
        """Read ``nbytes`` from the device the way virtio-rng does, returned in used order.

        Linux keeps one ``chunk``-byte buffer in flight (the default); ``in_flight=None``
        keeps the ring full instead (benchmarks). ``segments`` splits each buffer into a NEXT
        chain (or an indirect table, with ``indirect``). Short completions are fine
        (virtio-rng allows them): what is missing is asked for again.
        """
        limit = self.size if in_flight is None else in_flight
        out = bytearray()
        outstanding = 0
        while len(out) < nbytes:
            while self.in_flight < limit and len(out) + outstanding < nbytes:
                size = min(chunk, nbytes - len(out) - outstanding)
                if (1 if indirect else min(segments, size)) > self.free_descriptors:
                    break
                self.post(_split(size, segments), indirect=indirect, publish=False)
                outstanding += size
            self.publish()
            self.kick()
            for entry in await self.wait_used():
                out += entry.data
                outstanding -= entry.capacity
        return bytes(out)

    # -- raw access for hostile-guest tests -------------------------------------------------

    def raw_write_desc(self, index: int, addr: int, length: int, flags: int, next_: int) -> None:
        """Write descriptor ``index`` (taken modulo nothing: out-of-table indices raise)."""
        if not 0 <= index < self.size:
            raise IndexError(f"descriptor {index} outside a table of {self.size}")
        self.memory.write(
            self.desc_table + DESC_SIZE * index, _DESC.pack(addr, length, flags, next_)
        )

    def raw_read_desc(self, index: int) -> tuple[int, int, int, int]:
        addr, length, flags, next_ = self.memory.unpack("QIHH", self.desc_table + DESC_SIZE * index)
        return addr, length, flags, next_

    def raw_write_avail_entry(self, position: int, head: int) -> None:
        """Write ``head`` (any u16) into avail ring slot ``position % size``."""
        self.memory.write_u16(self.avail_ring + 4 + 2 * (position % self.size), head)

    def raw_set_avail_idx(self, value: int) -> None:
        """Publish an arbitrary avail idx (the driver's own index follows it)."""
        self._avail_idx = value & 0xFFFF
        self.publish()

    def raw_set_avail_flags(self, flags: int) -> None:
        self.memory.write_u16(self.avail_ring, flags)

    def raw_set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.used_event_addr, value)

    def read_used_idx(self) -> int:
        return self.memory.read_u16(self.used_idx_addr)

    def read_used_flags(self) -> int:
        return self.memory.read_u16(self.used_ring)

    def read_avail_event(self) -> int:
        return self.memory.read_u16(self.avail_event_addr)

    def read_used_elem(self, position: int) -> tuple[int, int]:
        head, length = self.memory.unpack("II", self.used_ring + 4 + 8 * (position % self.size))
        return head, length

    def raw_post_buffer(
        self, head: int, addr: int, length: int, flags: int = DESC_F_WRITE, next_: int = 0
    ) -> None:
        """Write descriptor ``head`` as given (any address, length, flags) and publish it at
        the next avail slot. The harness keeps the descriptor out of its own posts until the
        device uses it; `used` reports it with ``tracked=False``."""
        if head in self._in_flight:
            raise ValueError(f"descriptor {head} is in flight")
        if head not in self._raw_heads:
            taken = head in self._free
            if taken:
                self._free.remove(head)
            self._raw_heads[head] = taken
        self.raw_write_desc(head, addr, length, flags, next_)
        self.raw_write_avail_entry(self._avail_idx, head)
        self.raw_set_avail_idx(self._avail_idx + 1)
