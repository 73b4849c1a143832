"""The sans-I/O protocol core, fed bytes and fds directly: no sockets."""

from __future__ import annotations

import os
import struct

import pytest

from rngd.protocol.codec import (
    Message,
    MessageError,
    MessageReader,
    ProtocolError,
    decode_header,
    encode_message,
)
from rngd.protocol.constants import (
    MAX_PAYLOAD_SIZE,
    HeaderFlags,
    ProtocolFeatures,
    Request,
    VirtioFeatures,
)
from rngd.protocol.payloads import (
    MemoryRegion,
    VringAddr,
    VringFd,
    VringState,
    encode_memory_table,
)
from rngd.protocol.session import (
    GetVringBase,
    Reply,
    RequestRejected,
    Session,
    SetMemTable,
    SetVringBase,
    SetVringCall,
    SetVringErr,
    SetVringKick,
    VringChanged,
    VringConfig,
)

U64 = struct.Struct("<Q")


def msg(
    request: int, payload: bytes = b"", flags: int = 0, fds: list[int] | None = None
) -> Message:
    reader = MessageReader()
    reader.feed(encode_message(request, payload, flags), fds or [])
    message = reader.next()
    assert message is not None
    return message


def negotiated(reply_ack: bool = True, features: int | None = None) -> Session:
    session = Session()
    session.handle(msg(Request.SET_OWNER))
    session.handle(
        msg(Request.SET_PROTOCOL_FEATURES, U64.pack(ProtocolFeatures.REPLY_ACK if reply_ack else 0))
    )
    chosen = session.device_features if features is None else features
    session.handle(msg(Request.SET_FEATURES, U64.pack(chosen)))
    return session


def test_reader_frames_byte_by_byte_and_attaches_fds() -> None:
    reader = MessageReader()
    wire = encode_message(Request.GET_FEATURES) + encode_message(
        Request.SET_VRING_CALL, VringFd(0, True).encode()
    )
    fd = os.eventfd(0)
    messages = []
    for i, byte in enumerate(wire):
        # fds ride on the first byte of the second message, as SCM_RIGHTS delivers them.
        reader.feed(bytes([byte]), [fd] if i == 12 else [])
        message = reader.next()
        if message is not None:
            messages.append(message)
    assert [m.request for m in messages] == [Request.GET_FEATURES, Request.SET_VRING_CALL]
    assert messages[0].fds == [] and messages[1].fds == [fd]
    messages[1].close_fds()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_reader_wanted_reads_header_then_payload() -> None:
    reader = MessageReader()
    assert reader.wanted() == 12
    wire = encode_message(Request.SET_FEATURES, U64.pack(1))
    reader.feed(wire[:12])
    assert reader.wanted() == 8
    assert reader.next() is None
    reader.feed(wire[12:])
    assert reader.wanted() == 0  # the message is whole; nothing more to read for it
    message = reader.next()
    assert message is not None and message.payload == U64.pack(1)
    assert not reader.pending()


