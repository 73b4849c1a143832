"""A hostile (or broken) VMM: malformed vhost-user messages over a real socket, with real fds.

Each case has a documented decision: answered with a failure ack (when the VMM asked for one
with NEED_REPLY and REPLY_ACK was negotiated; otherwise refused silently and logged), or the
connection closed (the byte stream can no longer be framed, or the VMM waits for a reply we
cannot give). After every case the daemon serves the same connection (for a refusal), the
next connection on the same socket, and a guest on another socket; every fd the VMM sent is
closed (this process's fd count returns to its baseline: the daemon runs in-process).
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import trio

from rngd.protocol.codec import encode_message, encode_u64
from rngd.protocol.constants import HeaderFlags, Request
from rngd.protocol.payloads import MemoryRegion, VringAddr, VringState, encode_memory_table
from rngd.testing import (
    PAGE_SIZE,
    BackendDisconnected,
    Frontend,
    new_eventfd,
    open_fd_count,
)

STEP = 5.0
NEED = HeaderFlags.NEED_REPLY


# -- fds the hostile VMM sends -------------------------------------------------------------


def memfd(size: int) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def pipe_read_end() -> int:
    r, w = os.pipe2(os.O_CLOEXEC)
    os.close(w)
    return r


def readonly_file(path: str, size: int) -> int:
    """A file opened read-only: big enough, but a shared writable mapping is refused."""
    with open(path, "wb") as f:
        f.truncate(size)
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def region(gpa: int = 0, size: int = PAGE_SIZE, offset: int = 0) -> MemoryRegion:
    return MemoryRegion(gpa, size, 0x7F00_0000_0000 + gpa, offset)


def mem_table(regions: list[MemoryRegion], fds: list[int]) -> tuple[bytes, list[int]]:
    return encode_message(Request.SET_MEM_TABLE, encode_memory_table(regions), NEED), fds


def vring_state(request: Request, index: int, num: int, flags: int = NEED) -> bytes:
    return encode_message(request, VringState(index, num).encode(), flags)


# -- the cases -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    #: The message bytes and the fds to send with them (the test closes its copies).
    build: Callable[[str], tuple[bytes, list[int]]]
    #: "nack": a failure ack and the connection goes on; "eof": the daemon hangs up.
    decision: str
    #: Text expected in the one incident line ("" for none).
    log: str


def _u64_msg(request: Request, value: int, flags: int = NEED) -> bytes:
    return encode_message(request, encode_u64(value), flags)


CASES = [
    # -- framing: the stream cannot be trusted any more -> hang up
    Case(
        "size_above_4096",
        lambda d: (struct.pack("<III", Request.SET_OWNER, 1, 4097) + bytes(100), []),
        "eof",
        "exceeds 4096",
    ),
    Case(
        "size_u32_max",
        lambda d: (struct.pack("<III", Request.SET_MEM_TABLE, 1, 0xFFFF_FFFF), [memfd(4096)]),
        "eof",
        "exceeds 4096",
    ),
    Case(
        "bad_version",
        lambda d: (struct.pack("<III", Request.SET_OWNER, 2, 0), []),
        "eof",
        "unsupported protocol version",
    ),
    Case(
        "more_fds_than_any_request",
        lambda d: (_u64_msg(Request.SET_FEATURES, 0), [new_eventfd() for _ in range(20)]),
        "eof",
        "more fds than any request allows",
    ),
    # -- requests the VMM blocks on: malformed means hang up rather than leave it hanging
    Case(
        "get_vring_base_index_out_of_range",
        lambda d: (vring_state(Request.GET_VRING_BASE, 1, 0, 0), []),
        "eof",
        "vring index 1 out of range",
    ),
    Case(
        "get_features_with_payload",
        lambda d: (_u64_msg(Request.GET_FEATURES, 5, 0), []),
        "eof",
        "unexpected payload",
    ),
    Case(
        "get_features_reserved_flag",
        lambda d: (encode_message(Request.GET_FEATURES, b"", 0x20), []),
        "eof",
        "reserved header flags",
    ),
    # -- fds missing or extra
    Case(
        "mem_table_fd_missing",
        lambda d: mem_table([region(0), region(0x10_0000)], [memfd(4096)]),
        "nack",
        "needs 2 fds, got 1",
    ),
    Case(
        "mem_table_extra_fd",
        lambda d: mem_table([region(0)], [memfd(4096), memfd(4096)]),
        "nack",
        "needs 1 fds, got 2",
    ),
    Case(
        "kick_fd_missing",
        lambda d: (_u64_msg(Request.SET_VRING_KICK, 0), []),
        "nack",
        "needs exactly one fd, got 0",
    ),
    Case(
        "kick_nofd_bit_but_fd_sent",
        lambda d: (_u64_msg(Request.SET_VRING_CALL, 0x100), [new_eventfd()]),
        "nack",
        "'no fd' bit set but an fd was sent",
    ),
    Case(
        "call_two_fds",
        lambda d: (_u64_msg(Request.SET_VRING_CALL, 0), [new_eventfd(), new_eventfd()]),
        "nack",
        "needs exactly one fd, got 2",
    ),
    Case(
        # Accepted (the payload is fine) and the stray fds closed: one incident line.
        "set_owner_with_stray_fds",
        lambda d: (encode_message(Request.SET_OWNER, b"", NEED), [new_eventfd(), memfd(1)]),
        "ok",
        "closing 2 unexpected fds",
    ),
    # -- memory tables
    Case(
        "nine_regions",
        lambda d: (
            encode_message(
                Request.SET_MEM_TABLE,
                struct.pack("<II", 9, 0)
                + b"".join(region(i * 0x10_0000).encode() for i in range(9)),
                NEED,
            ),
            [memfd(4096) for _ in range(9)],
        ),
        "nack",
        "9 regions",
    ),
    Case(
        "zero_regions",
        lambda d: (encode_message(Request.SET_MEM_TABLE, struct.pack("<II", 0, 0), NEED), []),
        "nack",
        "0 regions",
    ),
    Case(
        "overlapping_gpa",
        lambda d: mem_table(
            [region(0, 2 * PAGE_SIZE), MemoryRegion(PAGE_SIZE, PAGE_SIZE, 0x7F10_0000_0000, 0)],
            [memfd(2 * PAGE_SIZE), memfd(PAGE_SIZE)],
        ),
        "nack",
        "overlap at guest_phys_addr",
    ),
    Case(
        "overlapping_uva",
        lambda d: mem_table(
            [
                region(0, 2 * PAGE_SIZE),
                MemoryRegion(0x10_0000, PAGE_SIZE, 0x7F00_0000_0000 + PAGE_SIZE, 0),
            ],
            [memfd(2 * PAGE_SIZE), memfd(PAGE_SIZE)],
        ),
        "nack",
        "overlap at userspace_addr",
    ),
    Case(
        "zero_size_region",
        lambda d: mem_table([region(0, 0)], [memfd(PAGE_SIZE)]),
        "nack",
        "size 0",
    ),
    Case(
        "region_wraps_address_space",
        lambda d: mem_table(
            [MemoryRegion((1 << 64) - PAGE_SIZE, 2 * PAGE_SIZE, 0x7F00_0000_0000, 0)],
            [memfd(2 * PAGE_SIZE)],
        ),
        "nack",
        "wraps the address space",
    ),
    Case(
        "mmap_offset_past_fd_size",
        lambda d: mem_table([region(0, PAGE_SIZE, 4 * PAGE_SIZE)], [memfd(2 * PAGE_SIZE)]),
        "nack",
        "but the fd has",
    ),
    Case(
        # Mapping it would succeed, and touching its second page would SIGBUS the daemon.
        "region_larger_than_fd",
        lambda d: mem_table([region(0, 16 * PAGE_SIZE)], [memfd(PAGE_SIZE)]),
        "nack",
        "but the fd has",
    ),
    Case(
        "eventfd_as_memory",
        lambda d: mem_table([region(0)], [new_eventfd()]),
        "nack",
        "memory table not mapped",
    ),
    Case(
        "pipe_as_memory",
        lambda d: mem_table([region(0)], [pipe_read_end()]),
        "nack",
        "memory table not mapped",
    ),
    Case(
        "read_only_file_as_memory",
        lambda d: mem_table([region(0)], [readonly_file(os.path.join(d, "ro"), PAGE_SIZE)]),
        "nack",
        "cannot map memory region",
    ),
    Case(
        "mem_table_truncated_payload",
        lambda d: (
            encode_message(Request.SET_MEM_TABLE, struct.pack("<II", 2, 0) + bytes(40), NEED),
            [memfd(PAGE_SIZE), memfd(PAGE_SIZE)],
        ),
        "nack",
        "for 2 regions",
    ),
    # -- vrings
    Case("vring_num_0", lambda d: (vring_state(Request.SET_VRING_NUM, 0, 0), []), "nack", "0"),
    Case(
        "vring_num_not_power_of_two",
        lambda d: (vring_state(Request.SET_VRING_NUM, 0, 12), []),
        "nack",
        "power of two",
    ),
    Case(
        "vring_num_above_max",
        lambda d: (vring_state(Request.SET_VRING_NUM, 0, 65536), []),
        "nack",
        "power of two",
    ),
    Case(
        "vring_num_index_out_of_range",
        lambda d: (vring_state(Request.SET_VRING_NUM, 1, 4), []),
        "nack",
        "vring index 1 out of range",
    ),
    Case(
        "vring_base_not_16_bit",
        lambda d: (vring_state(Request.SET_VRING_BASE, 0, 0x10000), []),
        "nack",
        "not a 16-bit ring index",
    ),
    Case(
        "vring_enable_2",
        lambda d: (vring_state(Request.SET_VRING_ENABLE, 0, 2), []),
        "nack",
        "must be 0 or 1",
    ),
    Case(
        "kick_index_out_of_range_with_fd",
        lambda d: (_u64_msg(Request.SET_VRING_KICK, 7), [new_eventfd()]),
        "nack",
        "vring index 7 out of range",
    ),
    Case(
        "vring_fd_reserved_bits",
        lambda d: (_u64_msg(Request.SET_VRING_CALL, 0x1000), [new_eventfd()]),
        "nack",
        "reserved bits",
    ),
    Case(
        "vring_addr_unknown_flags",
        lambda d: (
            encode_message(Request.SET_VRING_ADDR, VringAddr(0, 2, 0, 0, 0, 0).encode(), NEED),
            [],
        ),
        "nack",
        "unknown flags",
    ),
    Case(
        "vring_addr_short_payload",
        lambda d: (encode_message(Request.SET_VRING_ADDR, bytes(24), NEED), []),
        "nack",
        "expected 40",
    ),
    # -- header flags and request codes
    Case(
        "reserved_header_flag",
        lambda d: (encode_message(Request.SET_OWNER, b"", NEED | 0x100), []),
        "nack",
        "reserved header flags",
    ),
    Case(
        "reply_flag_in_a_request",
        lambda d: (encode_message(Request.SET_OWNER, b"", NEED | HeaderFlags.REPLY), []),
        "nack",
        "reserved header flags",
    ),
    Case(
        "unknown_request",
        lambda d: (encode_message(200, b"xyz", NEED), [new_eventfd()]),
        "nack",
        "unknown request code 200",
    ),
    Case(
        "unsupported_request",
        lambda d: (encode_message(Request.SET_LOG_FD, b"", NEED), [new_eventfd()]),
        "nack",
        "not supported",
    ),
    Case(
        "features_never_offered",
        lambda d: (_u64_msg(Request.SET_FEATURES, 1 << 40), []),
        "nack",
        "acks bits we never offered",
    ),
    Case(
        "polling_mode_kick",
        lambda d: (_u64_msg(Request.SET_VRING_KICK, 0x100), []),
        "nack",
        "polling mode",
    ),
]


def incident_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "rngd.connection" and r.levelno >= logging.WARNING
    ]


async def hung_up(vmm: Frontend) -> None:
    """The daemon closed the connection without answering: EOF, or a reset when it closed
    with our unread bytes still in its receive buffer."""
    with contextlib.suppress(ConnectionResetError):
        await vmm.expect_eof()


async def serves(path: str) -> None:
    """A whole QEMU 7.2 start on `path` and 64 random bytes."""
    async with await Frontend.connect(path) as vmm:
        await vmm.start_qemu72(4)
        assert len(await vmm.read_random(64)) == 64


async def settled_fd_count(path: str) -> int:
    """This process's fd count once the daemon has released the previous connection on
    `path` (it serves one VMM per socket at a time: a reply to the next proves it)."""
    async with await Frontend.connect(path) as probe:
        await probe.get_features()
        return open_fd_count()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_malformed_message(
    case: Case,
    socks: list[str],
    workdir: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(STEP):
        baseline = await settled_fd_count(socks[0])
        async with await Frontend.connect(socks[0]) as vmm:
            await vmm.handshake()
            assert vmm.reply_ack
            await vmm.set_features(vmm.device_features, need_reply=True)
            caplog.clear()
            data, fds = case.build(workdir)
            try:
                await vmm.send_raw(data, fds)
            finally:
                for fd in fds:
                    os.close(fd)
            if case.decision == "eof":
                await hung_up(vmm)
                with pytest.raises(BackendDisconnected):
                    await vmm.get_features()
            else:
                request = struct.unpack_from("<I", data)[0]
                reply = await vmm.recv_reply(request)
                assert reply.ok == (case.decision == "ok"), reply
                # The same connection goes on: a whole driver start and a read.
                await vmm.start(queue_size=4)
                assert len(await vmm.read_random(64)) == 64
        lines = incident_lines(caplog)
        assert sum(case.log in line for line in lines) == 1, lines
        # Every fd sent was closed (ours right after sending, the daemon's copies by now).
        assert await settled_fd_count(socks[0]) == baseline
        await serves(socks[0])
        await serves(socks[1])


async def test_refused_without_need_reply_gets_no_answer(socks: list[str]) -> None:
    """Without NEED_REPLY a refused request is answered by nothing at all (the VMM reads no
    stray reply later): the next reply on the wire is the next request's."""
    with trio.fail_after(STEP):
        async with await Frontend.connect(socks[0]) as vmm:
            await vmm.handshake()
            await vmm.send_raw(vring_state(Request.SET_VRING_NUM, 0, 3, flags=0))
            assert await vmm.get_features()
            await vmm.start(queue_size=4)
            assert len(await vmm.read_random(64)) == 64


