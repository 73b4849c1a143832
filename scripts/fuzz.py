#!/usr/bin/env python3
"""Fuzz the codec and the descriptor walker far beyond what the test suite's hypothesis runs do.

Two targets, each a pure function of one generated input (the same functions the property
tests in tests/test_properties.py call on hypothesis-generated inputs):

* ``codec``: a byte stream cut into arbitrary chunks, fds attached to arbitrary chunks, fed to
  `MessageReader`; every whole message goes through `Session.handle` and the event is acted on
  as the back-end would (memory tables mapped with `rngd.memory.GuestMemory.map` and touched).
  Invariants: no exception other than ProtocolError / MessageError escapes; a mapped table
  never faults (SIGBUS would kill this process); every fd received is closed, once.
* ``walker``: a random split ring (descriptor table, indirect tables, avail ring) in memfd-backed
  guest memory mapped by `rngd.memory.GuestMemory`. Invariants: `SplitQueue.pending` / `head`
  raise RingError exactly for an avail index too far ahead / a head out of range;
  `SplitQueue.chain` terminates with segments or ChainError; every segment lies inside one
  region and has a length; a chain has at most 2 * size segments; `lay_out` and a read write
  exactly the first `limit` bytes of the segments and not one byte anywhere else (checked over
  the whole memfds, including the bytes before a region's mmap_offset).

Run with the project's venv, e.g.::

    .venv/bin/python scripts/fuzz.py --examples 1000000          # both targets, 500k each
    .venv/bin/python scripts/fuzz.py --target walker --seconds 60

It prints progress, then the count reached and the time. Inputs are derived from (seed, index),
so a failure is reproduced with ``--seed S --start I --examples 1``.
"""

from __future__ import annotations

import argparse
import itertools
import mmap
import os
import random
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from rngd.memory import GuestMemory, GuestMemoryError
from rngd.protocol.codec import MessageError, MessageReader, ProtocolError, encode_u64
from rngd.protocol.constants import (
    RNG_DEVICE_FEATURES,
    RNG_PROTOCOL_FEATURES,
    HeaderFlags,
    Request,
)
from rngd.protocol.payloads import MemoryRegion
from rngd.protocol.session import (
    AddMemReg,
    GetVringBase,
    RemMemReg,
    Session,
    SetMemTable,
    SetVringCall,
    SetVringErr,
    SetVringKick,
)
from rngd.ring import lay_out
from rngd.source import EntropySource
from rngd.virtqueue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    ChainError,
    RingError,
    Segment,
    SplitQueue,
)

PAGE = mmap.PAGESIZE

# ------------------------------------------------------------------------------------------
# codec target
# ------------------------------------------------------------------------------------------

#: Kinds of fd a chunk can carry: memfds of a few sizes (mappable or too small), and fds that
#: cannot be mapped at all.
FD_KINDS = ("memfd0", "memfd1", "memfd2", "eventfd", "pipe")


@dataclass(frozen=True)
class CodecCase:
    """A byte stream as the socket delivered it: chunks, each with the fds that came with it."""

    chunks: tuple[tuple[bytes, tuple[str, ...]], ...]


def _make_fd(kind: str, extra: list[int]) -> int:
    if kind.startswith("memfd"):
        fd = os.memfd_create("rngd-fuzz", os.MFD_CLOEXEC)
        os.ftruncate(fd, int(kind[5:]) * PAGE)
        return fd
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    r, w = os.pipe2(os.O_CLOEXEC)
    extra.append(w)  # the test's own end, closed by the check
    return r


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _act_on_mem_table(event: SetMemTable) -> None:
    """What the back-end does with a memory table: map it, use it, close everything."""
    try:
        try:
            memory = GuestMemory.map(event.regions, event.fds)
        except GuestMemoryError:
            return
        try:
            for region in memory.regions:
                # Touch the first and last byte: a mapping past the fd's end would SIGBUS here.
                for addr in (
                    region.guest_phys_addr,
                    region.guest_phys_addr + region.memory_size - 1,
                ):
                    region_view, offset = memory.span(addr, 1)
                    region_view[offset] = region_view[offset] ^ 0
        finally:
            memory.close()
    finally:
        for fd in event.fds:
            os.close(fd)


