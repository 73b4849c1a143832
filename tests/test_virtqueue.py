"""The split ring's device side on real memfd-backed guest memory, without sockets."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from rngd.memory import GuestMemory, GuestMemoryError
from rngd.protocol.payloads import MemoryRegion
from rngd.virtqueue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    ChainError,
    RingError,
    Segment,
    SplitQueue,
)

PAGE = 4096
UVA = 0x7F00_0000_0000
GPA2 = 0x1_0000_0000
SIZE = 8
DESC, AVAIL, USED = 0x0, 0x1000, 0x2000


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    """Two regions: 64 KiB at gpa 0, and 64 KiB at gpa 4 GiB that starts 2 pages into its fd."""
    fds = [os.memfd_create("r0"), os.memfd_create("r1")]
    os.ftruncate(fds[0], 16 * PAGE)
    os.ftruncate(fds[1], 18 * PAGE)
    specs = [
        MemoryRegion(0, 16 * PAGE, UVA, 0),
        MemoryRegion(GPA2, 16 * PAGE, UVA + 0x100000, 2 * PAGE),
    ]
    mem = GuestMemory.map(specs, fds)
    for fd in fds:
        os.close(fd)
    yield mem
    mem.close()


def poke(mem: GuestMemory, gpa: int, fmt: str, *values: int) -> None:
    mapping, offset = mem.span(gpa, struct.calcsize(fmt))
    struct.pack_into(fmt, mapping, offset, *values)


def peek(mem: GuestMemory, gpa: int, fmt: str) -> tuple[int, ...]:
    mapping, offset = mem.span(gpa, struct.calcsize(fmt))
    return struct.unpack_from(fmt, mapping, offset)


def queue(
    mem: GuestMemory, *, event_idx: bool = False, base: int = 0, notify_on_empty: bool = False
) -> SplitQueue:
    return SplitQueue(
        mem,
        SIZE,
        UVA + DESC,
        UVA + AVAIL,
        UVA + USED,
        base,
        event_idx=event_idx,
        indirect=True,
        notify_on_empty=notify_on_empty,
    )


def desc(mem: GuestMemory, index: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
    poke(mem, DESC + 16 * index, "<QIHH", addr, length, flags, nxt)


def post(mem: GuestMemory, *heads: int) -> None:
    (idx,) = peek(mem, AVAIL + 2, "<H")
    for head in heads:
        poke(mem, AVAIL + 4 + 2 * (idx % SIZE), "<H", head)
        idx = (idx + 1) & 0xFFFF
    poke(mem, AVAIL + 2, "<H", idx)


def test_translation_honours_offsets_and_bounds(memory: GuestMemory) -> None:
    mapping, offset = memory.span(GPA2 + 0x10, 16)
    assert offset == 2 * PAGE + 0x10
    mapping2, offset2 = memory.span(UVA + 0x100000 + 0x10, 16, vmm=True)
    assert mapping2 is mapping and offset2 == offset
    for addr, length in [(16 * PAGE - 8, 16), (GPA2 - 1, 2), (2**64 - 1, 2), (GPA2 + 16 * PAGE, 1)]:
        with pytest.raises(GuestMemoryError):
            memory.span(addr, length)


def test_map_refuses_a_region_larger_than_its_fd() -> None:
    fd = os.memfd_create("short")
    os.ftruncate(fd, PAGE)
    try:
        with pytest.raises(GuestMemoryError, match="fd has"):
            GuestMemory.map([MemoryRegion(0, PAGE, 0, PAGE)], [fd])
    finally:
        os.close(fd)


def test_chain_across_regions_and_indirect(memory: GuestMemory) -> None:
    q = queue(memory)
    desc(memory, 0, 0x4000, 64, DESC_F_WRITE | DESC_F_NEXT, 5)
    desc(memory, 5, GPA2 + 0x100, 32, DESC_F_WRITE)
    desc(memory, 1, 0x5000, 32, DESC_F_INDIRECT)  # an indirect table of two entries
    poke(memory, 0x5000, "<QIHH", 0x6000, 8, DESC_F_WRITE | DESC_F_NEXT, 1)
    poke(memory, 0x5010, "<QIHH", GPA2 + 0x200, 24, DESC_F_WRITE, 0)
    post(memory, 0, 1)
    assert q.pending() == 2
    assert q.chain(q.head()) == [Segment(0x4000, 64), Segment(GPA2 + 0x100, 32)]
    q.put_used(0, 96)
    assert q.chain(q.head()) == [Segment(0x6000, 8), Segment(GPA2 + 0x200, 24)]
    q.put_used(1, 32)
    assert q.pending() == 0
    assert peek(memory, USED + 2, "<H") == (0,)  # put, not yet published
    q.publish_used()
    assert peek(memory, USED + 2, "<H") == (2,)
    assert peek(memory, USED + 4, "<IIII") == (0, 96, 1, 32)


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda m: desc(m, 0, 0x4000, 64, 0), "readable"),
        (lambda m: desc(m, 0, 0x4000, 0, DESC_F_WRITE), "length 0"),
        (lambda m: desc(m, 0, 16 * PAGE - 8, 64, DESC_F_WRITE), "not inside"),
        (lambda m: desc(m, 0, 2**64 - 16, 64, DESC_F_WRITE), "not inside"),
        (lambda m: desc(m, 0, 0x4000, 64, DESC_F_WRITE | DESC_F_NEXT, 0), "loops"),
        (lambda m: desc(m, 0, 0x4000, 64, DESC_F_WRITE | DESC_F_NEXT, SIZE), "next index"),
        (lambda m: desc(m, 0, 0x5000, 32, DESC_F_INDIRECT | DESC_F_NEXT, 1), "INDIRECT and NEXT"),
        (lambda m: desc(m, 0, 0x5000, 0, DESC_F_INDIRECT), "indirect table of 0"),
        (lambda m: desc(m, 0, 0x5000, 24, DESC_F_INDIRECT), "indirect table of 24"),
        (lambda m: desc(m, 0, 0x5000, 16 * (SIZE + 1), DESC_F_INDIRECT), "indirect table"),
    ],
)
def test_malformed_chains(memory: GuestMemory, setup: object, match: str) -> None:
    assert callable(setup)
    setup(memory)
    post(memory, 0)
    q = queue(memory)
    with pytest.raises(ChainError, match=match):
        q.chain(q.head())


def test_nested_indirect_refused(memory: GuestMemory) -> None:
    desc(memory, 0, 0x5000, 16, DESC_F_INDIRECT)
    poke(memory, 0x5000, "<QIHH", 0x6000, 16, DESC_F_INDIRECT, 0)
    post(memory, 0)
    q = queue(memory)
    with pytest.raises(ChainError, match="inside an indirect"):
        q.chain(q.head())


def test_broken_rings(memory: GuestMemory) -> None:
    q = queue(memory)
    post(memory, SIZE)  # head index out of range
    with pytest.raises(RingError, match="names descriptor"):
        q.head()
    poke(memory, AVAIL + 2, "<H", SIZE + 1)  # avail index more than a queue ahead
    with pytest.raises(RingError, match="ahead"):
        q.pending()
    with pytest.raises(RingError, match="not in guest memory"):
        SplitQueue(memory, SIZE, UVA + 16 * PAGE - 16, UVA, UVA, 0, event_idx=False, indirect=False)


def test_event_idx_suppression(memory: GuestMemory) -> None:
    q = queue(memory, event_idx=True)
    desc(memory, 0, 0x4000, 64, DESC_F_WRITE)
    # The driver asks to hear only once used idx passes 1 (used_event = 1).
    poke(memory, AVAIL + 4 + 2 * SIZE, "<H", 1)
    post(memory, 0)
    q.put_used(q.head(), 64)
    assert not q.publish()  # used idx 1 has not passed used_event 1
    assert peek(memory, USED + 2, "<H") == (1,)  # published all the same
    post(memory, 0)
    q.put_used(q.head(), 64)
    assert q.publish()  # used idx 2 passed it
    assert peek(memory, USED + 2, "<H") == (2,)
    assert not q.publish()  # nothing new since
    # Sleeping writes avail_event = next avail, and sees a request posted meanwhile.
    assert not q.arm()
    assert peek(memory, USED + 4 + 8 * SIZE, "<H") == (2,)
    post(memory, 0)
    assert q.arm()


def test_no_interrupt_flag_and_notify_on_empty(memory: GuestMemory) -> None:
    q = queue(memory, notify_on_empty=True)
    desc(memory, 0, 0x4000, 64, DESC_F_WRITE)
    poke(memory, AVAIL, "<H", 1)  # VRING_AVAIL_F_NO_INTERRUPT
    post(memory, 0, 0)
    q.put_used(q.head(), 64)
    assert not q.publish()  # not empty yet: suppressed
    q.put_used(q.head(), 64)
    assert q.publish()  # ring empty: NOTIFY_ON_EMPTY overrides
    assert not q.publish()  # nothing new since
    poke(memory, AVAIL, "<H", 0)
    post(memory, 0)
    q.put_used(q.head(), 64)
    assert q.publish()
    assert peek(memory, USED + 2, "<H") == (3,)


def test_indices_wrap_at_16_bits(memory: GuestMemory) -> None:
    poke(memory, AVAIL + 2, "<H", 0xFFFF)
    q = queue(memory, base=0xFFFF)
    desc(memory, 0, 0x4000, 64, DESC_F_WRITE)
    post(memory, 0, 0)
    assert q.pending() == 2
    q.put_used(q.head(), 1)
    q.publish_used()
    q.put_used(q.head(), 2)
    q.publish_used()
    assert q.next_avail == 1 and peek(memory, USED + 2, "<H") == (1,)


def test_heads_wrap_around_the_ring_and_stop_before_a_bad_one(memory: GuestMemory) -> None:
    q = queue(memory, base=SIZE - 2)
    poke(memory, AVAIL + 2, "<H", SIZE - 2)
    post(memory, 3, 4, 5, 6)  # slots 6, 7, then 0, 1
    assert q.heads(4) == [3, 4, 5, 6]
    post(memory, 1, SIZE, 2)  # a head out of range after a good one
    q.put_used_many([3, 4, 5, 6], [1, 1, 1, 1])
    assert q.heads(3) == [1]
    q.put_used_many([1], [1])
    with pytest.raises(RingError, match="names descriptor"):
        q.heads(2)
