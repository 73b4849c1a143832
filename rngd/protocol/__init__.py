"""The vhost-user wire protocol, without I/O: constants, payloads, framing and session state.

Nothing in this package touches a socket or a file descriptor's contents: it is fed bytes and fd
numbers and returns typed messages and reply bytes (the shape of h11 and wsproto).
"""

from rngd.protocol.codec import (
    Message,
    MessageError,
    MessageReader,
    ProtocolError,
    encode_message,
    encode_reply,
)
from rngd.protocol.constants import (
    HeaderFlags,
    ProtocolFeatures,
    Request,
    VirtioFeatures,
)
from rngd.protocol.payloads import MemoryRegion, VringAddr, VringFd, VringState
from rngd.protocol.session import RequestRejected, Session

__all__ = [
    "HeaderFlags",
    "MemoryRegion",
    "Message",
    "MessageError",
    "MessageReader",
    "ProtocolError",
    "ProtocolFeatures",
    "Request",
    "RequestRejected",
    "Session",
    "VirtioFeatures",
    "VringAddr",
    "VringFd",
    "VringState",
    "encode_message",
    "encode_reply",
]
