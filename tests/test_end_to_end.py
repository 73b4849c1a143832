"""End to end: a real daemon (in this process, or `python -m rngd`) and the `rngd.testing`
front-end playing QEMU 7.2 and the Linux virtio-rng driver over real sockets, memfds and
eventfds."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
from collections.abc import AsyncIterator

import pytest
import trio

from rngd.protocol.constants import HeaderFlags, Request, VirtioFeatures
from rngd.protocol.payloads import VringState
from rngd.testing import (
    DESC_F_WRITE,
    BackendDisconnected,
    DaemonProcess,
    DriverQueue,
    Frontend,
    Used,
    daemon_in_process,
    daemon_process,
    open_fd_count,
)
from rngd.testing.daemons import time_scale

#: Generous bound for one exchange; a hang means a lost kick or call, which must fail.
STEP_TIMEOUT = 5.0 * time_scale()


@pytest.fixture
async def sock0(source: tuple[str, bytes], workdir: str) -> AsyncIterator[str]:
    async with daemon_in_process(os.path.join(workdir, "rng.sock"), filename=source[0]) as paths:
        yield paths[0]


def qemu72_start_transcript(*, reply_ack: bool, reboot: bool = False) -> list[tuple[int, int]]:
    """What QEMU 7.2 sends to start the device (seen on the wire against rngd): STATUS and
    CONFIGURE_MEM_SLOTS negotiated, FEATURES_OK added to the status (QEMU 7.2 does not reset
    it on a stop, so a reboot finds it set), the two regions removed (on a reboot: new
    memory) and added one by one."""
    need = HeaderFlags.NEED_REPLY if reply_ack else 0
    removed = [(Request.REM_MEM_REG, need)] * 2 if reboot else []
    status = [] if reboot else [(Request.SET_STATUS, need)]
    return [
        (Request.SET_VRING_CALL, 0),
        (Request.SET_VRING_ERR, 0),
        (Request.SET_VRING_CALL, 0),
        (Request.SET_FEATURES, 0),
        (Request.GET_STATUS, 0),
        *status,
        *removed,
        (Request.ADD_MEM_REG, need),
        (Request.ADD_MEM_REG, need),
        (Request.SET_VRING_NUM, 0),
        (Request.SET_VRING_BASE, 0),
        (Request.SET_VRING_ADDR, 0),
        (Request.SET_VRING_KICK, 0),
        (Request.SET_VRING_ENABLE, 0),
        (Request.SET_VRING_CALL, 0),
    ]


QEMU72_CONNECT = [
    (Request.GET_FEATURES, 0),
    (Request.GET_PROTOCOL_FEATURES, 0),
    (Request.SET_PROTOCOL_FEATURES, 0),
    (Request.GET_QUEUE_NUM, 0),
    (Request.GET_MAX_MEM_SLOTS, 0),
    (Request.SET_OWNER, 0),
    (Request.GET_FEATURES, 0),
]
QEMU72_STOP = [
    (Request.SET_VRING_ENABLE, 0),
    (Request.GET_VRING_BASE, 0),
    (Request.SET_VRING_CALL, 0),
]


async def read_chunks(queue: DriverQueue, count: int, chunk: int = 64) -> list[Used]:
    """``count`` requests of ``chunk`` bytes, one in flight, as virtio-rng does."""
    out: list[Used] = []
    for _ in range(count):
        queue.post(chunk)
        queue.kick()
        out += await queue.wait_used()
    return out


def assert_partition(source: bytes, streams: list[list[bytes]]) -> None:
    """Every chunk is a slice of ``source``; each stream's slices come in source order; all
    slices together tile the start of ``source`` with no byte served twice."""
    spans = []
    for stream in streams:
        previous = -1
        for chunk in stream:
            offset = source.find(chunk)
            assert offset >= 0, "a guest got bytes that are not from the source"
            assert offset > previous, "a guest got source bytes out of order"
            previous = offset
            spans.append((offset, len(chunk)))
    spans.sort()
    position = 0
    for offset, length in spans:
        assert offset == position, f"source bytes {position}..{offset} skipped or served twice"
        position += length


# -- bytes in order, every buffer shape ----------------------------------------------------


@pytest.mark.parametrize("queue_size", [4, 256])
@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
@pytest.mark.parametrize(
    ("chunk", "segments", "indirect"),
    [(64, 1, False), (100, 3, False), (256, 4, True)],
    ids=["single", "chain", "indirect"],
)
@pytest.mark.parametrize("in_flight", [1, None], ids=["one_in_flight", "ring_full"])
async def test_guest_reads_source_bytes_in_order(
    sock0: str,
    source: tuple[str, bytes],
    queue_size: int,
    event_idx: bool,
    chunk: int,
    segments: int,
    indirect: bool,
    in_flight: int | None,
) -> None:
    with trio.fail_after(STEP_TIMEOUT):
        async with await Frontend.connect(sock0) as vmm:
            queue = await vmm.start_qemu72(queue_size, event_idx=event_idx)
            assert bool(vmm.acked_features & VirtioFeatures.RING_EVENT_IDX) == event_idx
            got = await vmm.read_random(
                20_000, chunk, in_flight=in_flight, segments=segments, indirect=indirect
            )
            assert got == source[1][:20_000]
            assert queue.in_flight == 0


async def test_without_protocol_features_kick_starts_the_ring(
    sock0: str, source: tuple[str, bytes]
) -> None:
    with trio.fail_after(STEP_TIMEOUT):
        async with await Frontend.connect(sock0) as vmm:
            await vmm.start_qemu72(protocol_features=False)
            assert (Request.SET_VRING_ENABLE, 0) not in vmm.transcript
            assert await vmm.read_random(1000) == source[1][:1000]


async def test_ring_is_served_as_soon_as_ready(sock0: str, source: tuple[str, bytes]) -> None:
    """Buffers posted before the back-end knows the ring must be served with no kick but the
    one QEMU's ioeventfd starts with."""

    def prepost(queue: DriverQueue) -> None:
        queue.post(64)
        queue.post([16, 48])

    with trio.fail_after(STEP_TIMEOUT):
        async with await Frontend.connect(sock0) as vmm:
            queue = await vmm.start_qemu72(prepare=prepost)
            used = await queue.wait_used(2)
            assert queue.kicks == 0
            assert b"".join(u.data for u in used) == source[1][:128]


