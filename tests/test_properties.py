"""Property-based tests (hypothesis) of the codec and the descriptor walker.

The invariants live in scripts/fuzz.py (`check_codec`, `check_walker`), which runs the same
checks on far more random inputs than this fast suite does; here hypothesis generates the
inputs (and shrinks a failure to a small one).
"""

from __future__ import annotations

import os
import struct
import sys

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))

from fuzz import (
    FD_KINDS,
    LAYOUT,
    MAX_SIZE,
    CodecCase,
    WalkerCase,
    WalkerMemory,
    check_codec,
    check_walker,
    codec_case_from,
)

from rngd.protocol.codec import MessageError, MessageReader, ProtocolError
from rngd.protocol.constants import HeaderFlags, Request
from rngd.virtqueue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE

CODEC_EXAMPLES = 200
WALKER_EXAMPLES = 150

# -- codec ---------------------------------------------------------------------------------

_u32 = st.one_of(st.sampled_from([0, 1, 3, 4, 256, 32768, 65536]), st.integers(0, 2**32 - 1))
_u64 = st.one_of(
    st.sampled_from([0, 1, 0x100, 0x1FF, 0x171000000, 2**64 - 1]), st.integers(0, 2**64 - 1)
)


@st.composite
def _payload(draw: st.DrawFn, request: int) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    if request in (Request.SET_MEM_TABLE, Request.ADD_MEM_REG):
        count = draw(st.one_of(st.integers(0, 9), _u32))
        n = draw(st.integers(0, 9))
        page = st.sampled_from([0, 4096, 8192, 2**63, 2**64 - 4096])
        regions = b"".join(
            struct.pack(
                "<QQQQ",
                draw(st.one_of(page, _u64)),
                draw(st.one_of(page, _u64)),
                draw(st.one_of(page, _u64)),
                draw(st.one_of(st.sampled_from([0, 4096]), _u64)),
            )
            for _ in range(n)
        )
        return struct.pack("<II", count, 0) + regions
    if request == Request.SET_VRING_ADDR:
        return struct.pack(
            "<IIQQQQ",
            draw(st.integers(0, 2)),
            draw(st.integers(0, 3)),
            *(draw(_u64) for _ in range(4)),
        )
    if request in (
        Request.SET_VRING_NUM,
        Request.SET_VRING_BASE,
        Request.GET_VRING_BASE,
        Request.SET_VRING_ENABLE,
    ):
        return struct.pack("<II", draw(st.sampled_from([0, 1, 255])), draw(_u32))
    return draw(st.sampled_from([b"", struct.pack("<Q", draw(_u64))]))


@st.composite
def _message(draw: st.DrawFn) -> tuple[bytes, tuple[str, ...]]:
    request = draw(st.one_of(st.sampled_from(list(Request)), st.integers(0, 2**32 - 1)))
    payload = draw(_payload(int(request)))
    flags = draw(
        st.one_of(
            st.sampled_from([1, 1 | HeaderFlags.NEED_REPLY]),
            st.integers(0, 2**32 - 1),
        )
    )
    size = draw(st.one_of(st.just(len(payload)), st.integers(0, 5000), st.just(2**32 - 1)))
    kinds = tuple(draw(st.lists(st.sampled_from(FD_KINDS), max_size=4)))
    return struct.pack("<III", int(request), flags, size) + payload, kinds


@st.composite
def codec_cases(draw: st.DrawFn) -> CodecCase:
    messages = draw(st.lists(_message(), min_size=1, max_size=8))
    stream = b"".join(m for m, _ in messages)
    fd_at, pos = [], 0
    for data, kinds in messages:
        fd_at.append((pos, kinds))
        pos += len(data)
    stream = stream[: draw(st.integers(0, len(stream)))]
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=6))
    return codec_case_from(stream, cuts + [p for p, _ in fd_at], fd_at)


@settings(
    max_examples=CODEC_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(codec_cases())
def test_codec_and_session_only_raise_their_own_errors_and_close_fds(case: CodecCase) -> None:
    check_codec(case)


@settings(max_examples=CODEC_EXAMPLES, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(1, 64), max_size=20))
def test_reader_on_arbitrary_bytes(data: bytes, chunk_sizes: list[int]) -> None:
    """Pure garbage in arbitrary chunks: messages or ProtocolError, never anything else, and
    `wanted` is always a positive count once nothing is framed."""
    reader = MessageReader()
    pos = 0
    for size in [*chunk_sizes, len(data)]:
        reader.feed(data[pos : pos + size])
        pos += size
        try:
            while (message := reader.next()) is not None:
                assert len(message.payload) <= 4096
        except ProtocolError:
            return
        assert reader.wanted() > 0
        if pos >= len(data):
            break


def test_check_codec_frames_and_hands_over_fds() -> None:
    """The codec check is not vacuous: a message with its fd is framed, handled (the fd taken
    by the event and closed) and a stray fd with a truncated message closed by the reader."""
    call = struct.pack("<IIIQ", Request.SET_VRING_CALL, 1, 8, 0)
    case = codec_case_from(
        call + call[:5], [len(call)], [(0, ("eventfd",)), (len(call), ("pipe",))]
    )
    assert check_codec(case) == 1


