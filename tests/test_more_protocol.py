"""Device reset (RESET_DEVICE, SET/GET_STATUS), GET/SET_CONFIG and CONFIGURE_MEM_SLOTS
(GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG): the sans-I/O session fed messages directly,
then a daemon in its own process driven through `rngd.testing` (Unix socket, memfds,
eventfds), its fds and mappings read from /proc."""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import pytest
import trio

from rngd.protocol.codec import Message, MessageError, MessageReader, encode_message
from rngd.protocol.constants import (
    MAX_MEM_SLOTS,
    ProtocolFeatures,
    Request,
    VirtioFeatures,
)
from rngd.protocol.payloads import ConfigSpace, MemoryRegion, encode_memory_region
from rngd.protocol.session import (
    AddMemReg,
    RemMemReg,
    Reply,
    RequestRejected,
    ResetDevice,
    Session,
)
from rngd.testing import (
    QEMU72_PROTOCOL_FEATURES,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    UVA_BASE,
    BackendError,
    DaemonProcess,
    Frontend,
    daemon_process,
)

U64 = struct.Struct("<Q")
STEP_TIMEOUT = 10.0


def msg(request: int, payload: bytes = b"", fds: list[int] | None = None) -> Message:
    reader = MessageReader()
    reader.feed(encode_message(request, payload), fds or [])
    message = reader.next()
    assert message is not None
    return message


def session_with(protocol_features: int) -> Session:
    session = Session()
    session.handle(msg(Request.SET_OWNER))
    session.handle(msg(Request.SET_PROTOCOL_FEATURES, U64.pack(protocol_features)))
    session.handle(msg(Request.SET_FEATURES, U64.pack(session.device_features)))
    return session


def region(gpa: int, size: int = 1 << 20, *, uva: int | None = None) -> MemoryRegion:
    return MemoryRegion(gpa, size, UVA_BASE + gpa if uva is None else uva, 0)


# -- the session ------------------------------------------------------------------------------


def test_offer_includes_reset_status_and_mem_slots_but_not_config() -> None:
    offered = Session().protocol_features
    for bit in (
        ProtocolFeatures.RESET_DEVICE,
        ProtocolFeatures.STATUS,
        ProtocolFeatures.CONFIGURE_MEM_SLOTS,
    ):
        assert offered & bit, bit
    assert not offered & ProtocolFeatures.CONFIG


def test_get_config_gets_the_empty_answer_set_config_is_refused() -> None:
    session = session_with(ProtocolFeatures.REPLY_ACK)
    event = session.handle(msg(Request.GET_CONFIG, ConfigSpace(0, 8, 0, bytes(8)).encode()))
    # A reply whose payload is empty: the specification's "error" answer.
    assert event == Reply(encode_message(Request.GET_CONFIG, b"", 0x4))
    with pytest.raises(RequestRejected, match="no configuration space"):
        session.handle(msg(Request.SET_CONFIG, ConfigSpace(0, 4, 0, bytes(4)).encode()))
    with pytest.raises(Exception, match="expected 16"):
        session.handle(msg(Request.GET_CONFIG, ConfigSpace(0, 4, 0, b"").encode()))


def test_status_needs_the_feature_and_zero_resets_the_device() -> None:
    bare = session_with(ProtocolFeatures.REPLY_ACK)
    with pytest.raises(RequestRejected, match="STATUS"):
        bare.handle(msg(Request.SET_STATUS, U64.pack(STATUS_FEATURES_OK)))
    # A query is answered either way.
    assert bare.handle(msg(Request.GET_STATUS)) == Reply(
        encode_message(Request.GET_STATUS, U64.pack(0), 0x4)
    )

    session = session_with(ProtocolFeatures.STATUS)
    session.handle(msg(Request.SET_VRING_NUM, struct.pack("<II", 0, 8)))
    session.handle(msg(Request.SET_VRING_ENABLE, struct.pack("<II", 0, 1)))
    assert session.handle(msg(Request.SET_STATUS, U64.pack(0x0F))) == Reply(None)
    assert session.status == 0x0F
    with pytest.raises(RequestRejected, match="status byte"):
        session.handle(msg(Request.SET_STATUS, U64.pack(0x100)))
    assert session.status == 0x0F

    assert session.handle(msg(Request.SET_STATUS, U64.pack(0))) == ResetDevice()
    assert session.status == 0
    # Virtio features are gone; the vhost-user bit stays (rings still start disabled).
    assert session.acked_features == VirtioFeatures.PROTOCOL_FEATURES
    assert not session.features_set
    assert (session.vrings[0].size, session.vrings[0].enabled) == (0, False)
    assert session.owner and session.acked_protocol_features == ProtocolFeatures.STATUS