async def test_calls_go_to_the_newest_call_fd(sock0: str) -> None:
    with trio.fail_after(STEP_TIMEOUT):
        async with await Frontend.connect(sock0) as vmm:
            queue = await vmm.start_qemu72()
            # A reply to a later request proves the last SET_VRING_CALL was handled.
            await vmm.get_features()
            assert vmm.call_fd is not None and vmm.masked_call_fd is not None
            with contextlib.suppress(BlockingIOError):
                os.read(vmm.masked_call_fd, 8)
            queue.post(64)
            queue.kick()
            await trio.lowlevel.wait_readable(vmm.call_fd)
            assert len(queue.used()) == 1
            with pytest.raises(BlockingIOError):
                os.read(vmm.masked_call_fd, 8)


async def test_event_idx_device_asks_for_kicks(sock0: str, source: tuple[str, bytes]) -> None:
    """With EVENT_IDX the device keeps avail_event current: every request still gets served
    when the driver kicks only when avail_event says so."""
    with trio.fail_after(STEP_TIMEOUT):
        async with await Frontend.connect(sock0) as vmm:
            queue = await vmm.start_qemu72(4, event_idx=True)
            used = await read_chunks(queue, 50)
            assert queue.read_avail_event() == queue.avail_idx
            assert b"".join(u.data for u in used) == source[1][: 50 * 64]