def test_message_errors_are_message_errors() -> None:
    """MessageError and ProtocolError are the only error types (RequestRejected is one)."""
    from rngd.protocol.session import RequestRejected

    assert issubclass(RequestRejected, MessageError)
    assert not issubclass(ProtocolError, MessageError)


# -- walker --------------------------------------------------------------------------------

_R0, _R1 = LAYOUT
_ADDR = st.one_of(
    st.integers(0x2000, _R0.memory_size - 1),
    st.integers(_R1.guest_phys_addr, _R1.guest_phys_addr + _R1.memory_size - 1),
    st.sampled_from(
        [
            _R0.memory_size,
            _R0.memory_size - 64,
            _R1.guest_phys_addr - 16,
            _R1.guest_phys_addr + _R1.memory_size - 8,
            2**64 - 16,
            _R0.userspace_addr,
        ]
    ),
    st.integers(0, 2**64 - 1),
)
_LEN = st.one_of(st.sampled_from([0, 1, 16, 64, 0x8000, 0xFFFF_FFFF]), st.integers(0, 0x3000), _u32)
_FLAGS = st.one_of(
    st.sampled_from(
        [
            DESC_F_WRITE,
            DESC_F_WRITE | DESC_F_NEXT,
            DESC_F_INDIRECT,
            DESC_F_INDIRECT | DESC_F_NEXT,
            0,
            DESC_F_NEXT,
        ]
    ),
    st.integers(0, 0xFFFF),
)


@st.composite
def walker_cases(draw: st.DrawFn) -> WalkerCase:
    size = draw(st.sampled_from([1, 2, 4, 8, 16, MAX_SIZE]))
    nxt = st.one_of(st.integers(0, size - 1), st.sampled_from([size, 0xFFFF]))
    tables = []
    for _ in range(draw(st.integers(0, 3))):
        count = draw(st.integers(1, min(size + 1, 32)))
        gpa = draw(st.integers(0x2000 // 16, (_R0.memory_size - 16 * count) // 16)) * 16
        entries = tuple(
            (draw(_ADDR), draw(_LEN), draw(_FLAGS), draw(st.integers(0, count)))
            for _ in range(count)
        )
        tables.append((gpa, entries))

    def desc() -> tuple[int, int, int, int]:
        kind = draw(st.integers(0, 3))
        if kind == 1:
            # Writable, with any address and length.
            return draw(_ADDR), draw(_LEN), DESC_F_WRITE, draw(nxt)
        if kind >= 2:
            # A well-formed writable buffer (half of them chained on).
            spec = draw(st.sampled_from(LAYOUT))
            length = draw(st.integers(1, 0x2000))
            offset = draw(st.integers(0, spec.memory_size - length))
            chained = draw(st.booleans())
            flags = DESC_F_WRITE | (DESC_F_NEXT if chained else 0)
            return spec.guest_phys_addr + offset, length, flags, draw(nxt)
        flags = draw(_FLAGS)
        use_table: bool = draw(st.booleans())
        if flags & DESC_F_INDIRECT and tables and use_table:
            gpa, entries = draw(st.sampled_from(tables))
            length = draw(st.sampled_from([16 * len(entries), 0, 8, 16 * (size + 1)]))
            return gpa, length, flags, draw(nxt)
        return draw(_ADDR), draw(_LEN), flags, draw(nxt)

    descs = tuple(desc() for _ in range(size))
    next_avail = draw(st.integers(0, 0xFFFF))
    valid_head = st.integers(0, size - 1)
    ahead = draw(st.one_of(*[st.integers(1, size)] * 3, st.integers(0, 0xFFFF)))
    ring = tuple(draw(st.one_of(*[valid_head] * 7, st.just(0xFFFF))) for _ in range(size))
    return WalkerCase(
        size=size,
        descs=descs,
        tables=tuple(tables),
        avail_idx=(next_avail + ahead) & 0xFFFF,
        next_avail=next_avail,
        ring=ring,
        indirect=draw(st.booleans()),
        limit=draw(st.one_of(st.sampled_from([0, 1, 64, 1 << 20]), st.integers(0, 0x20000))),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def test_walker_terminates_stays_in_memory_and_fill_writes_only_its_buffers() -> None:
    with WalkerMemory() as wm:

        @settings(
            max_examples=WALKER_EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(walker_cases())
        def run(case: WalkerCase) -> None:
            trio.run(check_walker, wm, case)

        run()


def test_walker_check_sees_a_valid_chain_filled() -> None:
    """The walker check is not vacuous: a well-formed two-buffer chain is walked and filled
    (and the limit cuts it short exactly)."""
    buf0, buf1 = 0x3000, _R1.guest_phys_addr + 0x100
    descs = [(buf0, 100, DESC_F_WRITE | DESC_F_NEXT, 1), (buf1, 50, DESC_F_WRITE, 0)]
    case = WalkerCase(
        size=2,
        descs=tuple(descs),
        tables=(),
        avail_idx=1,
        next_avail=0,
        ring=(0, 1),
        indirect=True,
        limit=120,
    )
    with WalkerMemory() as wm:
        assert trio.run(check_walker, wm, case) == (1, 1)