def test_reset_device_needs_the_feature() -> None:
    with pytest.raises(RequestRejected, match="RESET_DEVICE"):
        session_with(ProtocolFeatures.STATUS).handle(msg(Request.RESET_DEVICE))
    session = session_with(ProtocolFeatures.RESET_DEVICE)
    assert session.handle(msg(Request.RESET_DEVICE)) == ResetDevice()


def test_mem_slots_regions_checked_against_what_is_mapped() -> None:
    fds: list[int] = []

    def add(r: MemoryRegion) -> Message:
        fd = os.eventfd(0)  # any fd: the session does not look at it
        fds.append(fd)
        return msg(Request.ADD_MEM_REG, encode_memory_region(r), [fd])

    try:
        with pytest.raises(RequestRejected, match="CONFIGURE_MEM_SLOTS"):
            session_with(0).handle(add(region(0)))
        session = session_with(ProtocolFeatures.CONFIGURE_MEM_SLOTS)
        session.max_mem_slots = 2
        assert session.handle(msg(Request.GET_MAX_MEM_SLOTS)) == Reply(
            encode_message(Request.GET_MAX_MEM_SLOTS, U64.pack(2), 0x4)
        )
        first = add(region(0))
        event = session.handle(first)
        assert event == AddMemReg(region(0), fds[-1]) and first.fds == []
        # Until the I/O layer says it mapped it, the region is not there to overlap.
        session.memory_mapped([region(0)])
        with pytest.raises(Exception, match="overlap"):
            session.handle(add(region(0x8_0000, uva=UVA_BASE + 0x100_0000)))
        session.handle(add(region(0x100_0000)))
        session.memory_mapped([region(0), region(0x100_0000)])
        with pytest.raises(RequestRejected, match="all 2 slots"):
            session.handle(add(region(0x200_0000)))

        # Removal: by guest address, VMM address and size; the mmap offset does not count.
        other_offset = MemoryRegion(0x100_0000, 1 << 20, UVA_BASE + 0x100_0000, 4096)
        with_fd = msg(Request.REM_MEM_REG, encode_memory_region(other_offset), [os.eventfd(0)])
        fds.extend(with_fd.fds)
        event = session.handle(with_fd)
        assert event == RemMemReg(region(0x100_0000), fds[-1])
        with pytest.raises(RequestRejected, match="no region"):
            session.handle(msg(Request.REM_MEM_REG, encode_memory_region(region(0x300_0000))))
        assert session.handle(
            msg(Request.REM_MEM_REG, encode_memory_region(region(0)))
        ) == RemMemReg(region(0), None)
    finally:
        for fd in fds:
            os.close(fd)


# -- through a daemon ----------------------------------------------------------------------


def eventfds(daemon: DaemonProcess) -> int:
    count = 0
    for name in os.listdir(f"/proc/{daemon.pid}/fd"):
        try:
            if os.readlink(f"/proc/{daemon.pid}/fd/{name}") == "anon_inode:[eventfd]":
                count += 1
        except FileNotFoundError:
            pass
    return count


def mapped(daemon: DaemonProcess, memfd_name: str) -> bool:
    with open(f"/proc/{daemon.pid}/maps") as maps:
        return f"memfd:{memfd_name} " in maps.read()