# -- QEMU 7.2's life cycle -----------------------------------------------------------------


async def test_qemu72_sequence_with_reboots(workdir: str, source: tuple[str, bytes]) -> None:
    async with daemon_process(os.path.join(workdir, "rng.sock"), filename=source[0]) as daemon:
        with trio.fail_after(STEP_TIMEOUT):
            async with await Frontend.connect(daemon.socket_paths[0]) as vmm:
                queue = await vmm.start_qemu72(4)
                assert vmm.reply_ack
                assert vmm.transcript == QEMU72_CONNECT + qemu72_start_transcript(reply_ack=True)
                expected = source[1]
                got = await vmm.read_random(640)
                old_addr = queue.vring_addr()
                for boot, size in enumerate([4, 256, 4], start=1):
                    posted = queue.avail_idx
                    del vmm.transcript[:]
                    base, queue = await vmm.reboot(size)
                    assert base == posted, "GET_VRING_BASE must return the next avail index"
                    assert vmm.transcript == QEMU72_STOP + qemu72_start_transcript(
                        reply_ack=True, reboot=True
                    )
                    new_addr = queue.vring_addr()
                    assert (new_addr.desc, new_addr.avail, new_addr.used) != (
                        old_addr.desc,
                        old_addr.avail,
                        old_addr.used,
                    )
                    old_addr = new_addr
                    got += await vmm.read_random(64 * 10 * boot)
                assert got == expected[: len(got)]
                assert len(got) == 640 + 64 * 10 * (1 + 2 + 3)


async def test_stop_returns_base_and_restart_from_it(sock0: str, source: tuple[str, bytes]) -> None:
    """GET_VRING_BASE then a start with that base on the same ring (as after a migration-less
    vhost restart): the device resumes where it stopped."""
    with trio.fail_after(STEP_TIMEOUT):
        async with await Frontend.connect(sock0) as vmm:
            queue = await vmm.start_qemu72(8)
            first = await vmm.read_random(64 * 5)
            base = await vmm.stop()
            assert base == 5
            await vmm.start(queue, base=base)
            assert first + await vmm.read_random(64 * 5) == source[1][: 64 * 10]


@pytest.mark.parametrize("base", [0, None], ids=["base_0", "no_set_vring_base"])
async def test_reset_owner_then_the_new_owner_starts_from_its_own_base(
    base: int | None, sock0: str, source: tuple[str, bytes]
) -> None:
    """The first owner runs the ring to avail index 5, then RESET_OWNER; a new owner on the
    same connection negotiates again and starts a fresh ring with SET_VRING_BASE 0 (or none:
    a reset ring starts at 0). The device serves it from index 0 (from 5 it would take the
    fresh ring's avail index 1 for one running 65532 entries ahead, and stop it as broken),
    and GET_VRING_BASE reports the new owner's progress: nothing of the old run leaks into
    the new one."""
    with trio.fail_after(STEP_TIMEOUT):
        async with await Frontend.connect(sock0) as vmm:
            queue = await vmm.start_qemu72(8)
            first = await read_chunks(queue, 5)
            assert queue.avail_idx == 5
            await vmm.reset_owner(need_reply=True)
            await vmm.handshake()
            vmm.generation += 1
            fresh = vmm.prepare_driver(8)
            await vmm.start(fresh, base=base)
            again = await read_chunks(fresh, 3)
            assert fresh.read_used_idx() == 3
            assert b"".join(u.data for u in first + again) == source[1][: 64 * 8]
            assert await vmm.get_vring_base(0) == 3