def check_codec(case: CodecCase) -> int:
    """Run one codec case; return how many messages were framed. Raises AssertionError (or
    whatever escaped) when an invariant fails."""
    baseline = fd_count()
    session = Session()
    reader = MessageReader()
    framed = 0
    own: list[int] = []
    try:
        for data, kinds in case.chunks:
            fds = [_make_fd(kind, own) for kind in kinds]
            reader.feed(data, fds)
            try:
                while (message := reader.next()) is not None:
                    framed += 1
                    ok = False
                    try:
                        event = session.handle(message)
                        if isinstance(event, SetMemTable):
                            _act_on_mem_table(event)
                        elif (
                            isinstance(
                                event,
                                SetVringKick | SetVringCall | SetVringErr | AddMemReg | RemMemReg,
                            )
                            and event.fd is not None
                        ):
                            # The event's fd is the I/O layer's to close, as the daemon does.
                            os.close(event.fd)
                        elif isinstance(event, GetVringBase):
                            session.vring_base_reply(event.index, 0)
                        ok = True
                    except MessageError:
                        pass
                    finally:
                        message.close_fds()
                    session.ack(message, ok)
            except ProtocolError:
                # The back-end hangs up here; the reader has closed what it held.
                assert not reader.pending(), "reader kept bytes or fds after a ProtocolError"
                break
        reader.close()
    finally:
        for fd in own:
            os.close(fd)
    after = fd_count()
    assert after == baseline, f"fd leak: {baseline} fds before, {after} after"
    return framed


_U32 = struct.Struct("<I")


def _interesting_u64(rng: random.Random) -> int:
    return rng.choice(
        [
            0,
            1,
            int(RNG_DEVICE_FEATURES),
            int(RNG_DEVICE_FEATURES) | 1,
            int(RNG_PROTOCOL_FEATURES),
            0x100,
            0x101,
            0x1FF,
            0x200,
            (1 << 64) - 1,
            rng.getrandbits(64),
            rng.getrandbits(9),
        ]
    )


def _interesting_u32(rng: random.Random) -> int:
    return rng.choice(
        [0, 1, 2, 3, 4, 255, 256, 1024, 32768, 32769, 65535, 65536, rng.getrandbits(32)]
    )


def _region_field(rng: random.Random, which: str) -> int:
    if which == "size":
        return rng.choice(
            [0, PAGE, 2 * PAGE, 3 * PAGE, 1 << 63, (1 << 64) - 1, rng.getrandbits(64)]
        )
    if which == "offset":
        return rng.choice([0, 0, PAGE, 2 * PAGE, (1 << 64) - PAGE, rng.getrandbits(64)])
    return rng.choice([0, PAGE, 2 * PAGE, 0x1_0000_0000, (1 << 64) - PAGE, rng.getrandbits(64)])


def _payload(rng: random.Random, request: int) -> bytes:
    kind = rng.random()
    if kind < 0.1:
        return rng.randbytes(rng.choice([0, 1, 7, 8, 9, 12, 40, rng.randrange(0, 300)]))
    if request == Request.SET_MEM_TABLE or request == Request.ADD_MEM_REG:
        count = rng.choice([0, 1, 1, 2, 3, 8, 9, rng.getrandbits(32)])
        n = min(count, 9) if rng.random() < 0.8 else rng.randrange(0, 10)
        regions = b"".join(
            struct.pack(
                "<QQQQ",
                _region_field(rng, "gpa"),
                _region_field(rng, "size"),
                _region_field(rng, "uva"),
                _region_field(rng, "offset"),
            )
            for _ in range(n)
        )
        if rng.random() < 0.2:
            regions += bytes(32 * max(0, 8 - n))
        return struct.pack("<II", count, 0) + regions
    if request in (
        Request.SET_VRING_NUM,
        Request.SET_VRING_BASE,
        Request.GET_VRING_BASE,
        Request.SET_VRING_ENABLE,
    ):
        return struct.pack("<II", rng.choice([0, 0, 1, 255]), _interesting_u32(rng))
    if request == Request.SET_VRING_ADDR:
        return struct.pack(
            "<IIQQQQ",
            rng.choice([0, 0, 1]),
            rng.choice([0, 1, 2]),
            *(
                rng.choice([0, 0x1000, 0x1002, 0x7F00_0000_0000, rng.getrandbits(64)])
                for _ in range(4)
            ),
        )
    if kind < 0.2:
        return b""
    return encode_u64(_interesting_u64(rng))