async def test_reset_device_stops_the_ring_and_forgets_it_memory_stays(
    workdir: str, source: tuple[str, bytes]
) -> None:
    """RESET_DEVICE with the ring running: the ring stops (its thread, its stop eventfd and
    the kick, call and err fds are gone from the daemon), GET_VRING_BASE then finds a ring in
    its initial state (index 0), and the VMM starts the device again without resending
    memory (QEMU's shadow table says the back-end has it): the guest's bytes go on in order."""
    async with daemon_process(os.path.join(workdir, "rng.sock"), filename=source[0]) as daemon:
        with trio.fail_after(STEP_TIMEOUT):
            async with await Frontend.connect(daemon.socket_paths[0]) as vmm:
                await vmm.handshake()
                before = eventfds(daemon)
                queue = await vmm.start(vmm.prepare_driver(8))
                got = await vmm.read_random(640)
                assert eventfds(daemon) > before
                await vmm.reset_device(need_reply=True)
                assert eventfds(daemon) == before
                assert await vmm.get_vring_base(0) == 0
                del vmm.transcript[:]
                await vmm.start(queue, base=queue.avail_idx)
                assert not any(
                    r in (Request.ADD_MEM_REG, Request.SET_MEM_TABLE) for r, _ in vmm.transcript
                )
                got += await vmm.read_random(640)
                assert got == source[1][: len(got)]


async def test_qemu10_status_sequence(workdir: str, source: tuple[str, bytes]) -> None:
    """QEMU 10 with STATUS: GET_STATUS right after SET_FEATURES (then FEATURES_OK), a reply
    awaited for SET_VRING_ENABLE, DRIVER_OK once started, and on stop SET_STATUS 0, which
    resets the device; the next start negotiates features again and the ring resumes."""
    async with daemon_process(os.path.join(workdir, "rng.sock"), filename=source[0]) as daemon:
        with trio.fail_after(STEP_TIMEOUT):
            async with await Frontend.connect(daemon.socket_paths[0]) as vmm:
                await vmm.handshake()
                assert vmm.protocol_features & ProtocolFeatures.STATUS
                queue = await vmm.start(vmm.prepare_driver(8), wait_enable=True)
                assert vmm.transcript.count((Request.SET_VRING_ENABLE, 8)) == 1
                after_features = vmm.transcript.index((Request.SET_FEATURES, 0)) + 1
                assert vmm.transcript[after_features : after_features + 2] == [
                    (Request.GET_STATUS, 0),
                    (Request.SET_STATUS, 8),
                ]
                await vmm.add_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK)
                assert await vmm.get_status() == 0x0F
                got = await vmm.read_random(640)

                await vmm.set_vring_enable(0, False, need_reply=True)
                base = await vmm.get_vring_base(0)
                assert base == queue.avail_idx
                await vmm.set_status(0, need_reply=True)
                assert await vmm.get_status() == 0
                assert await vmm.get_vring_base(0) == 0  # the ring as a new device has it
                del vmm.transcript[:]
                await vmm.start(queue, base=base, wait_enable=True)
                assert (Request.SET_STATUS, 8) in vmm.transcript
                got += await vmm.read_random(640)
                assert got == source[1][: len(got)]


async def test_status_refused_unless_negotiated(workdir: str) -> None:
    async with daemon_process(os.path.join(workdir, "rng.sock")) as daemon:
        with trio.fail_after(STEP_TIMEOUT):
            async with await Frontend.connect(daemon.socket_paths[0]) as vmm:
                without = QEMU72_PROTOCOL_FEATURES & ~(
                    ProtocolFeatures.STATUS | ProtocolFeatures.RESET_DEVICE
                )
                await vmm.handshake(supported_protocol_features=without)
                with pytest.raises(BackendError, match="SET_STATUS refused"):
                    await vmm.set_status(STATUS_FEATURES_OK, need_reply=True)
                assert await vmm.get_status() == 0
                with pytest.raises(BackendError, match="RESET_DEVICE refused"):
                    await vmm.reset_device(need_reply=True)
        assert "SET_STATUS refused" in daemon.log()


async def test_config_space_requests(workdir: str) -> None:
    """GET_CONFIG gets a reply with an empty payload (the specification's error answer for a
    device without such bytes); SET_CONFIG is refused; the connection goes on."""
    async with daemon_process(os.path.join(workdir, "rng.sock")) as daemon:
        with trio.fail_after(STEP_TIMEOUT):
            async with await Frontend.connect(daemon.socket_paths[0]) as vmm:
                await vmm.handshake()
                assert await vmm.get_config(0, 8) == b""
                with pytest.raises(BackendError, match="SET_CONFIG refused"):
                    await vmm.set_config(0, bytes(4), need_reply=True)
                assert await vmm.get_config(0, 256) == b""
                assert await vmm.get_features() == vmm.device_features