def test_reader_refuses_oversized_payload_and_bad_version() -> None:
    reader = MessageReader()
    reader.feed(struct.pack("<III", Request.SET_FEATURES, 1, MAX_PAYLOAD_SIZE + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        reader.next()
    reader = MessageReader()
    reader.feed(struct.pack("<III", Request.GET_FEATURES, 2, 0))
    with pytest.raises(ProtocolError, match="version"):
        reader.next()


def test_reader_close_releases_fds_of_a_partial_message() -> None:
    fd = os.eventfd(0)
    reader = MessageReader()
    reader.feed(encode_message(Request.SET_VRING_KICK, VringFd(0, True).encode())[:5], [fd])
    assert reader.pending()
    reader.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_features_offered_match_the_original() -> None:
    session = Session()
    event = session.handle(msg(Request.GET_FEATURES))
    assert isinstance(event, Reply) and event.data is not None
    request, flags, size = decode_header(event.data[:12])
    assert (request, flags, size) == (Request.GET_FEATURES, 1 | HeaderFlags.REPLY, 8)
    assert U64.unpack(event.data[12:])[0] == 0x171000000
    event = session.handle(msg(Request.GET_PROTOCOL_FEATURES))
    assert isinstance(event, Reply) and event.data is not None
    offered = U64.unpack(event.data[12:])[0]
    assert offered & ProtocolFeatures.MQ and offered & ProtocolFeatures.REPLY_ACK
    event = session.handle(msg(Request.GET_QUEUE_NUM))
    assert isinstance(event, Reply) and event.data is not None
    assert U64.unpack(event.data[12:])[0] == 1


def test_reply_ack_only_when_negotiated_and_asked() -> None:
    session = negotiated(reply_ack=True)
    asked = msg(Request.SET_VRING_NUM, VringState(0, 4).encode(), HeaderFlags.NEED_REPLY)
    not_asked = msg(Request.SET_VRING_NUM, VringState(0, 4).encode())
    ok = session.ack(asked, True)
    assert ok is not None and U64.unpack(ok[12:])[0] == 0
    failed = session.ack(asked, False)
    assert failed is not None and U64.unpack(failed[12:])[0] != 0
    assert session.ack(not_asked, True) is None
    assert negotiated(reply_ack=False).ack(asked, True) is None


def test_refuses_features_never_offered() -> None:
    session = Session()
    with pytest.raises(RequestRejected):
        session.handle(msg(Request.SET_FEATURES, U64.pack(1 << 5)))
    with pytest.raises(RequestRejected):
        session.handle(msg(Request.SET_PROTOCOL_FEATURES, U64.pack(ProtocolFeatures.CONFIG)))


def test_rings_start_enabled_only_without_protocol_features() -> None:
    without = negotiated(features=int(VirtioFeatures.VERSION_1))
    assert without.vrings[0].enabled
    with_pf = negotiated()
    assert not with_pf.vrings[0].enabled
    event = with_pf.handle(msg(Request.SET_VRING_ENABLE, VringState(0, 1).encode()))
    assert event == VringChanged(0, VringConfig(enabled=True))
    with pytest.raises(RequestRejected):
        without.handle(msg(Request.SET_VRING_ENABLE, VringState(0, 1).encode()))


@pytest.mark.parametrize("size", [0, 3, 6, 65536])
def test_vring_num_must_be_a_power_of_two_in_range(size: int) -> None:
    with pytest.raises(RequestRejected):
        negotiated().handle(msg(Request.SET_VRING_NUM, VringState(0, size).encode()))


@pytest.mark.parametrize("size", [1, 4, 256, 32768])
def test_vring_num_accepted(size: int) -> None:
    session = negotiated()
    assert session.handle(msg(Request.SET_VRING_NUM, VringState(0, size).encode())) == (
        VringChanged(0, VringConfig(size=size))
    )


def test_vring_index_out_of_range_refused() -> None:
    session = negotiated()
    with pytest.raises(RequestRejected, match="out of range"):
        session.handle(msg(Request.SET_VRING_NUM, VringState(1, 4).encode()))
    with pytest.raises(RequestRejected, match="out of range"):
        session.handle(msg(Request.GET_VRING_BASE, VringState(7, 0).encode()))


def test_vring_addr_alignment_and_record() -> None:
    session = negotiated()
    good = VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0)
    assert session.handle(msg(Request.SET_VRING_ADDR, good.encode())) == (
        VringChanged(0, VringConfig(addr=good))
    )
    for bad in (
        VringAddr(0, 0, 0x1008, 0x3000, 0x2000, 0),
        VringAddr(0, 0, 0x1000, 0x3002, 0x2000, 0),
        VringAddr(0, 0, 0x1000, 0x3000, 0x2001, 0),
        VringAddr(0, 2, 0x1000, 0x3000, 0x2000, 0),
    ):
        with pytest.raises(RequestRejected):
            session.handle(msg(Request.SET_VRING_ADDR, bad.encode()))


def test_vring_fd_requests_take_the_fd_or_honour_the_nofd_bit() -> None:
    session = negotiated()
    fd = os.eventfd(0)
    try:
        message = msg(Request.SET_VRING_CALL, VringFd(0, True).encode(), fds=[fd])
        event = session.handle(message)
        assert event == SetVringCall(0, fd)
        assert message.fds == []  # ownership moved to the event
        event = session.handle(msg(Request.SET_VRING_CALL, VringFd(0, False).encode()))
        assert event == SetVringCall(0, None)
        # One event type per role: the I/O layer need not look at the request again.
        assert session.handle(msg(Request.SET_VRING_ERR, VringFd(0, False).encode())) == (
            SetVringErr(0, None)
        )
        assert session.handle(msg(Request.SET_VRING_KICK, VringFd(0, False).encode())) == (
            SetVringKick(0, None)
        )
        with pytest.raises(MessageError):
            session.handle(msg(Request.SET_VRING_KICK, VringFd(0, True).encode()))
        with pytest.raises(MessageError, match="reserved"):
            session.handle(msg(Request.SET_VRING_KICK, U64.pack(1 << 12)))
    finally:
        os.close(fd)


def test_mem_table_decoded_with_its_fds() -> None:
    regions = [
        MemoryRegion(0, 0x10000, 0x7F0000000000, 0),
        MemoryRegion(0x100000000, 0x10000, 0x7F0000100000, 0x2000),
    ]
    fds = [os.eventfd(0), os.eventfd(0)]
    try:
        event = negotiated().handle(
            msg(Request.SET_MEM_TABLE, encode_memory_table(regions), fds=list(fds))
        )
        assert event == SetMemTable(regions, fds)
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize(
    ("regions", "match"),
    [
        ([MemoryRegion(0, 0, 0x1000, 0)], "size 0"),
        ([MemoryRegion(0, 0x2000, 0, 0), MemoryRegion(0x1000, 0x2000, 0x10000, 0)], "overlap"),
        ([MemoryRegion(0, 0x2000, 0, 0), MemoryRegion(0x10000, 0x2000, 0x1000, 0)], "overlap"),
        ([MemoryRegion(2**64 - 0x1000, 0x2000, 0, 0)], "wraps"),
        ([MemoryRegion(i * 0x1000, 0x1000, i * 0x1000, 0) for i in range(9)], "regions"),
    ],
)
def test_mem_table_validation(regions: list[MemoryRegion], match: str) -> None:
    with pytest.raises(MessageError, match=match):
        negotiated().handle(msg(Request.SET_MEM_TABLE, encode_memory_table(regions)))


def test_mem_table_fd_count_must_match() -> None:
    fd = os.eventfd(0)
    message = msg(
        Request.SET_MEM_TABLE,
        encode_memory_table(
            [MemoryRegion(0, 0x1000, 0, 0), MemoryRegion(0x1000, 0x1000, 0x1000, 0)]
        ),
        fds=[fd],
    )
    with pytest.raises(MessageError, match="fds"):
        negotiated().handle(message)
    assert message.fds == [fd]  # still the message's: the caller closes it
    message.close_fds()


def test_unknown_and_unsupported_requests_refused() -> None:
    session = negotiated()
    with pytest.raises(RequestRejected, match="unknown"):
        session.handle(msg(999))
    with pytest.raises(RequestRejected, match="not supported"):
        session.handle(msg(Request.SET_LOG_BASE, U64.pack(0)))
    with pytest.raises(MessageError, match="reserved header flags"):
        session.handle(msg(Request.SET_OWNER, flags=1 << 7))


def test_get_vring_base_event_and_reply() -> None:
    session = negotiated()
    event = session.handle(msg(Request.GET_VRING_BASE, VringState(0, 0).encode()))
    assert event == GetVringBase(0)
    reply = session.vring_base_reply(0, 77)
    assert decode_header(reply[:12]) == (Request.GET_VRING_BASE, 1 | HeaderFlags.REPLY, 8)
    assert VringState(*struct.unpack("<II", reply[12:])) == VringState(0, 77)


def test_set_vring_base_is_an_event_not_configuration() -> None:
    """Where a ring stands is run-time state (the running ring moves it): the session hands
    the VMM's base to the I/O layer and keeps no copy that could go stale."""
    session = negotiated()
    event = session.handle(msg(Request.SET_VRING_BASE, VringState(0, 0xFFFF).encode()))
    assert event == SetVringBase(0, 0xFFFF)
    assert not hasattr(session.vrings[0], "base")
    with pytest.raises(RequestRejected, match="16-bit"):
        session.handle(msg(Request.SET_VRING_BASE, VringState(0, 0x10000).encode()))


def test_wrong_payload_sizes_refused() -> None:
    session = negotiated()
    with pytest.raises(MessageError, match="expected"):
        session.handle(msg(Request.SET_VRING_NUM, b"\x04\x00\x00"))
    with pytest.raises(MessageError, match="expected"):
        session.handle(msg(Request.SET_FEATURES, b"\x00" * 4))
    with pytest.raises(MessageError, match="truncated"):
        session.handle(msg(Request.SET_MEM_TABLE, b"\x01"))


def test_reset_owner_forgets_negotiation() -> None:
    session = negotiated()
    session.handle(msg(Request.SET_VRING_NUM, VringState(0, 8).encode()))
    session.handle(msg(Request.RESET_OWNER))
    assert not session.owner and session.acked_features == 0 and session.vrings[0].size == 0