def _well_formed(rng: random.Random) -> tuple[bytes, tuple[str, ...]]:
    """A message a VMM could send, with the fds it needs, values sometimes off by a little."""
    request = rng.choice(
        [
            Request.GET_FEATURES,
            Request.SET_FEATURES,
            Request.SET_OWNER,
            Request.GET_PROTOCOL_FEATURES,
            Request.SET_PROTOCOL_FEATURES,
            Request.SET_MEM_TABLE,
            Request.SET_MEM_TABLE,
            Request.SET_VRING_NUM,
            Request.SET_VRING_ADDR,
            Request.SET_VRING_BASE,
            Request.GET_VRING_BASE,
            Request.SET_VRING_KICK,
            Request.SET_VRING_CALL,
            Request.SET_VRING_ERR,
            Request.SET_VRING_ENABLE,
            Request.RESET_OWNER,
        ]
    )
    kinds: tuple[str, ...] = ()
    if request in (Request.SET_FEATURES,):
        payload = encode_u64(int(RNG_DEVICE_FEATURES) & ~rng.getrandbits(8) << 24)
    elif request == Request.SET_PROTOCOL_FEATURES:
        payload = encode_u64(rng.choice([0, int(RNG_PROTOCOL_FEATURES), 8]))
    elif request == Request.SET_MEM_TABLE:
        n = rng.randrange(1, 4)
        pages = [rng.choice([1, 1, 2]) for _ in range(n)]
        offsets = [rng.choice([0, 0, 0, PAGE]) for _ in range(n)]
        regions = b"".join(
            struct.pack(
                "<QQQQ",
                0x10_0000 * i,
                PAGE * pages[i],
                0x7F00_0000_0000 + 0x10_0000 * i,
                offsets[i],
            )
            for i in range(n)
        )
        payload = struct.pack("<II", n, 0) + regions
        kinds = tuple(rng.choice(["memfd1", "memfd2", "memfd2", "eventfd"]) for _ in range(n))
    elif request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        nofd = rng.random() < 0.2
        payload = encode_u64(0x100 if nofd else 0)
        kinds = () if nofd else (rng.choice(["eventfd", "eventfd", "pipe"]),)
    elif request == Request.SET_VRING_NUM:
        payload = struct.pack("<II", 0, rng.choice([4, 8, 256, 1024, 3]))
    elif request in (Request.SET_VRING_BASE, Request.GET_VRING_BASE):
        payload = struct.pack("<II", 0, rng.choice([0, 1, 0xFFFF]))
    elif request == Request.SET_VRING_ENABLE:
        payload = struct.pack("<II", 0, rng.choice([0, 1, 1]))
    elif request == Request.SET_VRING_ADDR:
        base = 0x7F00_0000_0000 + rng.choice([0, 0x800, 0x10_0000])
        payload = struct.pack("<IIQQQQ", 0, 0, base, base + 0x700, base + 0x400, 0)
    else:
        payload = b""
    flags = 1 | (HeaderFlags.NEED_REPLY if rng.random() < 0.5 else 0)
    return struct.pack("<III", request, flags, len(payload)) + payload, kinds


