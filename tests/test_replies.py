"""Replies tell the truth: a failure reply means nothing changed, a success reply means the
change is in effect. The sans-I/O session first (what it records, and when), then a daemon in
its own process driven through `rngd.testing` (Unix socket, memfds, eventfds), each answer
checked against what the daemon does next."""

from __future__ import annotations

import os
import struct
from collections.abc import Awaitable, Callable

import pytest
import trio
from test_protocol import msg, negotiated

from rngd.protocol.constants import ProtocolFeatures, Request, VirtioFeatures
from rngd.protocol.payloads import VringAddr, VringState, encode_memory_table
from rngd.protocol.session import (
    Reply,
    RequestRejected,
    RingOptionsChanged,
    Session,
    VringChanged,
    VringConfig,
)
from rngd.testing import (
    QEMU72_PROTOCOL_FEATURES,
    BackendError,
    Frontend,
    daemon_process,
    generation_layout,
)
from rngd.testing.driver import DriverQueue

U64 = struct.Struct("<Q")
STEP_TIMEOUT = 10.0
#: Long enough for a running ring to have answered a kick (it answers in microseconds).
QUIET = 0.5
#: A VMM address no region holds.
NOWHERE = 0x10_0000_0000


# -- the session ------------------------------------------------------------------------------


def test_vring_configuration_is_recorded_only_when_the_device_says_so() -> None:
    session = negotiated()
    addr = VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0)
    steps = [
        (Request.SET_VRING_NUM, VringState(0, 8).encode(), VringConfig(size=8)),
        (Request.SET_VRING_ADDR, addr.encode(), VringConfig(size=8, addr=addr)),
        (Request.SET_VRING_ENABLE, VringState(0, 1).encode(), VringConfig(8, addr, True)),
    ]
    for request, payload, proposed in steps:
        before = session.vrings[0]
        event = session.handle(msg(request, payload))
        # The whole configuration the request proposes; the session's is still the old one
        # (the device may refuse it, and then nothing has changed).
        assert event == VringChanged(0, proposed)
        assert session.vrings[0] == before
        session.vring_configured(0, proposed)
        assert session.vrings[0] == proposed


def test_set_features_says_when_running_rings_must_be_rebuilt() -> None:
    with_event_idx = int(
        VirtioFeatures.VERSION_1 | VirtioFeatures.RING_EVENT_IDX | VirtioFeatures.PROTOCOL_FEATURES
    )
    session = negotiated(features=with_event_idx)
    # The same features again (QEMU resends them at every device start): nothing to do.
    assert session.handle(msg(Request.SET_FEATURES, U64.pack(with_event_idx))) == Reply(None)
    without = with_event_idx & ~VirtioFeatures.RING_EVENT_IDX
    assert session.handle(msg(Request.SET_FEATURES, U64.pack(without))) == RingOptionsChanged()
    assert session.acked_features == without
    # Refused: nothing recorded.
    with pytest.raises(RequestRejected, match="never offered"):
        session.handle(msg(Request.SET_FEATURES, U64.pack(without | 1 << 5)))
    assert session.acked_features == without
    # The first SET_FEATURES without PROTOCOL_FEATURES enables every ring: they may start.
    legacy = Session()
    assert legacy.handle(msg(Request.SET_FEATURES, U64.pack(VirtioFeatures.VERSION_1))) == (
        RingOptionsChanged()
    )
    assert legacy.vrings[0].enabled


# -- through a daemon ----------------------------------------------------------------------


async def answered(queue: DriverQueue, wait: Callable[[], Awaitable[object]]) -> bool:
    """Post one buffer and kick: whether `wait` (for a used entry, a call) returns within
    `QUIET` seconds. The buffer stays posted either way, for a later start of the ring."""
    queue.post(64)
    queue.kick(force=True)
    with trio.move_on_after(QUIET):
        await wait()
        return True
    return False


async def served(queue: DriverQueue) -> bool:
    return await answered(queue, queue.wait_used)