async def test_set_vring_base_on_a_running_ring_wins_over_its_progress(
    sock0: str, source: tuple[str, bytes]
) -> None:
    """SET_VRING_BASE while the ring runs (QEMU stops the ring first; a VMM need not): the
    ring restarts from the VMM's base, not from where the stopped run stood. The ring has
    served avail slots 0..4; the guest puts two new requests in slots 3 and 4 (the avail
    index stays 5, so the running ring has nothing new to see) and the VMM says base 3: the
    device serves slots 3 and 4 again, with the new requests."""
    with trio.fail_after(STEP_TIMEOUT):
        async with await Frontend.connect(sock0) as vmm:
            queue = await vmm.start_qemu72(8)
            await read_chunks(queue, 5)
            buffers = []
            for slot, head in ((3, 6), (4, 7)):
                gpa = queue.memory.alloc(64, 8)
                buffers.append(gpa)
                queue.raw_write_desc(head, gpa, 64, DESC_F_WRITE, 0)
                queue.raw_write_avail_entry(slot, head)
            await vmm.set_vring_base(0, 3, need_reply=True)
            while queue.read_used_elem(4) != (7, 64):
                await trio.sleep(0.005)
            assert queue.read_used_elem(3) == (6, 64)
            assert queue.read_used_idx() == 5
            got = b"".join(queue.memory.read(gpa, 64) for gpa in buffers)
            assert got == source[1][64 * 5 : 64 * 7]
            assert await vmm.get_vring_base(0) == 5


# -- several guests ------------------------------------------------------------------------


