"""Framing: bytes and fds in, whole messages out; replies and requests back to bytes."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from rngd.protocol.constants import (
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    VERSION,
    HeaderFlags,
    Request,
)

_HEADER = struct.Struct("<III")
_U64 = struct.Struct("<Q")


class ProtocolError(Exception):
    """The byte stream can no longer be trusted (bad framing): the connection must be closed."""


class MessageError(Exception):
    """One message is malformed but the stream is intact: refuse it and carry on."""


@dataclass(eq=False)
class Message:
    """One request as received. It owns ``fds`` until a handler takes them (`take_fd`)."""

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return f"request {self.request}"

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.NEED_REPLY)

    def take_fd(self) -> int:
        """Hand the single fd this message carries to the caller, who must close it."""
        if len(self.fds) != 1:
            raise MessageError(f"{self.name} needs exactly one fd, got {len(self.fds)}")
        return self.fds.pop()

    def take_fds(self, count: int) -> list[int]:
        if len(self.fds) != count:
            raise MessageError(f"{self.name} needs {count} fds, got {len(self.fds)}")
        taken, self.fds = self.fds, []
        return taken

    def close_fds(self) -> None:
        """Close whatever fds no handler claimed, so that each received fd is closed once."""
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


class MessageReader:
    """Incremental framer. Feed it what the socket gave (`feed`); take messages out (`next`).

    fds are attached to the message whose bytes they arrived with: vhost-user front-ends send
    a message's fds with its first bytes, and we only ever read one message's worth at a time.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._fds: list[int] = []

    def feed(self, data: bytes, fds: Iterable[int] = ()) -> None:
        self._buffer += data
        self._fds.extend(fds)

    def wanted(self) -> int:
        """How many more bytes finish the message being read (header first, then payload)."""
        if len(self._buffer) < HEADER_SIZE:
            return HEADER_SIZE - len(self._buffer)
        _, _, size = _HEADER.unpack_from(self._buffer)
        return max(HEADER_SIZE + int(size) - len(self._buffer), 0)

    def next(self) -> Message | None:
        """The next whole message, or None until more bytes are fed.

        Raises ProtocolError for a header we cannot frame by (wrong version, oversized payload).
        """
        if len(self._buffer) < HEADER_SIZE:
            return None
        request, flags, size = _HEADER.unpack_from(self._buffer)
        if flags & HeaderFlags.VERSION_MASK != VERSION:
            self.close()
            raise ProtocolError(f"unsupported protocol version in flags {flags:#x}")
        if size > MAX_PAYLOAD_SIZE:
            self.close()
            raise ProtocolError(f"payload size {size} exceeds {MAX_PAYLOAD_SIZE}")
        end = HEADER_SIZE + size
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[HEADER_SIZE:end])
        del self._buffer[:end]
        fds, self._fds = self._fds, []
        return Message(request, flags, payload, fds)

    def pending(self) -> bool:
        """True when part of a message has arrived (a peer hanging up now truncated it)."""
        return bool(self._buffer) or bool(self._fds)

    def close(self) -> None:
        """Close fds of a message that will never complete."""
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)
        self._buffer.clear()


def encode_message(request: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """A request (front-end side) or any message: header + payload."""
    return _HEADER.pack(request, VERSION | flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    return encode_message(request, payload, HeaderFlags.REPLY)


def encode_u64(value: int) -> bytes:
    return _U64.pack(value)


def decode_u64(message: Message) -> int:
    if len(message.payload) != _U64.size:
        raise MessageError(f"{message.name}: payload of {len(message.payload)} bytes, expected 8")
    (value,) = _U64.unpack(message.payload)
    return int(value)


def decode_header(data: Sequence[int] | bytes) -> tuple[int, int, int]:
    request, flags, size = _HEADER.unpack(bytes(data))
    return int(request), int(flags), int(size)