def _message(rng: random.Random) -> tuple[bytes, tuple[str, ...]]:
    if rng.random() < 0.5:
        return _well_formed(rng)
    request = (
        rng.choice([*range(0, 46), rng.getrandbits(32)])
        if rng.random() < 0.2
        else rng.choice(
            [
                Request.GET_FEATURES,
                Request.SET_FEATURES,
                Request.SET_OWNER,
                Request.RESET_OWNER,
                Request.SET_MEM_TABLE,
                Request.SET_VRING_NUM,
                Request.SET_VRING_ADDR,
                Request.SET_VRING_BASE,
                Request.GET_VRING_BASE,
                Request.SET_VRING_KICK,
                Request.SET_VRING_CALL,
                Request.SET_VRING_ERR,
                Request.GET_PROTOCOL_FEATURES,
                Request.SET_PROTOCOL_FEATURES,
                Request.GET_QUEUE_NUM,
                Request.SET_VRING_ENABLE,
            ]
        )
    )
    payload = _payload(rng, request)
    flags = 1
    roll = rng.random()
    if roll < 0.3:
        flags |= HeaderFlags.NEED_REPLY
    elif roll < 0.35:
        flags = rng.getrandbits(32)
    elif roll < 0.4:
        flags = rng.choice([0, 2, 3, 1 | HeaderFlags.REPLY])
    size = len(payload)
    roll = rng.random()
    if roll < 0.03:
        size = rng.choice([4097, 1 << 31, (1 << 32) - 1])
    elif roll < 0.08:
        size = rng.randrange(0, 64)
    header = struct.pack("<III", request & 0xFFFF_FFFF, flags, size)
    nfds = rng.choice([0, 0, 0, 1, 1, 2, 3]) if rng.random() < 0.9 else rng.randrange(0, 10)
    kinds = tuple(rng.choice(FD_KINDS) for _ in range(nfds))
    return header + payload, kinds


def random_codec_case(rng: random.Random) -> CodecCase:
    messages = [_message(rng) for _ in range(rng.randrange(1, 12))]
    if rng.random() < 0.1:
        messages.insert(rng.randrange(len(messages) + 1), (rng.randbytes(rng.randrange(1, 40)), ()))
    stream = bytearray()
    fd_at: list[tuple[int, tuple[str, ...]]] = []
    for data, kinds in messages:
        fd_at.append((len(stream), kinds))
        stream += data
    if rng.random() < 0.3 and stream:
        del stream[rng.randrange(len(stream)) :]  # truncated: the peer hangs up mid-message
    cuts = sorted(
        {0, len(stream), *(rng.randrange(len(stream) + 1) for _ in range(rng.randrange(4)))}
    )
    cuts += [p for p, _ in fd_at if p < len(stream)]
    cuts = sorted(set(cuts))
    return codec_case_from(bytes(stream), cuts, fd_at)


def codec_case_from(
    stream: bytes, cuts: Sequence[int], fd_at: Sequence[tuple[int, tuple[str, ...]]]
) -> CodecCase:
    """Chunks of `stream` between `cuts`; each position's fds ride with the chunk holding it."""
    bounds = sorted({0, len(stream), *(c for c in cuts if 0 <= c <= len(stream))})
    chunks: list[tuple[bytes, tuple[str, ...]]] = []
    for start, end in itertools.pairwise(bounds):
        kinds = tuple(k for p, ks in fd_at if start <= p < end for k in ks)
        chunks.append((stream[start:end], kinds))
    if not chunks:
        chunks.append((b"", tuple(k for _, ks in fd_at for k in ks)))
    return CodecCase(tuple(chunks))


# ------------------------------------------------------------------------------------------
# walker target
# ------------------------------------------------------------------------------------------

#: The guest memory every walker case lives in: two memfd-backed regions, the second starting
#: one page into its memfd (those bytes are not guest memory and must never change).
LAYOUT = (
    MemoryRegion(
        guest_phys_addr=0x0, memory_size=0x10000, userspace_addr=0x7F00_0000_0000, mmap_offset=0
    ),
    MemoryRegion(
        guest_phys_addr=0x1_0000_0000,
        memory_size=0x8000,
        userspace_addr=0x7F00_4000_0000,
        mmap_offset=PAGE,
    ),
)
DESC_GPA = 0x0
AVAIL_GPA = 0x1000
USED_GPA = 0x1400
MAX_SIZE = 256
_DESC = struct.Struct("<QIHH")


@dataclass(frozen=True)
class WalkerCase:
    size: int
    #: The descriptor table, ``size`` entries of (addr, len, flags, next).
    descs: tuple[tuple[int, int, int, int], ...]
    #: Indirect tables: (gpa, entries) written into memory before the walk.
    tables: tuple[tuple[int, tuple[tuple[int, int, int, int], ...]], ...]
    avail_idx: int
    next_avail: int
    #: The avail ring's entries (``size`` of them).
    ring: tuple[int, ...]
    indirect: bool
    #: How many bytes `fill` may write for each chain walked.
    limit: int
    #: Random bytes the rest of guest memory is filled with (repeated), so writes show.
    seed: int = 0