class ExtraRegion:
    """A region outside the harness's guest memory: its own memfd, mapped here too."""

    NAME = "rngd-test-extra"

    def __init__(self, gpa: int, size: int = 1 << 16) -> None:
        self.fd = os.memfd_create(self.NAME, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)
        self.map[:] = b"\xaa" * size
        self.spec = MemoryRegion(gpa, size, UVA_BASE + 0x80_0000_0000 + gpa, 0)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


async def test_regions_added_and_removed_while_the_ring_runs(
    workdir: str, source: tuple[str, bytes]
) -> None:
    """QEMU 7.2's memory as ADD_MEM_REG; then a region added and removed 20 times while a
    guest keeps four requests in flight. Each change stops the ring between requests, so every
    request completes whole and in order, and after each REM_MEM_REG's answer the region is
    no longer mapped in the daemon (nothing uses it any more). A buffer in the added region
    is filled; once removed, one there is completed empty and its memory left alone. Every
    fd the daemon received is closed: its fd count ends where it was."""
    expected = source[1]
    async with daemon_process(os.path.join(workdir, "rng.sock"), filename=source[0]) as daemon:
        extra = ExtraRegion(0x2_0000_0000)
        try:
            with trio.fail_after(3 * STEP_TIMEOUT):
                async with await Frontend.connect(daemon.socket_paths[0]) as vmm:
                    await vmm.handshake()
                    assert vmm.max_mem_slots == MAX_MEM_SLOTS
                    queue = await vmm.start(vmm.prepare_driver(8))
                    sent = [r for r, _ in vmm.transcript]
                    assert sent.count(Request.ADD_MEM_REG) == 2
                    assert Request.SET_MEM_TABLE not in sent
                    got = bytearray(await vmm.read_random(64))
                    await vmm.settle()
                    # The ring runs: its fds are all there, as they will be at the end.
                    fds_running = daemon.fd_count()

                    async def guest() -> None:
                        got.extend(await vmm.read_random(64 * 400, in_flight=4))

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(guest)
                        for _ in range(20):
                            await vmm.add_mem_reg(extra.spec, extra.fd, need_reply=True)
                            assert mapped(daemon, ExtraRegion.NAME)
                            await vmm.rem_mem_reg(extra.spec, extra.fd, need_reply=True)
                            assert not mapped(daemon, ExtraRegion.NAME)
                    assert len(got) == 64 * 401
                    assert bytes(got) == expected[: len(got)]

                    # A request served in the region leaves the ring holding a view of it
                    # (translations are cached): the removal must still unmap it.
                    for cycle in range(3):
                        await vmm.add_mem_reg(extra.spec, extra.fd, need_reply=True)
                        where = 64 * (cycle + 1)
                        queue.raw_post_buffer(7, extra.spec.guest_phys_addr + where, 64)
                        queue.kick(force=True)
                        (used,) = await queue.wait_used()
                        assert used.len == 64
                        filled = extra.map[where : where + 64]
                        assert filled == expected[len(got) : len(got) + 64]
                        got += filled
                        await vmm.rem_mem_reg(extra.spec, extra.fd, need_reply=True)
                        assert not mapped(daemon, ExtraRegion.NAME)

                    queue.raw_post_buffer(7, extra.spec.guest_phys_addr + 256, 64)
                    queue.kick(force=True)
                    (used,) = await queue.wait_used()
                    assert used.len == 0
                    assert extra.map[256:320] == b"\xaa" * 64
                    assert await vmm.read_random(640) == expected[len(got) : len(got) + 640]

                    # Refused, the fd (if any) closed: a region overlapping a mapped one, an
                    # fd that cannot be mapped, no fd at all.
                    overlap = MemoryRegion(0x8000, 4096, UVA_BASE + 0x90_0000_0000, 0)
                    with pytest.raises(BackendError, match="ADD_MEM_REG refused"):
                        await vmm.add_mem_reg(overlap, extra.fd, need_reply=True)
                    not_memory = os.eventfd(0, os.EFD_CLOEXEC)
                    try:
                        with pytest.raises(BackendError, match="ADD_MEM_REG refused"):
                            await vmm.add_mem_reg(extra.spec, not_memory, need_reply=True)
                    finally:
                        os.close(not_memory)
                    payload = encode_memory_region(extra.spec)
                    reply = await vmm.request(Request.ADD_MEM_REG, payload, need_reply=True)
                    assert reply is not None and not reply.ok
                    assert not mapped(daemon, ExtraRegion.NAME)
                    assert len(await vmm.read_random(64)) == 64
                    assert daemon.fd_count() == fds_running
                    assert "overlap" in daemon.log()
        finally:
            extra.close()


