"""The `rngd.testing` harness on its own, with the device played by hand (no daemon)."""

from __future__ import annotations

import os
import struct

import pytest
import trio

from rngd.testing import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    POISON,
    DeviceMisbehaved,
    DriverQueue,
    GuestMemory,
    GuestMemoryError,
    QueueFull,
    default_layout,
    need_event,
    new_eventfd,
    open_fd_count,
)


def fake_complete(queue: DriverQueue, head: int, data: bytes, length: int | None = None) -> None:
    """Play the device: write ``data`` into head's (single, direct) buffer and use it."""
    addr, _, _, _ = queue.raw_read_desc(head)
    queue.memory.write(addr, data)
    used = queue.read_used_idx()
    slot = queue.used_ring + 4 + 8 * (used % queue.size)
    queue.memory.pack("II", slot, head, len(data) if length is None else length)
    queue.memory.write_u16(queue.used_idx_addr, used + 1)


def test_memory_layout_honours_mmap_offset_and_uva() -> None:
    layout = default_layout()
    assert layout[1].mmap_offset > 0
    assert all(r.userspace_addr != r.guest_phys_addr for r in layout)
    with GuestMemory(layout) as memory:
        gpa = layout[1].guest_phys_addr + 0x10
        memory.write(gpa, b"hello")
        assert memory.raw_file_bytes(1, layout[1].mmap_offset + 0x10, 5) == b"hello"
        assert os.fstat(memory.fds[1]).st_size == layout[1].mmap_offset + layout[1].memory_size
        assert memory.uva(gpa) == layout[1].userspace_addr + 0x10
        assert memory.gpa(memory.uva(gpa)) == gpa
        with pytest.raises(GuestMemoryError):
            memory.read(layout[0].memory_size - 2, 4)


def test_allocator_aligns_spreads_and_reuses() -> None:
    with GuestMemory(default_layout(1 << 16)) as memory:
        total = memory.free_bytes()
        a = memory.alloc(100, 64)
        b = memory.alloc(100, 64)
        assert a % 64 == 0 and b % 64 == 0
        assert (a < 1 << 32) != (b < 1 << 32), "consecutive allocations use both regions"
        memory.free(a, 100)
        memory.free(b, 100)
        assert memory.free_bytes() == total
        with pytest.raises(GuestMemoryError):
            memory.free(a, 100)
        with pytest.raises(GuestMemoryError):
            memory.alloc(1 << 17)


def test_memory_closes_its_fds() -> None:
    before = open_fd_count()
    memory = GuestMemory()
    # CPython's mmap keeps a dup of each fd, so more than two are open.
    assert open_fd_count() >= before + 2
    memory.close()
    assert open_fd_count() == before


@pytest.mark.parametrize("size", [1, 4, 256])
def test_queue_layout(size: int) -> None:
    with GuestMemory() as memory:
        queue = DriverQueue(memory, size, event_idx=True)
        assert queue.desc_table % 16 == 0
        assert queue.avail_ring % 2 == 0
        assert queue.used_ring % 4 == 0
        addr = queue.vring_addr()
        assert addr.desc == memory.uva(queue.desc_table)
        assert addr.used == memory.uva(queue.used_ring)
        assert queue.used_event_addr == queue.avail_ring + 4 + 2 * size
        assert queue.avail_event_addr == queue.used_ring + 4 + 8 * size
    with pytest.raises(ValueError), GuestMemory() as memory:
        DriverQueue(memory, 3, event_idx=False)


def test_post_chain_and_indirect_descriptors() -> None:
    with GuestMemory() as memory:
        queue = DriverQueue(memory, 8, event_idx=False)
        head = queue.post([10, 20, 30])
        first = queue.raw_read_desc(head)
        assert first[1:3] == (10, DESC_F_WRITE | DESC_F_NEXT)
        second = queue.raw_read_desc(first[3])
        assert second[1:3] == (20, DESC_F_WRITE | DESC_F_NEXT)
        assert queue.raw_read_desc(second[3])[1:3] == (30, DESC_F_WRITE)
        assert memory.read(first[0], 10) == bytes([POISON]) * 10
        head = queue.post([8, 8], indirect=True)
        table, length, flags, _ = queue.raw_read_desc(head)
        assert (length, flags) == (32, DESC_F_INDIRECT)
        assert struct.unpack("<QIHH", memory.read(table, 16))[1:] == (8, 3, 1)
        assert queue.avail_idx == 2 and memory.read_u16(queue.avail_idx_addr) == 2
        assert queue.free_descriptors == 8 - 4
        with pytest.raises(QueueFull):
            queue.post([1] * 5)


def test_used_returns_written_bytes_and_catches_overruns() -> None:
    with GuestMemory() as memory:
        queue = DriverQueue(memory, 4, event_idx=True)
        head = queue.post(8)
        fake_complete(queue, head, b"abcd")
        (used,) = queue.used()
        assert (used.id, used.len, used.data) == (head, 4, b"abcd")
        assert memory.read_u16(queue.used_event_addr) == 1
        head = queue.post(8)
        fake_complete(queue, head, b"abcdef", length=4)
        with pytest.raises(DeviceMisbehaved):
            queue.used()
        head = queue.post(8)
        fake_complete(queue, head, b"", length=9)
        with pytest.raises(DeviceMisbehaved):
            queue.used()
        memory.write_u16(queue.used_idx_addr, queue.read_used_idx() + 1)
        with pytest.raises(DeviceMisbehaved):
            queue.used()


def test_kick_decisions() -> None:
    assert need_event(0, 1, 0)
    assert not need_event(5, 3, 2)
    assert need_event(0xFFFF, 0, 0xFFFE)
    with GuestMemory() as memory:
        queue = DriverQueue(memory, 4, event_idx=True)
        queue.post(8)
        memory.write_u16(queue.avail_event_addr, 5)
        assert not queue.kick_needed()
        queue.kick_fd = new_eventfd()
        try:
            assert not queue.kick()
            assert queue.kick(force=True)
            assert os.read(queue.kick_fd, 8) == (1).to_bytes(8, "little")
        finally:
            os.close(queue.kick_fd)
        plain = DriverQueue(memory, 4, event_idx=False)
        assert plain.kick_needed()
        memory.write_u16(plain.used_ring, 1)
        assert not plain.kick_needed()
        plain.enable_calls(False)
        assert memory.read_u16(plain.avail_ring) == 1


async def test_wait_call_wakes_on_either_notifier() -> None:
    with GuestMemory() as memory:
        queue = DriverQueue(memory, 4, event_idx=False)
        queue.call_fd, queue.masked_call_fd = new_eventfd(), new_eventfd()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(queue.wait_call)
                await trio.testing.wait_all_tasks_blocked()
                os.write(queue.masked_call_fd, (1).to_bytes(8, "little"))
            os.write(queue.call_fd, (2).to_bytes(8, "little"))
            with trio.fail_after(1):
                assert await queue.wait_call() == 2
        finally:
            os.close(queue.call_fd)
            os.close(queue.masked_call_fd)
