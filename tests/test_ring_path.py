"""The request path in batches: everything available is served with one read of the source,
one used-index store and one interrupt; and the batch's edges (a short read, a stop while it
waits, a buffer that moves) keep every request accounted for.

The daemon runs as a real subprocess where its system calls are counted (/proc/PID/io).
"""

from __future__ import annotations

import os
import threading

import trio

from rngd.health import HealthMode
from rngd.testing import Frontend, Used, daemon_in_process, daemon_process
from rngd.testing.driver import DESC_F_NEXT, DESC_F_WRITE

STEP = 5.0


def proc_count(path: str, key: str) -> int:
    """The number after ``key`` in a /proc file of ``key value`` lines."""
    with open(path) as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise AssertionError(f"no {key} in {path}")


def read_syscalls(pid: int) -> int:
    """read(2)-family calls the whole process made so far (every thread)."""
    return proc_count(f"/proc/{pid}/io", "syscr:")


async def test_a_full_ring_is_one_read_and_one_interrupt(workdir: str) -> None:
    """200 requests posted before one kick: served by a handful of reads (one readv for the
    batch, the kick's eventfd read), not one per request, and signalled by one call. Without
    EVENT_IDX every completion the device reports is an interrupt the guest asked for, so the
    single call shows the completions were published together."""
    async with (
        daemon_process(os.path.join(workdir, "rng.sock"), log_level="warning") as daemon,
        await Frontend.connect(daemon.socket_paths[0]) as vmm,
    ):
        queue = await vmm.start_qemu72(256, event_idx=False)
        await queue.read_random(64)  # the ring runs; its start-up reads are behind us
        call = vmm.call_fd
        assert call is not None
        assert not queue.used()
        _drain(call)
        before = read_syscalls(daemon.pid)
        for _ in range(200):
            queue.post(64, publish=False)
        queue.publish()
        queue.kick(force=True)
        done: list[Used] = []
        calls = 0
        with trio.fail_after(STEP):
            while len(done) < 200:
                await trio.lowlevel.wait_readable(call)
                calls += _drain(call)
                done += queue.used()
        reads = read_syscalls(daemon.pid) - before
        assert [u.len for u in done] == [64] * 200
        assert reads <= 4, f"{reads} reads for 200 requests"
        assert calls + _drain(call) == 1


def _drain(eventfd: int) -> int:
    """The eventfd's count (signals since the last read), resetting it."""
    try:
        return int.from_bytes(os.read(eventfd, 8), "little")
    except BlockingIOError:
        return 0


async def test_the_driver_never_sees_half_a_batch(socks: list[str]) -> None:
    """A driver polling the used index from another thread sees it jump from 0 to 256 at
    once: the elements are written first and the index published once."""
    async with await Frontend.connect(socks[0]) as vmm:
        queue = await vmm.start_qemu72(256)
        seen: set[int] = set()
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                seen.add(queue.read_used_idx())

        for _ in range(256):
            queue.post(64, publish=False)
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            queue.publish()
            queue.kick(force=True)
            with trio.fail_after(STEP):
                assert len(await queue.wait_used(256)) == 256
        finally:
            done.set()
            watcher.join()
        assert seen <= {0, 256}, sorted(seen)


async def test_short_read_completes_what_it_filled_and_the_rest_waits(workdir: str) -> None:
    """A FIFO holding 100 bytes under a batch of four 64-byte requests: the first is filled,
    the second gets the remaining 36 (virtio-rng allows short completions), the others wait
    for more data instead of being completed empty; a stop while they wait reports the base
    after the two completed, and after a restart they are served from the FIFO in order."""
    fifo = os.path.join(workdir, "fifo")
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # held open: the FIFO never hits EOF
    try:
        fed = os.urandom(100 + 128)
        async with (
            daemon_in_process(
                os.path.join(workdir, "rng.sock"),
                filename=fifo,
                health_tests=HealthMode.OFF,  # 100 bytes: less than the start-up test takes
            ) as paths,
            await Frontend.connect(paths[0]) as vmm,
        ):
            queue = await vmm.start_qemu72(4)
            for _ in range(4):
                queue.post(64, publish=False)
            queue.publish()
            os.write(writer, fed[:100])
            queue.kick(force=True)
            with trio.fail_after(STEP):
                first = await queue.wait_used(2)
            assert [u.data for u in first] == [fed[:64], fed[64:100]]
            assert await vmm.get_features()  # the protocol answers while the ring waits
            assert not queue.used()
            with trio.fail_after(STEP):
                assert await vmm.stop() == 2
            await vmm.start(queue, base=2)
            os.write(writer, fed[100:])
            with trio.fail_after(STEP):
                rest = await queue.wait_used(2)
            assert [u.data for u in rest] == [fed[100:164], fed[164:228]]
    finally:
        os.close(writer)