async def test_a_refused_vring_change_leaves_the_ring_as_it_was(
    workdir: str, source: tuple[str, bytes]
) -> None:
    """SET_VRING_NUM and SET_VRING_ADDR that would put a running ring outside guest memory are
    refused, and the ring runs on as configured before: it serves, and starting it again
    (GET_VRING_BASE, SET_VRING_KICK) starts it at its old size and address. SET_VRING_ENABLE
    and SET_VRING_KICK that would start a ring outside memory are refused the same way: the
    ring stays disabled (a good address then does not start it) and without a kick fd (the
    refused one is closed in the daemon)."""
    expected = source[1]
    async with daemon_process(os.path.join(workdir, "rng.sock"), filename=source[0]) as daemon:
        with trio.fail_after(3 * STEP_TIMEOUT):
            async with await Frontend.connect(daemon.socket_paths[0]) as vmm:
                await vmm.handshake()
                # 64 KiB regions: a ring of 32768 entries does not fit in one.
                queue = vmm.prepare_driver(8, layout=generation_layout(0, 1 << 16))
                await vmm.start(queue)
                got = await vmm.read_random(64)
                good = queue.vring_addr()
                bad = VringAddr(0, 0, NOWHERE, NOWHERE + 0x1000, NOWHERE + 0x2000, 0)

                with pytest.raises(BackendError, match="SET_VRING_NUM refused"):
                    await vmm.set_vring_num(0, 32768, need_reply=True)
                with pytest.raises(BackendError, match="SET_VRING_ADDR refused"):
                    await vmm.set_vring_addr(bad, need_reply=True)
                got += await vmm.read_random(64)
                # Stopped and started again from the session's configuration: the old one.
                assert await vmm.get_vring_base(0) == queue.avail_idx
                assert vmm.kick_fd is not None
                await vmm.set_vring_kick(0, vmm.kick_fd, need_reply=True)
                got += await vmm.read_random(64)
                assert got == expected[: len(got)]

                # A disabled ring takes any address (it is not started)...
                await vmm.set_vring_enable(0, False, need_reply=True)
                await vmm.set_vring_addr(bad, need_reply=True)
                # ...but is not enabled there.
                with pytest.raises(BackendError, match="SET_VRING_ENABLE refused"):
                    await vmm.set_vring_enable(0, True, need_reply=True)
                await vmm.set_vring_addr(good, need_reply=True)
                assert not await served(queue)  # still disabled
                await vmm.set_vring_enable(0, True, need_reply=True)
                (used,) = await queue.wait_used()
                got += used.data

                # Without its kick fd, a ring outside memory: the new kick fd is refused.
                assert await vmm.get_vring_base(0) == queue.avail_idx
                await vmm.set_vring_addr(bad, need_reply=True)
                fds = daemon.fd_count()
                with pytest.raises(BackendError, match="SET_VRING_KICK refused"):
                    await vmm.set_vring_kick(0, vmm.kick_fd, need_reply=True)
                assert daemon.fd_count() == fds
                await vmm.set_vring_addr(good, need_reply=True)
                assert not await served(queue)  # still no kick fd
                await vmm.set_vring_kick(0, vmm.kick_fd, need_reply=True)
                (used,) = await queue.wait_used()
                got += used.data
                got += await vmm.read_random(64)
                assert got == expected[: len(got)]
        assert "would not be in guest memory" in daemon.log()


async def test_a_memory_table_without_the_ring_stands(
    workdir: str, source: tuple[str, bytes]
) -> None:
    """SET_MEM_TABLE without the region holding the running ring succeeds: the table is in
    use (the ring, outside it, stops: an incident line says so), SET_VRING_BASE then succeeds
    too, and the next table holding the ring starts it from that base."""
    expected = source[1]
    async with daemon_process(os.path.join(workdir, "rng.sock"), filename=source[0]) as daemon:
        with trio.fail_after(STEP_TIMEOUT):
            async with await Frontend.connect(daemon.socket_paths[0]) as vmm:
                without_slots = QEMU72_PROTOCOL_FEATURES & ~ProtocolFeatures.CONFIGURE_MEM_SLOTS
                await vmm.handshake(supported_protocol_features=without_slots)
                queue = await vmm.start(vmm.prepare_driver(8))
                got = await vmm.read_random(64)
                memory = queue.memory
                ring = next(
                    i for i, r in enumerate(memory.regions) if r.contains(queue.desc_table, 1)
                )
                others = [i for i in range(len(memory.table)) if i != ring]
                reply = await vmm.request(
                    Request.SET_MEM_TABLE,
                    encode_memory_table([memory.table[i] for i in others]),
                    [memory.fds[i] for i in others],
                    need_reply=True,
                )
                assert reply is not None and reply.ok
                assert not await served(queue)  # the ring is outside the table in use
                # Where the stopped ring stands (the buffer just posted is still to serve):
                # recorded, though the ring cannot start.
                await vmm.set_vring_base(0, queue.avail_idx - 1, need_reply=True)
                await vmm.set_mem_table(memory, need_reply=True)
                (used,) = await queue.wait_used()
                got += used.data
                got += await vmm.read_random(64)
                assert got == expected[: len(got)]
                assert await vmm.get_vring_base(0) == queue.avail_idx
        assert "vring 0 not started" in daemon.log()


async def test_set_features_rebuilds_a_running_ring(
    workdir: str, source: tuple[str, bytes]
) -> None:
    """SET_FEATURES without EVENT_IDX while the ring runs: from its reply on, the ring serves
    on the legacy path, calling the guest on every used buffer whatever used_event says (with
    EVENT_IDX a used_event far ahead means no call). The same features again change nothing."""
    async with daemon_process(os.path.join(workdir, "rng.sock"), filename=source[0]) as daemon:
        with trio.fail_after(STEP_TIMEOUT):
            async with await Frontend.connect(daemon.socket_paths[0]) as vmm:
                queue = await vmm.start_qemu72(8)
                got = await vmm.read_random(64)

                async def called_despite_used_event() -> bool:
                    queue.raw_set_used_event((queue.avail_idx + 0x8000) & 0xFFFF)
                    return await answered(queue, queue.wait_call)

                assert not await called_despite_used_event()
                got += b"".join(u.data for u in queue.used())
                assert vmm.acked_features & VirtioFeatures.RING_EVENT_IDX
                legacy = vmm.acked_features & ~VirtioFeatures.RING_EVENT_IDX
                await vmm.set_features(legacy, need_reply=True)
                queue.event_idx = False  # the guest renegotiated too
                queue.enable_calls(True)  # the avail ring's flags: NO_INTERRUPT clear
                assert await called_despite_used_event()
                got += b"".join(u.data for u in queue.used())
                await vmm.set_features(legacy, need_reply=True)
                got += await vmm.read_random(256)
                assert got == source[1][: len(got)]
        assert "vring 0 not started" not in daemon.log()