# -- truncated messages and hang-ups --------------------------------------------------------


@pytest.mark.parametrize(
    "cut",
    ["header_5_bytes", "header_then_half_payload", "header_only_with_fds", "fds_only_1_byte"],
)
async def test_truncated_message_then_hang_up(
    cut: str, socks: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Decision: a hang-up mid-message ends the connection (logged once); fds that came with
    the partial message are closed; the socket takes the next VMM."""
    with trio.fail_after(STEP):
        baseline = await settled_fd_count(socks[0])
        regions = [region(0), region(0x10_0000)]
        whole = encode_message(Request.SET_MEM_TABLE, encode_memory_table(regions), NEED)
        part, nfds = {
            "header_5_bytes": (whole[:5], 0),
            "header_then_half_payload": (whole[: 12 + 30], 2),
            "header_only_with_fds": (whole[:12], 2),
            "fds_only_1_byte": (whole[:1], 2),
        }[cut]
        fds = [memfd(PAGE_SIZE) for _ in range(nfds)]
        vmm = await Frontend.connect(socks[0])
        try:
            await vmm.handshake()
            caplog.clear()
            await vmm.send_raw(part, fds)
        finally:
            for fd in fds:
                os.close(fd)
            await vmm.aclose()
        assert await settled_fd_count(socks[0]) == baseline
        lines = incident_lines(caplog)
        assert sum("hung up in the middle of a message" in line for line in lines) == 1, lines
        await serves(socks[0])
        await serves(socks[1])


# -- order -------------------------------------------------------------------------------


async def test_requests_out_of_order_are_accepted_and_the_ring_starts_when_complete(
    socks: list[str], source: tuple[str, bytes]
) -> None:
    """Decision: configuration requests may come in any order (each is recorded; the ring is
    translated and started once memory, size, addresses, kick and enable are all there), so
    SET_VRING_ADDR / KICK / NUM before any memory table are accepted, and the ring runs as
    soon as the memory table arrives."""
    with trio.fail_after(STEP):
        async with await Frontend.connect(socks[0]) as vmm:
            # No GET_FEATURES / SET_OWNER first either.
            await vmm.set_protocol_features(0x8)  # REPLY_ACK
            q = vmm.prepare_driver(4)
            kick, call = new_eventfd(), new_eventfd()
            vmm.kick_fd, vmm.call_fd, vmm.memory, vmm.queue = kick, call, q.memory, q
            q.kick_fd, q.call_fd = kick, call
            q.enable_calls(True)
            q.post(64)
            os.write(kick, (1).to_bytes(8, "little"))
            await vmm.set_vring_addr(q.vring_addr(), need_reply=True)
            await vmm.set_vring_kick(0, kick, need_reply=True)
            await vmm.set_vring_call(0, call, need_reply=True)
            await vmm.set_vring_num(0, 4, need_reply=True)
            await vmm.get_features()
            await vmm.set_features(vmm.device_features, need_reply=True)
            await vmm.set_vring_enable(0, True, need_reply=True)
            await vmm.set_mem_table(q.memory, need_reply=True)
            (used,) = await q.wait_used()
            assert used.data == source[1][:64]


async def test_enable_before_protocol_features_refused(socks: list[str]) -> None:
    """SET_VRING_ENABLE is meaningless until PROTOCOL_FEATURES is acked: refused (failure
    ack), the connection goes on."""
    with trio.fail_after(STEP):
        async with await Frontend.connect(socks[0]) as vmm:
            await vmm.set_protocol_features(0x8)
            reply = await vmm.request(
                Request.SET_VRING_ENABLE, VringState(0, 1).encode(), need_reply=True
            )
            assert reply is not None and not reply.ok
            await vmm.handshake()
            await vmm.start(queue_size=4)
            assert len(await vmm.read_random(64)) == 64


async def test_get_vring_base_before_anything_answers_zero(socks: list[str]) -> None:
    with trio.fail_after(STEP):
        async with await Frontend.connect(socks[0]) as vmm:
            assert await vmm.get_vring_base(0) == 0
            await vmm.handshake()
            await vmm.start(queue_size=4)
            assert len(await vmm.read_random(64)) == 64


async def test_mem_table_replaced_while_running_with_a_bad_one_keeps_the_old(
    socks: list[str], source: tuple[str, bytes]
) -> None:
    """A bad SET_MEM_TABLE on a running ring is refused before anything is unmapped: the
    ring goes on with the memory it had."""
    with trio.fail_after(STEP):
        async with await Frontend.connect(socks[0]) as vmm:
            queue = await vmm.start_qemu72(4)
            assert await queue.read_random(64) == source[1][:64]
            data, fds = mem_table([region(0, 16 * PAGE_SIZE)], [memfd(PAGE_SIZE)])
            try:
                await vmm.send_raw(data, fds)
            finally:
                os.close(fds[0])
            reply = await vmm.recv_reply(Request.SET_MEM_TABLE)
            assert not reply.ok
            assert await queue.read_random(64) == source[1][64:128]


async def test_message_incidents_rate_limited(
    socks: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """500 refused requests: 10 lines (the burst), each answered; the VMM still served."""
    with trio.fail_after(STEP):
        async with await Frontend.connect(socks[0]) as vmm:
            await vmm.handshake()
            caplog.clear()
            for _ in range(500):
                reply = await vmm.request(
                    Request.SET_VRING_NUM, VringState(0, 3).encode(), need_reply=True
                )
                assert reply is not None and not reply.ok
            assert len(incident_lines(caplog)) == 10
            await vmm.start(queue_size=4)
            assert len(await vmm.read_random(64)) == 64


async def test_repeated_memory_tables_log_a_bounded_handful(
    socks: list[str], source: tuple[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """1,000 valid SET_MEM_TABLE on a running ring (each a new mapping and a ring restart):
    at INFO level a handful of lines for the whole connection, not two per message. The ring
    serves on the last table."""
    caplog.set_level(logging.INFO, logger="rngd")
    with trio.fail_after(60):
        async with await Frontend.connect(socks[0]) as vmm:
            queue = await vmm.start_qemu72(4)
            for _ in range(1000):
                await vmm.set_mem_table(queue.memory, need_reply=True)
            assert await queue.read_random(64) == source[1][:64]
        # The daemon has let the connection go once it answers the next one on the socket.
        await settled_fd_count(socks[0])
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("rngd")]
    assert len(lines) <= 8, lines