@dataclass
class WalkerMemory:
    """memfds for `LAYOUT`, our own mappings to write and snapshot them, and the daemon's
    `GuestMemory` over the same fds."""

    fds: list[int] = field(default_factory=list)
    maps: list[mmap.mmap] = field(default_factory=list)
    memory: GuestMemory | None = None
    source: EntropySource | None = None

    def __enter__(self) -> WalkerMemory:
        for spec in LAYOUT:
            fd = os.memfd_create("rngd-fuzz-guest", os.MFD_CLOEXEC)
            os.ftruncate(fd, spec.mmap_offset + spec.memory_size)
            self.fds.append(fd)
            self.maps.append(mmap.mmap(fd, spec.mmap_offset + spec.memory_size))
        self.memory = GuestMemory.map(LAYOUT, self.fds)
        self.source = EntropySource("/dev/urandom")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.memory is not None:
            self.memory.close()
        if self.source is not None:
            self.source.close()
        for m in self.maps:
            m.close()
        for fd in self.fds:
            os.close(fd)

    def write(self, gpa: int, data: bytes) -> None:
        for spec, m in zip(LAYOUT, self.maps, strict=True):
            if (
                spec.guest_phys_addr <= gpa
                and gpa + len(data) <= spec.guest_phys_addr + spec.memory_size
            ):
                start = spec.mmap_offset + gpa - spec.guest_phys_addr
                m[start : start + len(data)] = data
                return
        raise ValueError(f"{gpa:#x}+{len(data)} is not in the layout")

    def snapshot(self) -> list[bytes]:
        return [bytes(m) for m in self.maps]


def _in_layout(addr: int, length: int) -> bool:
    return any(
        s.guest_phys_addr <= addr and addr + length <= s.guest_phys_addr + s.memory_size
        for s in LAYOUT
    )


def _uva(gpa: int) -> int:
    return LAYOUT[0].userspace_addr + gpa  # the rings live in region 0


