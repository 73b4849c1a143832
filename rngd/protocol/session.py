"""The back-end's view of one vhost-user connection, without I/O.

`Session.handle` decodes and validates a request against what has been negotiated so far,
records the configuration it carries and returns an *event* saying what, if anything, the I/O
layer must do about it (map memory, swap an fd, stop a ring). Requests that need nothing but an
answer are answered here. Replies go through `Session.ack` so that REPLY_ACK is honoured in one
place.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from rngd.protocol.codec import Message, MessageError, decode_u64, encode_reply, encode_u64
from rngd.protocol.constants import (
    MAX_MEM_SLOTS,
    MAX_QUEUE_SIZE,
    RNG_DEVICE_FEATURES,
    RNG_NUM_QUEUES,
    RNG_PROTOCOL_FEATURES,
    HeaderFlags,
    ProtocolFeatures,
    Request,
    VirtioFeatures,
)
from rngd.protocol.payloads import (
    ConfigSpace,
    MemoryRegion,
    VringAddr,
    VringFd,
    VringState,
    check_regions,
    decode_memory_region,
    decode_memory_table,
)


class RequestRejected(MessageError):
    """A well-formed request that is not acceptable now (bad index, wrong order, ...)."""


#: Requests whose reply carries data: the front-end blocks on it, so we must always answer
#: (or hang up, if we cannot).
REQUESTS_WITH_REPLY = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_VRING_BASE,
        Request.GET_QUEUE_NUM,
        Request.GET_CONFIG,
        Request.GET_INFLIGHT_FD,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_STATUS,
        Request.GET_SHARED_OBJECT,
        Request.SET_LOG_BASE,
        Request.POSTCOPY_ADVISE,
        Request.SET_DEVICE_STATE_FD,
        Request.CHECK_DEVICE_STATE,
    }
)


# int(): ~ on an IntFlag only inverts within the defined bits, hiding unknown ones.
_REQUEST_FLAGS = int(HeaderFlags.VERSION_MASK | HeaderFlags.NEED_REPLY)


@dataclass(frozen=True)
class VringConfig:
    """What the front-end has told us about one vring (addresses are not yet translated).

    A request that changes it proposes the whole new value (`VringChanged`); the session
    holds it only once the I/O layer has carried it out (`Session.vring_configured`), so a
    refused request leaves the configuration as it was.

    Where the ring stands (its next avail index) is not configuration: SET_VRING_BASE sets it
    and the running ring moves it, so the I/O layer keeps it with the ring's other run-time
    state (see `SetVringBase`).
    """

    size: int = 0
    addr: VringAddr | None = None
    enabled: bool = False


# Events for the I/O layer. Each is answered with `Session.ack` once acted on (GetVringBase with
# `Session.vring_base_reply`).


@dataclass(frozen=True)
class Reply:
    """Nothing to do but send `data` (None: nothing to send)."""

    data: bytes | None


@dataclass(frozen=True)
class SetMemTable:
    regions: list[MemoryRegion]
    fds: list[int]


@dataclass(frozen=True)
class SetVringKick:
    """A new kick fd for the ring (None: the front-end asked for polling mode). The I/O layer
    owns `fd` from here on, and closes it if it refuses it."""

    index: int
    fd: int | None


@dataclass(frozen=True)
class SetVringCall:
    """A new call fd (None: no fd, the front-end polls the used ring); the I/O layer's."""

    index: int
    fd: int | None


@dataclass(frozen=True)
class SetVringErr:
    """A new err fd (None: no fd); the I/O layer's."""

    index: int
    fd: int | None


@dataclass(frozen=True)
class SetVringBase:
    """The ring's next avail index is `base` from now on (the I/O layer stops the ring first,
    so that where a running ring stood does not overwrite it, then starts it from there)."""

    index: int
    base: int


@dataclass(frozen=True)
class GetVringBase:
    index: int


@dataclass(frozen=True)
class VringChanged:
    """SET_VRING_NUM, SET_VRING_ADDR or SET_VRING_ENABLE proposes `config` for the ring: the
    I/O layer refuses it (nothing changed) or starts or stops the ring accordingly and then
    records it with `Session.vring_configured`."""

    index: int
    config: VringConfig


@dataclass(frozen=True)
class RingOptionsChanged:
    """SET_FEATURES changed how a ring is served (EVENT_IDX, INDIRECT_DESC, NOTIFY_ON_EMPTY)
    or enabled every ring (the first, without PROTOCOL_FEATURES). The features are recorded;
    the I/O layer restarts the rings so that each runs, or not, as configured now."""


@dataclass(frozen=True)
class ResetOwner:
    pass