async def test_a_reused_descriptor_pointing_elsewhere_is_filled_where_it_points(
    socks: list[str],
) -> None:
    """Buffer translations are cached by address and length: a driver that points the same
    descriptor at another buffer (or the same address with another length) gets the bytes in
    the new place, and the old buffer is left alone."""
    async with await Frontend.connect(socks[0]) as vmm:
        queue = await vmm.start_qemu72(4)
        assert vmm.memory is not None
        old = vmm.memory.alloc(64, 8)
        new = vmm.memory.alloc(64, 8)
        for gpa, length in [(old, 64), (new, 64), (new, 32)]:
            vmm.memory.fill(old, 64, 0xA5)
            vmm.memory.fill(new, 64, 0xA5)
            queue.raw_post_buffer(0, gpa, length)
            queue.kick(force=True)
            with trio.fail_after(STEP):
                (used,) = await queue.wait_used(strict=False)
            assert used.len == length
            other = new if gpa == old else old
            assert vmm.memory.read(other, 64) == b"\xa5" * 64
            written = vmm.memory.read(gpa, 64)
            assert written[length:] == b"\xa5" * (64 - length)
            assert written[:length] != b"\xa5" * length


async def test_a_chain_longer_than_readv_takes_is_filled_in_part(socks: list[str]) -> None:
    """A chain of 1500 one-byte buffers (a queue of 2048 allows it) is more than one readv
    takes (1024 buffers): its first 1024 buffers are filled and the request completed with
    that count, rather than the ring waiting forever for room that never comes."""
    async with await Frontend.connect(socks[0]) as vmm:
        queue = await vmm.start_qemu72(2048)
        queue.post([1] * 1500)
        queue.kick(force=True)
        with trio.fail_after(STEP):
            (used,) = await queue.wait_used()
        assert used.len == 1024
        assert len(await queue.read_random(64)) == 64  # and the ring goes on


def event_loop_switches(pid: int) -> int:
    """Voluntary context switches of the daemon's main thread, where trio runs: each time it
    slept and was woken."""
    return proc_count(f"/proc/{pid}/task/{pid}/status", "voluntary_ctxt_switches:")


async def test_a_limit_that_never_binds_wakes_the_event_loop_once_a_lease(workdir: str) -> None:
    """With a rate limit, the ring's thread takes budget from trio in leases: 300 requests
    one at a time, as the Linux driver sends them, wake the event loop a handful of times,
    not once a request (as when the thread asked for exactly each request's bytes)."""
    async with (
        daemon_process(
            os.path.join(workdir, "rng.sock"),
            log_level="warning",
            max_bytes=1_000_000_000,
            period_ms=60_000,
        ) as daemon,
        await Frontend.connect(daemon.socket_paths[0]) as vmm,
    ):
        queue = await vmm.start_qemu72(4)
        await queue.read_random(64)  # the ring runs and holds its first lease
        before = event_loop_switches(daemon.pid)
        data = await queue.read_random(300 * 64, in_flight=1)
        woken = event_loop_switches(daemon.pid) - before
        assert len(data) == 300 * 64
        assert woken < 30, f"the event loop woke {woken} times for 300 requests"


async def test_a_chain_whose_second_buffer_moves_is_filled_where_it_points(
    socks: list[str],
) -> None:
    """A two-descriptor chain posted again with the same head descriptor but its second one
    pointing elsewhere: the second fill lands in the new buffer (a chain is cached by its
    head's bytes only when the head is the whole chain)."""
    async with await Frontend.connect(socks[0]) as vmm:
        queue = await vmm.start_qemu72(8)
        assert vmm.memory is not None
        head, old, new = (vmm.memory.alloc(32, 8) for _ in range(3))
        for target in (old, new):
            for gpa in (head, old, new):
                vmm.memory.fill(gpa, 32, 0xA5)
            queue.raw_write_desc(1, target, 32, DESC_F_WRITE, 0)
            queue.raw_post_buffer(0, head, 32, DESC_F_WRITE | DESC_F_NEXT, 1)
            queue.kick(force=True)
            with trio.fail_after(STEP):
                (used,) = await queue.wait_used(strict=False)
            assert used.len == 64
            other = new if target == old else old
            assert vmm.memory.read(target, 32) != b"\xa5" * 32
            assert vmm.memory.read(other, 32) == b"\xa5" * 32, "filled where it used to point"