def _load(wm: WalkerMemory, case: WalkerCase) -> None:
    pattern = random.Random(case.seed).randbytes(997)
    for spec, m in zip(LAYOUT, wm.maps, strict=True):
        total = spec.mmap_offset + spec.memory_size
        m[:] = (pattern * (total // len(pattern) + 1))[:total]
    for gpa, entries in case.tables:
        wm.write(gpa, b"".join(_DESC.pack(*e) for e in entries))
    wm.write(DESC_GPA, b"".join(_DESC.pack(*d) for d in case.descs))
    ring = struct.pack(f"<HH{case.size}H", 0, case.avail_idx, *case.ring)
    wm.write(AVAIL_GPA, ring)


def _allowed(segments: Sequence[Segment], limit: int) -> list[tuple[int, int]]:
    """The spans (gpa, length) `fill` may write: the segments' first `limit` bytes."""
    spans = []
    for s in segments:
        if limit <= 0:
            break
        take = min(s.length, limit)
        spans.append((s.addr, take))
        limit -= take
    return spans


def _assert_only_changed(
    wm: WalkerMemory, before: list[bytes], spans: list[tuple[int, int]]
) -> None:
    after = wm.snapshot()
    for spec, old, new in zip(LAYOUT, before, after, strict=True):
        if old == new:
            continue
        mask = bytearray(len(old))
        for gpa, length in spans:
            if spec.guest_phys_addr <= gpa < spec.guest_phys_addr + spec.memory_size:
                start = spec.mmap_offset + gpa - spec.guest_phys_addr
                mask[start : start + length] = b"\x01" * length
        for i in range(len(old)):
            if old[i] != new[i] and not mask[i]:
                raise AssertionError(
                    f"byte at memfd offset {i:#x} of region at gpa {spec.guest_phys_addr:#x} "
                    "changed outside the chain's buffers"
                )


async def check_walker(wm: WalkerMemory, case: WalkerCase) -> tuple[int, int]:
    """Run one walker case; return how many chains were walked and how many were filled."""
    assert wm.memory is not None and wm.source is not None
    _load(wm, case)
    queue = SplitQueue(
        wm.memory,
        case.size,
        _uva(DESC_GPA),
        _uva(AVAIL_GPA),
        _uva(USED_GPA),
        case.next_avail,
        event_idx=False,
        indirect=case.indirect,
    )
    ahead = (case.avail_idx - case.next_avail) & 0xFFFF
    try:
        pending = queue.pending()
    except RingError:
        assert ahead > case.size, "RingError for an avail index within a queue size"
        pending = 0
    else:
        assert pending == ahead <= case.size
    walked = filled = 0
    for _ in range(min(pending, 4)):
        # Read the slot afresh: a buffer filled earlier may cover the ring (the guest's choice).
        (slot,) = struct.unpack_from(
            "<H", wm.maps[0], AVAIL_GPA + 4 + 2 * (queue.next_avail % case.size)
        )
        try:
            head = queue.head()
        except RingError:
            assert slot >= case.size, f"RingError for head {slot} of a queue of {case.size}"
            break
        assert head == slot < case.size
        walked += 1
        try:
            segments = queue.chain(head)
        except ChainError:
            queue.next_avail = (queue.next_avail + 1) & 0xFFFF
            continue
        assert 0 < len(segments) <= 2 * case.size, f"{len(segments)} segments"
        for s in segments:
            assert s.length > 0 and _in_layout(s.addr, s.length), f"segment {s} outside memory"
        before = wm.snapshot()
        iov: list[memoryview] = []
        lay_out(segments, case.limit, iov)
        written = wm.source.read(iov) if iov else 0
        total = sum(s.length for s in segments)
        assert written == min(case.limit, total), f"wrote {written} of {min(case.limit, total)}"
        _assert_only_changed(wm, before, _allowed(segments, case.limit))
        filled += 1
        queue.next_avail = (queue.next_avail + 1) & 0xFFFF
    return walked, filled


def interesting_addresses(rng: random.Random) -> int:
    r0, r1 = LAYOUT
    r0_end = r0.guest_phys_addr + r0.memory_size
    r1_end = r1.guest_phys_addr + r1.memory_size
    return rng.choice(
        [
            rng.randrange(0, r0_end),
            rng.randrange(0x2000, r0_end),
            rng.randrange(r1.guest_phys_addr, r1_end),
            r0_end - rng.randrange(1, 128),
            r1_end - rng.randrange(1, 128),
            r0_end,
            r1_end,
            r1.guest_phys_addr - rng.randrange(1, 64),
            (1 << 64) - rng.randrange(1, 4096),
            r0.userspace_addr + rng.randrange(0, r0_end),
            rng.getrandbits(64),
        ]
    )


def interesting_length(rng: random.Random) -> int:
    return rng.choice(
        [
            0,
            1,
            16,
            64,
            64,
            rng.randrange(1, 0x3000),
            0x8000,
            0x10000,
            0xFFFF_FFFF,
            rng.getrandbits(32),
        ]
    )


def _valid_buffer(rng: random.Random) -> tuple[int, int]:
    """A buffer a well-behaved driver could post: inside one region (anywhere in it)."""
    spec = rng.choice(LAYOUT)
    length = rng.choice([1, 16, 64, 64, 512, rng.randrange(1, 0x2000)])
    return spec.guest_phys_addr + rng.randrange(0, spec.memory_size - length + 1), length


def _desc(
    rng: random.Random, size: int, tables: Sequence[tuple[int, int]], chaos: float
) -> tuple[int, int, int, int]:
    """One descriptor: a well-formed one, each field spoilt with probability `chaos`."""
    flags = DESC_F_WRITE
    if rng.random() < chaos:
        flags &= ~DESC_F_WRITE
    if rng.random() < 0.35:
        flags |= DESC_F_NEXT
    if rng.random() < 0.15:
        flags |= DESC_F_INDIRECT
        if rng.random() > chaos:
            flags &= ~DESC_F_NEXT
    if rng.random() < chaos / 4:
        flags |= rng.getrandbits(16)
    nxt = (
        rng.randrange(size)
        if rng.random() >= chaos
        else rng.choice([size, 0xFFFF, rng.getrandbits(16)])
    )
    if flags & DESC_F_INDIRECT and tables and rng.random() >= chaos:
        gpa, count = rng.choice(tables)
        length = (
            16 * count
            if rng.random() >= chaos
            else rng.choice([0, 8, 16 * count + 8, 16 * (size + 1)])
        )
        return gpa, length, flags, nxt
    if rng.random() >= chaos:
        addr, length = _valid_buffer(rng)
        return addr, length, flags, nxt
    return interesting_addresses(rng), interesting_length(rng), flags, nxt


def random_walker_case(rng: random.Random) -> WalkerCase:
    size = rng.choice([1, 2, 4, 4, 8, 16, 64, 256])
    chaos = rng.choice([0.0, 0.02, 0.1, 0.3, 1.0])
    r1 = LAYOUT[1]
    table_specs = []
    for _ in range(rng.randrange(0, 4)):
        count = rng.choice([1, 2, 4, size, rng.randrange(1, size + 2)])
        region = rng.random() < 0.5
        base = r1.guest_phys_addr if region else 0x2000
        span = (r1.memory_size if region else 0x10000 - 0x2000) - 16 * count
        if span <= 0:
            continue
        table_specs.append((base + rng.randrange(0, span) // 16 * 16, count))
    tables = tuple(
        (gpa, tuple(_desc(rng, count, table_specs, chaos) for _ in range(count)))
        for gpa, count in table_specs
    )
    descs = tuple(_desc(rng, size, table_specs, chaos) for _ in range(size))
    next_avail = rng.getrandbits(16)
    ahead = rng.randrange(0, size + 1) if rng.random() < 0.9 else rng.getrandbits(16)
    ring = tuple(
        rng.randrange(size) if rng.random() < 0.95 else rng.choice([size, 0xFFFF])
        for _ in range(size)
    )
    return WalkerCase(
        size=size,
        descs=descs,
        tables=tables,
        avail_idx=(next_avail + ahead) & 0xFFFF,
        next_avail=next_avail,
        ring=ring,
        indirect=rng.random() < 0.8,
        limit=rng.choice([0, 1, 64, 1000, rng.randrange(0, 0x20000), 1 << 20]),
        seed=rng.getrandbits(32),
    )


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------


def _rng(seed: int, target: str, index: int) -> random.Random:
    return random.Random(f"{seed}:{target}:{index}")


async def _run(args: argparse.Namespace) -> int:
    targets = ["codec", "walker"] if args.target == "all" else [args.target]
    per_target = args.examples // len(targets) if args.examples else None
    deadline = time.monotonic() + args.seconds if args.seconds else None
    counts = dict.fromkeys(targets, 0)
    framed = walked = filled = 0
    started = time.monotonic()
    last_report = started
    with WalkerMemory() as wm:
        for target in targets:
            index = args.start
            while per_target is None or counts[target] < per_target:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                rng = _rng(args.seed, target, index)
                try:
                    if target == "codec":
                        framed += check_codec(random_codec_case(rng))
                    else:
                        w, f = await check_walker(wm, random_walker_case(rng))
                        walked, filled = walked + w, filled + f
                except BaseException:
                    print(
                        f"FAILED: target {target}, seed {args.seed}, example {index} "
                        f"(reproduce: --target {target} --seed {args.seed} --start {index} "
                        "--examples 1)",
                        file=sys.stderr,
                    )
                    raise
                counts[target] += 1
                index += 1
                now = time.monotonic()
                if now - last_report >= args.progress:
                    last_report = now
                    print(
                        f"  {now - started:8.0f} s  "
                        + "  ".join(f"{t} {c}" for t, c in counts.items()),
                        flush=True,
                    )
            if deadline is not None and time.monotonic() >= deadline:
                break
    elapsed = time.monotonic() - started
    total = sum(counts.values())
    print(
        f"fuzz: {total} examples in {elapsed:.0f} s ("
        + ", ".join(f"{t} {c}" for t, c in counts.items())
        + f"; {framed} messages framed, {walked} chains walked, {filled} filled)"
        + f", seed {args.seed}: no failure",
        flush=True,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=["codec", "walker", "all"], default="all")
    parser.add_argument(
        "--examples", type=int, default=1_000_000, help="total examples (split between targets)"
    )
    parser.add_argument(
        "--seconds", type=float, default=0, help="stop after this long (0: no limit)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="first example index")
    parser.add_argument("--progress", type=float, default=30, help="seconds between progress lines")
    args = parser.parse_args(argv)
    return trio.run(_run, args)


if __name__ == "__main__":
    sys.exit(main())