@dataclass(frozen=True)
class ResetDevice:
    """RESET_DEVICE, or SET_STATUS 0: stop every ring and forget its fds and where it stood.
    The owner, the protocol features and the memory regions stay (the front-end does not
    send its memory again after a reset: with CONFIGURE_MEM_SLOTS it sends only changes)."""


@dataclass(frozen=True)
class AddMemReg:
    """Map `region` from `fd` (the I/O layer's to close) and report it with `memory_mapped`."""

    region: MemoryRegion
    fd: int


@dataclass(frozen=True)
class RemMemReg:
    """Unmap `region` (as it was added) and report it with `memory_mapped`. `fd` is one QEMU
    sends along for no use (the specification tolerates it): the I/O layer closes it."""

    region: MemoryRegion
    fd: int | None


Event = (
    Reply
    | SetMemTable
    | SetVringKick
    | SetVringCall
    | SetVringErr
    | SetVringBase
    | GetVringBase
    | VringChanged
    | RingOptionsChanged
    | ResetOwner
    | ResetDevice
    | AddMemReg
    | RemMemReg
)

#: The negotiated features a running ring's queue is built with (rngd.virtqueue.SplitQueue).
RING_OPTIONS = int(
    VirtioFeatures.RING_EVENT_IDX
    | VirtioFeatures.RING_INDIRECT_DESC
    | VirtioFeatures.NOTIFY_ON_EMPTY
)

#: Device status bits (virtio 1.2, 2.1) fit in a byte; anything above is not a status.
_STATUS_MASK = 0xFF