async def test_a_region_the_ring_lives_in_can_go_and_come_back(
    workdir: str, source: tuple[str, bytes]
) -> None:
    """REM_MEM_REG of the region holding the ring succeeds (the memory change stands; the ring
    waits, stopped); ADD_MEM_REG of it again starts the ring where it stood."""
    async with daemon_process(os.path.join(workdir, "rng.sock"), filename=source[0]) as daemon:
        with trio.fail_after(STEP_TIMEOUT):
            async with await Frontend.connect(daemon.socket_paths[0]) as vmm:
                await vmm.handshake()
                queue = await vmm.start(vmm.prepare_driver(8))
                got = await vmm.read_random(320)
                ring = next(r for r in queue.memory.regions if r.contains(queue.desc_table, 1))
                await vmm.rem_mem_reg(ring.spec, ring.fd, need_reply=True)
                await vmm.add_mem_reg(ring.spec, ring.fd, need_reply=True)
                got += await vmm.read_random(320)
                assert got == source[1][: len(got)]
        assert "vring 0 not started" in daemon.log()


def _documented_requests() -> dict[str, str]:
    """Request name -> what docs/protocol.md's request table says rngd does with it."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    table = doc.split("| code | request | what rngd does |", 1)[1].split("\n\n", 1)[0]
    rows: dict[str, str] = {}
    for line in table.splitlines()[2:]:
        _code, names, what = (cell.strip() for cell in line.strip().strip("|").split("|"))
        for name in names.split(", "):
            rows[name.strip()] = what
    return rows


def test_docs_list_every_request_and_refuse_what_they_say() -> None:
    rows = _documented_requests()
    assert set(rows) == {r.name for r in Request}
    session = session_with(int(Session().protocol_features))
    for request in Request:
        handler = getattr(session, f"_on_{request.name.lower()}", None)
        if rows[request.name].startswith("refused"):
            with pytest.raises(MessageError):
                session.handle(msg(request))
        else:
            assert handler is not None, request.name


async def test_a_request_waiting_in_a_removed_region_is_never_written(
    workdir: str, source: tuple[str, bytes]
) -> None:
    """A request whose buffer lies in a region waits for budget (64 bytes per 65 s, spent by
    the request before it) when the region is removed: the ring stops with it unserved, the
    region is unmapped, and on restart the request is completed empty; its bytes in the
    VMM's memfd are never touched."""
    async with daemon_process(
        os.path.join(workdir, "rng.sock"), filename=source[0], max_bytes=64, period_ms=65536
    ) as daemon:
        extra = ExtraRegion(0x2_0000_0000)
        try:
            with trio.fail_after(STEP_TIMEOUT):
                async with await Frontend.connect(daemon.socket_paths[0]) as vmm:
                    await vmm.handshake()
                    queue = await vmm.start(vmm.prepare_driver(8))
                    await vmm.add_mem_reg(extra.spec, extra.fd, need_reply=True)
                    assert await vmm.read_random(64) == source[1][:64]  # the period's budget
                    queue.raw_post_buffer(7, extra.spec.guest_phys_addr, 64)
                    queue.kick(force=True)
                    await vmm.rem_mem_reg(extra.spec, extra.fd, need_reply=True)
                    assert not mapped(daemon, ExtraRegion.NAME)
                    (used,) = await queue.wait_used()
                    assert (used.id, used.len) == (7, 0)
                    assert extra.map[:64] == b"\xaa" * 64
        finally:
            extra.close()
