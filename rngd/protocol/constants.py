"""Numbers of the vhost-user wire protocol and of the virtio devices it carries.

Values are from QEMU's docs/interop/vhost-user.rst and the virtio 1.2 specification.
"""

from __future__ import annotations

import enum

HEADER_SIZE = 12
#: Largest payload we accept. The biggest message we understand is a full SET_MEM_TABLE
#: (8 + 8 * 32 bytes); anything far larger means a broken or hostile peer.
MAX_PAYLOAD_SIZE = 4096
#: VHOST_MEMORY_BASELINE_NREGIONS: the most regions (and so fds) one SET_MEM_TABLE can carry.
MAX_MEMORY_REGIONS = 8
#: GET_MAX_MEM_SLOTS: the most regions ADD_MEM_REG may build up. 509 is what QEMU's
#: libvhost-user and the kernel's vhost offer (KVM's usable memslots on x86); QEMU caps the
#: answer at its own VHOST_USER_MAX_RAM_SLOTS anyway. Each region costs one mapping, no fd
#: (the fd is closed once mapped), and a bisection in a sorted table.
MAX_MEM_SLOTS = 509
#: VHOST_USER_MAX_CONFIG_SIZE: the largest configuration space GET/SET_CONFIG may address.
MAX_CONFIG_SIZE = 256
#: Ancillary space we read per message: a little more than the largest legal number of fds, so
#: that a peer sending too many is detected (and its extra fds closed) instead of truncated.
MAX_FDS_PER_MESSAGE = 16
#: Only protocol version 1 exists.
VERSION = 0x1


class Request(enum.IntEnum):
    """Front-end to back-end request codes."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class HeaderFlags(enum.IntFlag):
    VERSION_MASK = 0x3
    REPLY = 1 << 2
    NEED_REPLY = 1 << 3


class VirtioFeatures(enum.IntFlag):
    """Device feature bits (GET_FEATURES / SET_FEATURES)."""

    NOTIFY_ON_EMPTY = 1 << 24
    ANY_LAYOUT = 1 << 27
    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    #: Not a virtio bit: vhost-user borrows it to say GET_PROTOCOL_FEATURES is understood.
    PROTOCOL_FEATURES = 1 << 30
    VERSION_1 = 1 << 32


class ProtocolFeatures(enum.IntFlag):
    """vhost-user protocol feature bits (GET_PROTOCOL_FEATURES / SET_PROTOCOL_FEATURES)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


#: What an RNG device offers; the same set as vhost-device-rng (0x171000000).
RNG_DEVICE_FEATURES = (
    VirtioFeatures.VERSION_1
    | VirtioFeatures.PROTOCOL_FEATURES
    | VirtioFeatures.RING_EVENT_IDX
    | VirtioFeatures.RING_INDIRECT_DESC
    | VirtioFeatures.NOTIFY_ON_EMPTY
)
#: vhost-device-rng 0.1.0 offers MQ alone (its GET_PROTOCOL_FEATURES answers 0x1, asked through
#: rngd.testing.Frontend); we add replies (REPLY_ACK: a failure the VMM can see, and QEMU 10
#: waits for the ack of SET_VRING_ENABLE), device reset (RESET_DEVICE, STATUS) and more than 8
#: memory regions (CONFIGURE_MEM_SLOTS). No CONFIG: virtio-rng has no configuration space.
RNG_PROTOCOL_FEATURES = (
    ProtocolFeatures.MQ
    | ProtocolFeatures.REPLY_ACK
    | ProtocolFeatures.RESET_DEVICE
    | ProtocolFeatures.CONFIGURE_MEM_SLOTS
    | ProtocolFeatures.STATUS
)
#: virtio-rng has exactly one queue ("requestq").
RNG_NUM_QUEUES = 1
#: Largest queue size we accept (the split ring allows 32768; vhost-device-rng uses 1024).
MAX_QUEUE_SIZE = 32768

#: SET_VRING_KICK/CALL/ERR payload: bits 0-7 vring index, bit 8 "no fd passed" (polling mode).
VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8