@dataclass
class Session:
    device_features: int = int(RNG_DEVICE_FEATURES)
    protocol_features: int = int(RNG_PROTOCOL_FEATURES)
    num_queues: int = RNG_NUM_QUEUES
    max_queue_size: int = MAX_QUEUE_SIZE
    acked_features: int = 0
    acked_protocol_features: int = 0
    owner: bool = False
    features_set: bool = False
    vrings: list[VringConfig] = field(default_factory=list)
    #: The device status byte SET_STATUS last gave (0 after a reset), for GET_STATUS.
    status: int = 0
    max_mem_slots: int = MAX_MEM_SLOTS
    #: The regions the I/O layer has mapped, as it reports them (`memory_mapped`): what
    #: ADD_MEM_REG and REM_MEM_REG are checked against.
    regions: list[MemoryRegion] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.vrings = [VringConfig() for _ in range(self.num_queues)]

    # --- negotiated state, as the I/O layer needs it ---

    def has_feature(self, bit: VirtioFeatures) -> bool:
        return bool(self.acked_features & bit)

    @property
    def reply_ack(self) -> bool:
        return bool(self.acked_protocol_features & ProtocolFeatures.REPLY_ACK)

    def vring_configured(self, index: int, config: VringConfig) -> None:
        """The I/O layer has carried out `VringChanged(index, config)`."""
        self.vrings[index] = config

    def memory_mapped(self, regions: list[MemoryRegion]) -> None:
        """The I/O layer has mapped exactly `regions` (after SET_MEM_TABLE, ADD_MEM_REG or
        REM_MEM_REG succeeded, or memory was dropped)."""
        self.regions = list(regions)

    # --- replies ---

    def ack(self, message: Message, ok: bool) -> bytes | None:
        """The REPLY_ACK answer to a request without a reply of its own, if one is due."""
        if message.need_reply and self.reply_ack and message.request not in REQUESTS_WITH_REPLY:
            return encode_reply(message.request, encode_u64(0 if ok else 1))
        return None

    def vring_base_reply(self, index: int, next_avail: int) -> bytes:
        return encode_reply(Request.GET_VRING_BASE, VringState(index, next_avail).encode())

    # --- dispatch ---

    def handle(self, message: Message) -> Event:
        """Validate and record `message`; raises MessageError (or RequestRejected) to refuse."""
        try:
            request = Request(message.request)
        except ValueError:
            raise RequestRejected(f"unknown request code {message.request}") from None
        unknown_flags = message.flags & ~_REQUEST_FLAGS
        if unknown_flags:
            raise MessageError(f"{request.name}: reserved header flags {unknown_flags:#x} set")
        handler = getattr(self, f"_on_{request.name.lower()}", None)
        if handler is None:
            raise RequestRejected(f"{request.name} is not supported by an RNG device")
        event: Event = handler(message)
        return event

    def _u64_reply(self, message: Message, value: int) -> Reply:
        self._no_payload(message)
        return Reply(encode_reply(message.request, encode_u64(value)))

    @staticmethod
    def _no_payload(message: Message) -> None:
        # QEMU sends GET_VRING_BASE with a vring state; the plain GETs carry nothing (some
        # front-ends send a zero u64 anyway, which is harmless).
        if len(message.payload) not in (0, 8) or any(message.payload):
            raise MessageError(f"{message.name}: unexpected payload of {len(message.payload)}")

    def _vring(self, index: int, message: Message) -> VringConfig:
        if not 0 <= index < self.num_queues:
            raise RequestRejected(f"{message.name}: vring index {index} out of range")
        return self.vrings[index]

    def _on_get_features(self, message: Message) -> Event:
        return self._u64_reply(message, self.device_features)

    def _on_set_features(self, message: Message) -> Event:
        features = decode_u64(message)
        if features & ~self.device_features:
            raise RequestRejected(
                f"SET_FEATURES {features:#x} acks bits we never offered "
                f"({features & ~self.device_features:#x})"
            )
        # Nothing the I/O layer does with this can fail (a ring that cannot start stays
        # stopped, as after a memory change), so the features are recorded here.
        changed = (self.acked_features ^ features) & RING_OPTIONS
        self.acked_features = features
        enable = not self.features_set and not features & VirtioFeatures.PROTOCOL_FEATURES
        self.features_set = True
        if enable:
            # Without PROTOCOL_FEATURES there is no SET_VRING_ENABLE: rings start enabled.
            self.vrings = [replace(vring, enabled=True) for vring in self.vrings]
        if changed or enable:
            return RingOptionsChanged()
        return Reply(None)

    def _on_get_protocol_features(self, message: Message) -> Event:
        return self._u64_reply(message, self.protocol_features)

    def _on_set_protocol_features(self, message: Message) -> Event:
        features = decode_u64(message)
        if features & ~self.protocol_features:
            raise RequestRejected(f"SET_PROTOCOL_FEATURES {features:#x} acks bits we never offered")
        self.acked_protocol_features = features
        return Reply(None)

    def _on_get_queue_num(self, message: Message) -> Event:
        return self._u64_reply(message, self.num_queues)

    def _on_set_owner(self, message: Message) -> Event:
        self._no_payload(message)
        # QEMU sets the owner once per connection; a repeat is harmless, so accept it.
        self.owner = True
        return Reply(None)

    def _on_reset_owner(self, message: Message) -> Event:
        self._no_payload(message)
        self.owner = False
        self.acked_features = 0
        self.features_set = False
        self.status = 0
        self.vrings = [VringConfig() for _ in range(self.num_queues)]
        return ResetOwner()

    def _require(self, bit: ProtocolFeatures, message: Message) -> None:
        if not self.acked_protocol_features & bit:
            raise RequestRejected(f"{message.name} without {bit.name} negotiated")

    def _reset_device(self) -> ResetDevice:
        """Back to the state after SET_OWNER: no virtio features, no ring configuration, status
        0. PROTOCOL_FEATURES is not a virtio feature but the connection's (it says rings start
        disabled and SET_VRING_ENABLE exists), so it stays acked, like the protocol features."""
        self.acked_features &= int(VirtioFeatures.PROTOCOL_FEATURES)
        self.features_set = False
        self.status = 0
        self.vrings = [VringConfig() for _ in range(self.num_queues)]
        return ResetDevice()

    def _on_reset_device(self, message: Message) -> Event:
        self._require(ProtocolFeatures.RESET_DEVICE, message)
        self._no_payload(message)
        return self._reset_device()

    def _on_set_status(self, message: Message) -> Event:
        self._require(ProtocolFeatures.STATUS, message)
        status = decode_u64(message)
        if status & ~_STATUS_MASK:
            raise RequestRejected(f"SET_STATUS {status:#x} is not a device status byte")
        if status == 0:
            # Writing 0 to the device status is how a virtio driver resets the device.
            return self._reset_device()
        self.status = status
        return Reply(None)

    def _on_get_status(self, message: Message) -> Event:
        # A query is answered even without STATUS negotiated: an answer beats a hang-up.
        return self._u64_reply(message, self.status)

    def _on_get_config(self, message: Message) -> Event:
        ConfigSpace.decode(message)
        # virtio-rng has no configuration space, so no bytes of it can be read. The
        # specification's answer to a GET_CONFIG the back-end cannot serve is a reply with an
        # empty payload ("zero length of payload to indicate an error").
        return Reply(encode_reply(message.request, b""))

    def _on_set_config(self, message: Message) -> Event:
        config = ConfigSpace.decode(message)
        raise RequestRejected(
            f"SET_CONFIG of {config.size} bytes at offset {config.offset}: an RNG device has "
            "no configuration space"
        )

    def _on_get_max_mem_slots(self, message: Message) -> Event:
        return self._u64_reply(message, self.max_mem_slots)

    def _on_add_mem_reg(self, message: Message) -> Event:
        self._require(ProtocolFeatures.CONFIGURE_MEM_SLOTS, message)
        region = decode_memory_region(message)
        if len(self.regions) >= self.max_mem_slots:
            raise RequestRejected(f"ADD_MEM_REG: all {self.max_mem_slots} slots are in use")
        check_regions([*self.regions, region])
        return AddMemReg(region, message.take_fd())

    def _on_rem_mem_reg(self, message: Message) -> Event:
        self._require(ProtocolFeatures.CONFIGURE_MEM_SLOTS, message)
        wanted = decode_memory_region(message)
        if len(message.fds) > 1:
            raise MessageError(f"REM_MEM_REG with {len(message.fds)} fds")
        # Identified by guest address, VMM address and size; the mmap offset is not compared.
        for region in self.regions:
            if (region.guest_phys_addr, region.userspace_addr, region.memory_size) == (
                wanted.guest_phys_addr,
                wanted.userspace_addr,
                wanted.memory_size,
            ):
                return RemMemReg(region, message.take_fd() if message.fds else None)
        raise RequestRejected(
            f"REM_MEM_REG: no region at gpa {wanted.guest_phys_addr:#x} "
            f"(uva {wanted.userspace_addr:#x}, size {wanted.memory_size:#x})"
        )

    def _on_set_mem_table(self, message: Message) -> Event:
        regions = decode_memory_table(message)
        fds = message.take_fds(len(regions))
        return SetMemTable(regions, fds)

    def _on_set_vring_num(self, message: Message) -> Event:
        state = VringState.decode(message)
        vring = self._vring(state.index, message)
        size = state.num
        if not 1 <= size <= self.max_queue_size or size & (size - 1):
            raise RequestRejected(
                f"SET_VRING_NUM {size}: queue size must be a power of two "
                f"in 1..{self.max_queue_size}"
            )
        return VringChanged(state.index, replace(vring, size=size))

    def _on_set_vring_base(self, message: Message) -> Event:
        state = VringState.decode(message)
        self._vring(state.index, message)
        if state.num > 0xFFFF:
            raise RequestRejected(f"SET_VRING_BASE {state.num} is not a 16-bit ring index")
        return SetVringBase(state.index, state.num)

    def _on_set_vring_addr(self, message: Message) -> Event:
        addr = VringAddr.decode(message)
        vring = self._vring(addr.index, message)
        if addr.flags & ~1:
            raise RequestRejected(f"SET_VRING_ADDR: unknown flags {addr.flags:#x}")
        # Split-ring alignment: descriptors 16, used ring 4, avail ring 2 (virtio 1.2, 2.7).
        if addr.desc % 16 or addr.used % 4 or addr.avail % 2:
            raise RequestRejected(
                f"SET_VRING_ADDR: misaligned ring (desc {addr.desc:#x}, "
                f"avail {addr.avail:#x}, used {addr.used:#x})"
            )
        return VringChanged(addr.index, replace(vring, addr=addr))

    def _on_get_vring_base(self, message: Message) -> Event:
        state = VringState.decode(message)
        self._vring(state.index, message)
        return GetVringBase(state.index)

    def _vring_fd(self, message: Message) -> tuple[int, int | None]:
        """The ring index and the fd (None: the 'no fd' bit) of SET_VRING_KICK/CALL/ERR."""
        target = VringFd.decode(message)
        # Index first: a refused message must still have its fd closed by the caller.
        self._vring(target.index, message)
        if target.has_fd:
            return target.index, message.take_fd()
        if message.fds:
            raise MessageError(f"{message.name}: 'no fd' bit set but an fd was sent")
        return target.index, None

    def _on_set_vring_kick(self, message: Message) -> Event:
        return SetVringKick(*self._vring_fd(message))

    def _on_set_vring_call(self, message: Message) -> Event:
        return SetVringCall(*self._vring_fd(message))

    def _on_set_vring_err(self, message: Message) -> Event:
        return SetVringErr(*self._vring_fd(message))

    def _on_set_vring_enable(self, message: Message) -> Event:
        state = VringState.decode(message)
        vring = self._vring(state.index, message)
        if not self.acked_features & VirtioFeatures.PROTOCOL_FEATURES:
            raise RequestRejected("SET_VRING_ENABLE without PROTOCOL_FEATURES negotiated")
        if state.num not in (0, 1):
            raise RequestRejected(f"SET_VRING_ENABLE {state.num}: must be 0 or 1")
        return VringChanged(state.index, replace(vring, enabled=bool(state.num)))
