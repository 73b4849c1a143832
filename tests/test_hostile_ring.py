"""A hostile guest: malformed rings through `rngd.testing`, against an in-process daemon.

Every case checks the documented decision (see `EMPTY_CASES` and the RingError tests), that no
byte of guest memory changed except the used ring (a refused request writes nothing, not even
into its own buffers), that the ring goes on serving where the decision says so, that another
guest on another socket is never disturbed, and that each incident is one log line.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import trio

from rngd.incidents import IncidentLog
from rngd.protocol.codec import encode_message
from rngd.protocol.constants import HeaderFlags, Request
from rngd.protocol.payloads import VringAddr, VringState
from rngd.testing import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DriverQueue,
    Frontend,
    GuestMemory,
)

STEP = 5.0
QUEUE_SIZE = 16
#: Written over all of guest memory before the rings are laid out, so that any stray write
#: shows (compared against a snapshot, so even a write of the same value is caught there).
CANARY = b"\x5a\xc3\x3c\xa5"
#: Where hostile descriptors go: far from the low indices the harness's own posts use.
H = QUEUE_SIZE - 1


# -- guest memory checks -------------------------------------------------------------------


def canary_fill(queue: DriverQueue) -> None:
    """`prepare` hook: canary over every byte of every region, then the rings zeroed again."""
    memory = queue.memory
    for region in memory.regions:
        size = region.spec.memory_size
        memory.write(region.spec.guest_phys_addr, (CANARY * (size // len(CANARY) + 1))[:size])
    memory.fill(queue.desc_table, 16 * queue.size)
    memory.fill(queue.avail_ring, 6 + 2 * queue.size)
    memory.fill(queue.used_ring, 6 + 8 * queue.size)


def snapshot(memory: GuestMemory) -> list[bytes]:
    """Every byte of every memfd, including those before a region's mmap_offset."""
    return [
        memory.raw_file_bytes(i, 0, r.spec.mmap_offset + r.spec.memory_size)
        for i, r in enumerate(memory.regions)
    ]


def assert_only_changed(
    memory: GuestMemory, before: list[bytes], allowed: list[tuple[int, int]]
) -> None:
    """Nothing changed since `before` outside the `allowed` (gpa, length) spans."""
    after = snapshot(memory)
    for region, old, new in zip(memory.regions, before, after, strict=True):
        expected = bytearray(old)
        base, off = region.spec.guest_phys_addr, region.spec.mmap_offset
        for gpa, length in allowed:
            if base <= gpa < base + region.spec.memory_size:
                start = off + gpa - base
                expected[start : start + length] = new[start : start + length]
        if expected != new:
            first = next(i for i in range(len(new)) if new[i] != expected[i])
            raise AssertionError(
                f"guest memory changed outside the allowed spans: memfd offset {first:#x} of "
                f"the region at gpa {base:#x}"
            )


def used_ring_span(queue: DriverQueue) -> list[tuple[int, int]]:
    """What the device writes (the used ring, avail_event included), plus the one field the
    harness's guest writes while collecting completions (used_event, in the avail ring)."""
    return [(queue.used_ring, 6 + 8 * queue.size), (queue.used_event_addr, 2)]


def incident_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "rngd.connection" and r.levelno == logging.WARNING and text in r.getMessage()
    ]


# -- a guest that keeps track of the source bytes it has been given -------------------------


@dataclass
class Guest:
    vmm: Frontend
    queue: DriverQueue
    data: bytes
    #: Source bytes this guest has been served so far (the daemon has one source for all
    #: sockets, so only a lone guest can predict its bytes; see `read_more`).
    offset: int = 0

    async def read_more(self, nbytes: int = 128, *, exact: bool = True) -> None:
        got = await self.queue.read_random(nbytes)
        assert len(got) == nbytes
        if exact:
            assert got == self.data[self.offset : self.offset + nbytes]
        self.offset += nbytes