async def test_three_sockets_served_at_once(workdir: str, source: tuple[str, bytes]) -> None:
    streams: list[list[bytes]] = [[], [], []]
    async with daemon_process(
        os.path.join(workdir, "rng.sock"), socket_count=3, filename=source[0]
    ) as daemon:

        async def guest(index: int, size: int) -> None:
            async with await Frontend.connect(daemon.socket_paths[index]) as vmm:
                queue = await vmm.start_qemu72(size)
                for used in await read_chunks(queue, 100):
                    streams[index].append(used.data)

        with trio.fail_after(STEP_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for index, size in enumerate([4, 256, 16]):
                    nursery.start_soon(guest, index, size)
    assert all(len(s) == 100 for s in streams)
    assert_partition(source[1], streams)


async def test_second_vmm_is_closed_at_once_while_the_first_is_served(
    sock0: str, source: tuple[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """One VMM per socket: a connection while the socket's VMM is connected is closed at
    once (not left hanging in the backlog), with one log line naming the socket; the first VMM
    is served throughout."""
    caplog.set_level(logging.INFO, logger="rngd")
    with trio.fail_after(STEP_TIMEOUT):
        async with await Frontend.connect(sock0) as first:
            await first.start_qemu72()
            got = await first.read_random(64)
            async with await Frontend.connect(sock0) as second:
                with pytest.raises(BackendDisconnected):
                    await second.get_features()
            got += await first.read_random(64)
            await first.get_features()
    assert got == source[1][:128]
    refused = [r.getMessage() for r in caplog.records if "connection refused" in r.getMessage()]
    assert len(refused) == 1, refused
    assert refused[0].startswith(os.path.basename(sock0) + ": ")


async def test_next_vmm_is_served_as_soon_as_the_first_hangs_up(
    sock0: str, source: tuple[str, bytes]
) -> None:
    """The next VMM may connect before the daemon has seen the previous one hang up: it is
    not refused, and it is served once the previous connection is cleaned up. (Whether the
    accept or the hang-up is handled first varies from round to round.)"""
    expected = source[1]
    with trio.fail_after(STEP_TIMEOUT * 4):
        offset = 0
        for _ in range(20):
            vmm = await Frontend.connect(sock0)
            async with vmm:
                await vmm.start_qemu72()
                assert await vmm.read_random(64) == expected[offset : offset + 64]
            offset += 64


async def test_refused_connections_are_logged_rate_limited(
    sock0: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A VMM reconnecting in a loop cannot flood the log: a burst of lines, then a count of
    the rest (told when the socket's VMM leaves)."""
    caplog.set_level(logging.INFO, logger="rngd")
    attempts = 40
    with trio.fail_after(STEP_TIMEOUT * 2):
        async with await Frontend.connect(sock0) as first:
            await first.start_qemu72()
            for _ in range(attempts):
                async with await Frontend.connect(sock0) as other:
                    with pytest.raises(BackendDisconnected):
                        await other.get_features()
            await first.read_random(64)
        # Served once the first has gone, as before any refusal.
        async with await Frontend.connect(sock0) as next_vmm:
            await next_vmm.start_qemu72()
            await next_vmm.read_random(64)
    messages = [r.getMessage() for r in caplog.records]
    logged = sum("connection refused" in m for m in messages)
    held_back = sum(int(m.split()[1]) for m in messages if re.match(r"\S+: \d+ more incidents", m))
    assert logged < attempts
    assert logged + held_back == attempts, messages


async def test_other_socket_serves_while_one_refuses(
    socks: list[str], source: tuple[str, bytes]
) -> None:
    with trio.fail_after(STEP_TIMEOUT):
        async with (
            await Frontend.connect(socks[0]) as first,
            await Frontend.connect(socks[1]) as other,
        ):
            await first.start_qemu72()
            await other.start_qemu72()
            async with await Frontend.connect(socks[0]) as refused:
                with pytest.raises(BackendDisconnected):
                    await refused.get_features()
            assert len(await other.read_random(64)) == 64
            assert len(await first.read_random(64)) == 64


# -- resource hygiene ----------------------------------------------------------------------


async def _cycle(path: str, kind: int) -> None:
    """One connection that ends in one of several ways, each leaving fds to clean up."""
    async with await Frontend.connect(path) as vmm:
        if kind == 0:
            return
        if kind == 1:
            await vmm.handshake()
            return
        queue = await vmm.start_qemu72()
        if kind == 2:
            await queue.read_random(64)
        elif kind == 3:
            # A replacement call fd and a message cut short, with an fd, at the hang-up.
            await vmm.set_vring_call(0, vmm.masked_call_fd)
            await vmm.send_raw(b"\x0d\x00", [vmm.err_fd] if vmm.err_fd is not None else [])
        elif kind == 4:
            await vmm.stop()
        else:
            queue.post(64)
            await vmm.reboot()


async def test_connect_disconnect_cycles_leave_no_fds(
    workdir: str, source: tuple[str, bytes]
) -> None:
    async with daemon_process(
        os.path.join(workdir, "rng.sock"), filename=source[0], log_level="warning"
    ) as daemon:
        path = daemon.socket_paths[0]

        async def settled_fd_count() -> int:
            # The daemon serves one VMM per socket at a time: once a new connection has been
            # answered, everything the previous one held has been released.
            async with await Frontend.connect(path) as probe:
                await probe.get_features()
                return daemon.fd_count()

        with trio.fail_after(30 * time_scale()):
            before = await settled_fd_count()
            # Each connect comes right after the previous hang-up: none may be refused.
            for cycle in range(200):
                await _cycle(path, cycle % 6)
            after = await settled_fd_count()
        assert after == before, daemon.log()[-3000:]


async def test_in_process_cycles_leave_no_fds(sock0: str) -> None:
    """The same in this process: also checks that the harness closes what it opens."""

    async def settled() -> int:
        async with await Frontend.connect(sock0) as probe:
            await probe.get_features()
            return open_fd_count()

    with trio.fail_after(30 * time_scale()):
        before = await settled()
        for cycle in range(60):
            await _cycle(sock0, cycle % 6)
        assert await settled() == before


# -- shutdown ------------------------------------------------------------------------------


async def _started_guest(daemon: DaemonProcess, index: int, stack: list[Frontend]) -> None:
    vmm = await Frontend.connect(daemon.socket_paths[index])
    stack.append(vmm)
    queue = await vmm.start_qemu72(4)
    await queue.read_random(64)
    # Leave requests in flight: with -m the device is parked waiting for budget.
    queue.post(64)
    queue.post([32, 32], indirect=True)
    queue.kick(force=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("max_bytes", [None, 300], ids=["unlimited", "throttled"])
async def test_signal_with_connected_guests_exits_cleanly(
    workdir: str, source: tuple[str, bytes], signum: int, max_bytes: int | None
) -> None:
    frontends: list[Frontend] = []
    try:
        async with daemon_process(
            os.path.join(workdir, "rng.sock"),
            socket_count=3,
            filename=source[0],
            max_bytes=max_bytes,
            check_exit=False,
        ) as daemon:
            with trio.fail_after(STEP_TIMEOUT):
                for index in range(3):
                    await _started_guest(daemon, index, frontends)
            start = trio.current_time()
            code = await daemon.terminate(timeout=1.0, signum=signum)
            elapsed = trio.current_time() - start
            assert code == 0, daemon.log()
            assert elapsed < 1.0
            for path in daemon.socket_paths:
                assert not os.path.exists(path), f"{path} left behind"
            with trio.fail_after(STEP_TIMEOUT):
                for vmm in frontends:
                    with pytest.raises(BackendDisconnected):
                        await vmm.get_features()
    finally:
        for vmm in frontends:
            await vmm.aclose()


async def test_stop_while_throttled_keeps_the_parked_request(
    workdir: str, source: tuple[str, bytes], threaded_autojump_clock: trio.testing.MockClock
) -> None:
    """A request parked on the bandwidth budget when the VMM stops the ring is not counted in
    GET_VRING_BASE: after a restart from that base it is served (once the period refills)
    instead of being lost, which would hang the guest's one-request-at-a-time driver."""
    data = source[1]
    async with (
        daemon_in_process(
            os.path.join(workdir, "rng.sock"), filename=source[0], max_bytes=100
        ) as paths,
        await Frontend.connect(paths[0]) as vmm,
    ):
        queue = await vmm.start_qemu72(4)
        queue.post(64)
        queue.post(64)
        queue.kick()
        used = await queue.wait_used(2)
        # The budget runs out inside the second request: a short completion, not a wait.
        assert [u.len for u in used] == [64, 36]
        queue.post(64)
        queue.kick()
        await vmm.get_features()
        assert await vmm.stop() == 2
        await vmm.start(queue, base=2)
        (parked,) = await queue.wait_used()
        assert parked.data == data[100:164]
        assert trio.current_time() >= 65.536, "served before the period refilled the budget"


# -- the raw API, as hostile-guest and malformed-request tests use it ----------------------


async def test_raw_descriptor_outside_memory_is_refused_and_ring_goes_on(
    sock0: str, source: tuple[str, bytes]
) -> None:
    with trio.fail_after(STEP_TIMEOUT):
        async with await Frontend.connect(sock0) as vmm:
            queue = await vmm.start_qemu72(8)
            # Between the two regions: no VMM mapping covers it.
            queue.raw_post_buffer(7, 0x8000_0000, 64)
            queue.kick(force=True)
            (bad,) = await queue.wait_used()
            assert (bad.id, bad.len, bad.tracked) == (7, 0, False)
            assert queue.free_descriptors == 8
            assert await vmm.read_random(128) == source[1][:128]


async def test_refused_request_is_answered_and_connection_kept(sock0: str) -> None:
    with trio.fail_after(STEP_TIMEOUT):
        async with await Frontend.connect(sock0) as vmm:
            await vmm.handshake()
            assert vmm.reply_ack
            reply = await vmm.request(
                Request.SET_VRING_NUM, VringState(0, 3).encode(), need_reply=True
            )
            assert reply is not None and not reply.ok
            unknown = await vmm.request(999, need_reply=True)
            assert unknown is not None and not unknown.ok
            await vmm.start(queue_size=4)
            assert len(await vmm.read_random(64)) == 64