async def start_guest(path: str, data: bytes) -> Guest:
    vmm = await Frontend.connect(path)
    queue = await vmm.start_qemu72(QUEUE_SIZE, prepare=canary_fill)
    return Guest(vmm, queue, data)


# -- requests refused and completed with length 0 ------------------------------------------


Desc = tuple[int, int, int, int]


@dataclass(frozen=True)
class EmptyCase:
    """A request that is refused and completed with length 0 (ChainError); the ring goes on."""

    id: str
    #: Lays out whatever the hostile chain needs (other descriptors, indirect tables) and
    #: returns the head descriptor `H`'s (addr, len, flags, next); the test publishes it.
    build: Callable[[DriverQueue], Desc]
    #: Text of the incident line.
    log: str


def _desc(q: DriverQueue, index: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
    q.raw_write_desc(index, addr, length, flags, nxt)


def _buf(q: DriverQueue, size: int = 64) -> int:
    """A valid, canary-filled buffer in guest memory (leaked: the test's memory is fresh)."""
    gpa = q.memory.alloc(size, 16)
    q.memory.write(gpa, (CANARY * size)[:size])
    return gpa


def _table(q: DriverQueue, entries: list[Desc]) -> int:
    gpa = q.memory.alloc(16 * max(len(entries), 1), 16)
    for i, e in enumerate(entries):
        q.memory.write(gpa + 16 * i, struct.pack("<QIHH", *e))
    return gpa


def _region_end(q: DriverQueue, index: int) -> int:
    spec = q.memory.regions[index].spec
    return spec.guest_phys_addr + spec.memory_size


def _loop(q: DriverQueue) -> Desc:
    _desc(q, H - 1, _buf(q), 64, DESC_F_WRITE | DESC_F_NEXT, H)
    return _buf(q), 64, DESC_F_WRITE | DESC_F_NEXT, H - 1


def _longer_than_queue(q: DriverQueue) -> Desc:
    # Every descriptor of the table chained in turn, then on round again: more than
    # QUEUE_SIZE descriptors (which a direct chain can only reach by revisiting one).
    for i in range(QUEUE_SIZE - 1):
        _desc(q, i, _buf(q, 16), 16, DESC_F_WRITE | DESC_F_NEXT, i + 1)
    return _buf(q, 16), 16, DESC_F_WRITE | DESC_F_NEXT, 0


def _readable_after_writable(q: DriverQueue) -> Desc:
    # The whole request is refused: its valid writable buffer is not filled either.
    _desc(q, H - 1, _buf(q), 64, 0)
    return _buf(q), 64, DESC_F_WRITE | DESC_F_NEXT, H - 1


def _one_entry_table(q: DriverQueue) -> int:
    return _table(q, [(_buf(q), 64, DESC_F_WRITE, 0)])


EMPTY_CASES = [
    EmptyCase(
        "addr_outside_memory",
        lambda q: (0x8000_0000, 64, DESC_F_WRITE, 0),
        "not inside one memory region",
    ),
    EmptyCase(
        "addr_past_region_end",
        lambda q: (_region_end(q, 0) - 32, 64, DESC_F_WRITE, 0),
        "not inside one memory region",
    ),
    EmptyCase(
        # The rust original's 4 MiB overwrite: a valid address with length 0xFFFFFFFF.
        "len_0xffffffff",
        lambda q: (_buf(q), 0xFFFF_FFFF, DESC_F_WRITE, 0),
        "not inside one memory region",
    ),
    EmptyCase(
        "addr_plus_len_wraps",
        lambda q: ((1 << 64) - 16, 64, DESC_F_WRITE, 0),
        "not inside one memory region",
    ),
    EmptyCase("len_0", lambda q: (_buf(q), 0, DESC_F_WRITE, 0), "length 0"),
    EmptyCase("loop", _loop, "loops"),
    EmptyCase("self_loop", lambda q: (_buf(q), 64, DESC_F_WRITE | DESC_F_NEXT, H), "loops"),
    EmptyCase("chain_longer_than_queue", _longer_than_queue, "longer than the queue"),
    EmptyCase(
        "next_out_of_range",
        lambda q: (_buf(q), 64, DESC_F_WRITE | DESC_F_NEXT, QUEUE_SIZE),
        "next index",
    ),
    EmptyCase("device_readable", lambda q: (_buf(q), 64, 0, 0), "device-readable"),
    EmptyCase("readable_after_writable", _readable_after_writable, "device-readable"),
    EmptyCase(
        "indirect_with_next",
        lambda q: (_one_entry_table(q), 16, DESC_F_INDIRECT | DESC_F_NEXT, H - 1),
        "both INDIRECT and NEXT",
    ),
    EmptyCase(
        "nested_indirect",
        lambda q: (_table(q, [(_one_entry_table(q), 16, DESC_F_INDIRECT, 0)]), 16, 4, 0),
        "indirect descriptor inside an indirect table",
    ),
    EmptyCase(
        "indirect_table_len_0",
        lambda q: (_one_entry_table(q), 0, DESC_F_INDIRECT, 0),
        "indirect table of 0 bytes",
    ),
    EmptyCase(
        "indirect_table_len_not_multiple_of_16",
        lambda q: (_one_entry_table(q), 24, DESC_F_INDIRECT, 0),
        "indirect table of 24 bytes",
    ),
    EmptyCase(
        "indirect_table_larger_than_queue",
        lambda q: (
            _table(q, [(_buf(q, 16), 16, DESC_F_WRITE, 0)] * (QUEUE_SIZE + 1)),
            16 * (QUEUE_SIZE + 1),
            DESC_F_INDIRECT,
            0,
        ),
        f"indirect table of {16 * (QUEUE_SIZE + 1)} bytes",
    ),
    EmptyCase(
        "indirect_table_outside_memory",
        lambda q: (_region_end(q, 1) - 16, 32, DESC_F_INDIRECT, 0),
        "indirect table:",
    ),
    EmptyCase(
        "indirect_loop",
        lambda q: (
            _table(
                q,
                [
                    (_buf(q), 64, DESC_F_WRITE | DESC_F_NEXT, 1),
                    (_buf(q), 64, DESC_F_WRITE | DESC_F_NEXT, 0),
                ],
            ),
            32,
            DESC_F_INDIRECT,
            0,
        ),
        "loops",
    ),
    EmptyCase(
        "indirect_next_out_of_table",
        lambda q: (
            _table(q, [(_buf(q), 64, DESC_F_WRITE | DESC_F_NEXT, 1)]),
            16,
            DESC_F_INDIRECT,
            0,
        ),
        "outside a table of 1",
    ),
    EmptyCase(
        "indirect_entry_outside_memory",
        lambda q: (_table(q, [(0x8000_0000, 64, DESC_F_WRITE, 0)]), 16, DESC_F_INDIRECT, 0),
        "not inside one memory region",
    ),
]


@pytest.mark.parametrize("case", EMPTY_CASES, ids=[c.id for c in EMPTY_CASES])
async def test_malformed_chain_completed_empty(
    case: EmptyCase,
    socks: list[str],
    source: tuple[str, bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Decision: complete the request with length 0, log one line, serve the next ones."""
    caplog.set_level(logging.INFO)
    with trio.fail_after(STEP):
        guest = await start_guest(socks[0], source[1])
        other = await Frontend.connect(socks[1])
        try:
            await other.start_qemu72(4)
            await guest.read_more(64)
            queue = guest.queue
            # Published like a real request, between two valid ones. The device is idle (it
            # waits for a kick), so the snapshot taken now is what it starts from.
            queue.raw_post_buffer(H, *case.build(queue))
            before = snapshot(queue.memory)
            caplog.clear()
            queue.kick(force=True)
            (bad,) = await queue.wait_used()
            assert (bad.id, bad.len, bad.tracked) == (H, 0, False)
            # Not one byte anywhere but the used ring: not the refused chain's buffers, not
            # its descriptors, not the bytes before a region's mmap_offset.
            assert_only_changed(queue.memory, before, used_ring_span(queue))
            lines = incident_lines(caplog, "refused, completed empty")
            assert len(lines) == 1 and case.log in lines[0], lines
            # The ring goes on, in source order: the refused request consumed nothing.
            await guest.read_more(256)
            # The other guest never noticed (the source is shared: not the same bytes).
            assert len(await other.read_random(64)) == 64
        finally:
            await guest.vmm.aclose()
            await other.aclose()
        # The socket takes the next VMM.
        again = await start_guest(socks[0], source[1])
        try:
            again.offset = guest.offset + 64
            await again.read_more(64)
        finally:
            await again.vmm.aclose()


async def test_valid_chains_still_served_around_refused_ones(
    socks: list[str], source: tuple[str, bytes]
) -> None:
    """Refused and valid requests interleaved in one batch: each valid one is filled in
    source order, each refused one completed empty, in ring order."""
    with trio.fail_after(STEP):
        guest = await start_guest(socks[0], source[1])
        try:
            q = guest.queue
            expected = []
            for i in range(3):
                expected += [q.post(64, publish=False), H - i]
                q.raw_post_buffer(H - i, 0x8000_0000, 64)  # publishes both
            q.kick(force=True)
            used = await q.wait_used(6)
            assert [u.id for u in used] == expected
            assert [u.len for u in used] == [64, 0] * 3
            assert b"".join(u.data for u in used) == source[1][:192]
        finally:
            await guest.vmm.aclose()


# -- the ring itself broken: stopped until the VMM restarts it -----------------------------


async def _wait_err(vmm: Frontend) -> None:
    assert vmm.err_fd is not None
    await trio.lowlevel.wait_readable(vmm.err_fd)
    os.read(vmm.err_fd, 8)


@pytest.mark.parametrize("kind", ["head_out_of_range", "avail_idx_too_far_ahead"])
async def test_broken_ring_stops_until_restart(
    kind: str,
    socks: list[str],
    source: tuple[str, bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Decision: RingError stops the ring (nothing sensible can be completed: there is no valid
    head), signals the err eventfd, logs one line; the connection, the other socket and the
    daemon go on. GET_VRING_BASE answers where the ring stopped; once the guest has repaired
    the ring the VMM restarts it from there and it is served again."""
    with trio.fail_after(STEP):
        guest = await start_guest(socks[0], source[1])
        other = await Frontend.connect(socks[1])
        try:
            await other.start_qemu72(4)
            await guest.read_more(64)
            q = guest.queue
            good_idx = q.avail_idx
            if kind == "head_out_of_range":
                q.raw_write_avail_entry(good_idx, QUEUE_SIZE + 3)
                q.raw_set_avail_idx(good_idx + 1)
            else:
                q.raw_set_avail_idx(good_idx + QUEUE_SIZE + 1)
            before = snapshot(q.memory)
            caplog.clear()
            q.kick(force=True)
            await _wait_err(guest.vmm)
            lines = incident_lines(caplog, "the guest broke it")
            assert len(lines) == 1, lines
            # Nothing at all was written: no used entry can name a head that does not exist.
            assert_only_changed(q.memory, before, [])
            # A kick now finds the ring stopped; the protocol is still answered.
            q.kick(force=True)
            assert await guest.vmm.get_features()
            assert len(await other.read_random(64)) == 64
            guest.offset += 64  # what the other guest took from the shared source
            # The VMM stops the ring: the base is the entry that broke it.
            assert await guest.vmm.stop() == good_idx
            assert q.read_used_idx() == good_idx
            # The guest repairs its ring; the VMM restarts it from that base.
            q.raw_set_avail_idx(good_idx)
            await guest.vmm.start(q, base=good_idx)
            await guest.read_more(128)
        finally:
            await guest.vmm.aclose()
            await other.aclose()


async def test_ring_broken_again_after_restart_is_stopped_again(
    socks: list[str], source: tuple[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """A restart over the same bad entry breaks the ring again (one more line), and a reboot
    (new rings, base 0) serves the guest."""
    with trio.fail_after(STEP):
        guest = await start_guest(socks[0], source[1])
        try:
            q = guest.queue
            q.raw_write_avail_entry(0, 0xFFFF)
            q.raw_set_avail_idx(1)
            q.kick(force=True)
            await _wait_err(guest.vmm)
            assert await guest.vmm.stop() == 0
            await guest.vmm.start(q, base=0)
            await _wait_err(guest.vmm)
            assert len(incident_lines(caplog, "the guest broke it")) == 2
            _, q2 = await guest.vmm.reboot(QUEUE_SIZE)
            guest.queue = q2
            await guest.read_more(64)
        finally:
            await guest.vmm.aclose()


# -- ring addresses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "where",
    ["desc_outside", "avail_past_region_end", "used_outside", "desc_is_gpa_not_uva"],
)
async def test_ring_addresses_outside_memory_refused(
    where: str, socks: list[str], source: tuple[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """Decision: SET_VRING_ADDR naming a ring outside the memory table is answered with a
    failure ack and changes nothing: the ring runs on at its old addresses (a failure reply
    means nothing changed); a correct SET_VRING_ADDR afterwards is taken."""
    with trio.fail_after(STEP):
        guest = await start_guest(socks[0], source[1])
        try:
            await guest.read_more(64)
            q, vmm = guest.queue, guest.vmm
            good = q.vring_addr()
            mem = q.memory
            end_uva = mem.regions[0].spec.userspace_addr + mem.regions[0].spec.memory_size
            bad = {
                "desc_outside": VringAddr(0, 0, 0x10, good.used, good.avail, 0),
                "avail_past_region_end": VringAddr(0, 0, good.desc, good.used, end_uva - 8, 0),
                "used_outside": VringAddr(0, 0, good.desc, end_uva + 0x1000, good.avail, 0),
                "desc_is_gpa_not_uva": VringAddr(0, 0, q.desc_table, good.used, good.avail, 0),
            }[where]
            reply = await vmm.request(Request.SET_VRING_ADDR, bad.encode(), need_reply=True)
            assert reply is not None and not reply.ok
            assert len(incident_lines(caplog, "not in guest memory")) == 1
            # The ring still runs where it was: a request posted now is served, in order.
            await guest.read_more(64)
            await vmm.set_vring_addr(good, need_reply=True)
            await guest.read_more(64)
        finally:
            await guest.vmm.aclose()


@pytest.mark.parametrize("field", ["desc", "avail", "used"])
async def test_misaligned_ring_addresses_refused_ring_keeps_old(
    field: str, socks: list[str], source: tuple[str, bytes]
) -> None:
    """Decision: misaligned ring addresses are refused at SET_VRING_ADDR (failure ack) and
    recorded nowhere: the running ring keeps its addresses and keeps serving."""
    with trio.fail_after(STEP):
        guest = await start_guest(socks[0], source[1])
        try:
            good = guest.queue.vring_addr()
            fields = {"desc": good.desc, "avail": good.avail, "used": good.used}
            fields[field] += {"desc": 8, "avail": 1, "used": 2}[field]
            bad = VringAddr(0, 0, fields["desc"], fields["used"], fields["avail"], 0)
            reply = await guest.vmm.request(Request.SET_VRING_ADDR, bad.encode(), need_reply=True)
            assert reply is not None and not reply.ok
            await guest.read_more(128)
        finally:
            await guest.vmm.aclose()


# -- kicks that race the protocol ----------------------------------------------------------


async def test_kick_right_after_enable_before_reply_is_not_lost(
    socks: list[str], source: tuple[str, bytes]
) -> None:
    """The guest posts and kicks the moment SET_VRING_ENABLE is on the wire, before the
    back-end has answered it (or anything else): the request must be served, not lost."""
    with trio.fail_after(STEP):
        async with await Frontend.connect(socks[0]) as vmm:
            await vmm.handshake()
            q = vmm.prepare_driver(4)
            # The QEMU start sequence up to the kick fd, then SET_VRING_ENABLE sent raw with
            # NEED_REPLY and not waited for.
            kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
            vmm.kick_fd, vmm.call_fd = kick, call
            vmm.memory, vmm.queue = q.memory, q
            q.kick_fd, q.call_fd = kick, call
            q.enable_calls(True)
            await vmm.set_vring_call(0, call)
            await vmm.set_features(vmm.device_features)
            await vmm.set_mem_table(q.memory, need_reply=True)
            await vmm.set_vring_num(0, 4)
            await vmm.set_vring_base(0, 0)
            await vmm.set_vring_addr(q.vring_addr())
            await vmm.set_vring_kick(0, kick)  # this one starts out unsignalled
            await vmm.send_raw(
                encode_message(
                    Request.SET_VRING_ENABLE,
                    VringState(0, 1).encode(),
                    HeaderFlags.NEED_REPLY,
                )
            )
            q.post(64)
            q.kick(force=True)
            reply = await vmm.recv_reply(Request.SET_VRING_ENABLE)
            assert reply.ok
            (used,) = await q.wait_used()
            assert used.data == source[1][:64]


async def test_kick_while_ring_disabled_served_on_enable(
    socks: list[str], source: tuple[str, bytes]
) -> None:
    """A kick that arrives while the ring is disabled (between SET_VRING_ENABLE 0 and 1) is
    kept in the eventfd and served when the ring is enabled again."""
    with trio.fail_after(STEP):
        guest = await start_guest(socks[0], source[1])
        try:
            await guest.read_more(64)
            await guest.vmm.set_vring_enable(0, False, need_reply=True)
            guest.queue.post(64)
            guest.queue.kick(force=True)
            await guest.vmm.set_vring_enable(0, True)
            (used,) = await guest.queue.wait_used()
            assert used.data == source[1][64:128]
        finally:
            await guest.vmm.aclose()


# -- the log cannot be flooded -------------------------------------------------------------


async def test_incidents_rate_limited_per_connection(
    socks: list[str], source: tuple[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """200 refused requests in a burst log 10 lines (the burst), not 200; the guest is still
    served and the other socket has its own allowance."""
    with trio.fail_after(STEP):
        guest = await start_guest(socks[0], source[1])
        other = await start_guest(socks[1], source[1])
        try:
            q = guest.queue
            caplog.clear()
            for _ in range(200):
                q.raw_post_buffer(H, 0x8000_0000, 64)
                q.kick(force=True)
                (bad,) = await q.wait_used()
                assert bad.len == 0
            lines = incident_lines(caplog, "refused, completed empty")
            assert len(lines) == 10
            assert all(line.startswith("rng.sock0: ") for line in lines)
            await guest.read_more(64)
            o = other.queue
            o.raw_post_buffer(H, 0x8000_0000, 64)
            o.kick(force=True)
            await o.wait_used()
            lines = incident_lines(caplog, "rng.sock1: request")
            assert len(lines) == 1
        finally:
            await guest.vmm.aclose()
            await other.vmm.aclose()


def test_incident_log_counts_what_it_held_back(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    incidents = IncidentLog(
        logging.getLogger("rngd.test"), "g: ", burst=3, interval=10.0, clock=lambda: now[0]
    )
    caplog.set_level(logging.WARNING, logger="rngd.test")
    for i in range(50):
        incidents("bad %d", i)
    assert [r.getMessage() for r in caplog.records] == ["g: bad 0", "g: bad 1", "g: bad 2"]
    caplog.clear()
    now[0] = 9.9
    incidents("still held")
    assert caplog.records == []
    now[0] = 10.0
    incidents("next window")
    assert [r.getMessage() for r in caplog.records] == [
        "g: 48 more incidents not logged in the last 10 s",
        "g: next window",
    ]
