"""The VMM side of vhost-user: a trio client that talks to a back-end as QEMU 7.2 does."""

from __future__ import annotations

import array
import errno
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

import trio

from rngd.protocol.codec import decode_header, encode_message, encode_u64
from rngd.protocol.constants import (
    HEADER_SIZE,
    VERSION,
    VRING_NOFD_MASK,
    HeaderFlags,
    ProtocolFeatures,
    Request,
    VirtioFeatures,
)
from rngd.protocol.payloads import (
    ConfigSpace,
    MemoryRegion,
    VringAddr,
    VringState,
    encode_memory_region,
    encode_memory_table,
)
from rngd.protocol.session import REQUESTS_WITH_REPLY
from rngd.testing.driver import DriverQueue
from rngd.testing.guest_memory import PAGE_SIZE, UVA_BASE, GuestMemory

#: Protocol features QEMU 7.2 knows (bits 0..16, STATUS the last): it acks the intersection
#: with the offer.
QEMU72_PROTOCOL_FEATURES = ProtocolFeatures((1 << 17) - 1)
#: Device status bits (virtio 1.2, 2.1) QEMU sets through SET_STATUS.
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8

_U64_SIZE = 8
_MAX_REPLY_FDS = 8


class BackendError(Exception):
    """The back-end refused a request (a failure ack) or answered something malformed."""


class BackendDisconnected(BackendError):
    """The back-end closed the connection."""


@dataclass(frozen=True)
class Reply:
    request: int
    flags: int
    payload: bytes

    @property
    def u64(self) -> int:
        if len(self.payload) != _U64_SIZE:
            raise BackendError(f"reply to {self.request}: {len(self.payload)} bytes, not a u64")
        return int.from_bytes(self.payload, "little")

    @property
    def ok(self) -> bool:
        """For a REPLY_ACK: zero means success."""
        return self.u64 == 0


def new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def generation_layout(generation: int, size: int = 1 << 20) -> list[MemoryRegion]:
    """The default two-region layout, moved in VMM address space for each guest boot so that
    ring addresses change across a reboot (as after a real VMM reallocated guest RAM)."""
    uva = UVA_BASE + generation * 0x10_0000_0000
    return [
        MemoryRegion(guest_phys_addr=0x0, memory_size=size, userspace_addr=uva, mmap_offset=0),
        MemoryRegion(
            guest_phys_addr=0x1_0000_0000,
            memory_size=size,
            userspace_addr=uva + 0x4000_0000,
            mmap_offset=(3 + generation % 4) * PAGE_SIZE,
        ),
    ]


class Frontend:
    """One vhost-user connection, driven like QEMU 7.2's vhost-user-rng-pci.

    Use ``async with await Frontend.connect(path) as fe`` ; leaving the block hangs up and
    closes every fd the harness created (memfds, eventfds, the socket).

    Low level: `request` sends anything (``send_raw`` even bad headers); one typed method per
    request. High level: `start_qemu72` (connect handshake + driver start), `stop`,
    `reboot`, `read_random`.
    """

    def __init__(self, sock: trio.socket.SocketType, path: str) -> None:
        self.sock = sock
        self.path = path
        #: (request, flags) of every message sent, in order.
        self.transcript: list[tuple[int, int]] = []
        self.device_features = 0
        self.protocol_features = 0
        self.acked_features = 0
        self.queue_num: int | None = None
        #: Whether GET/SET_PROTOCOL_FEATURES took place (VHOST_USER_F_PROTOCOL_FEATURES used).
        self.protocol_negotiated = False
        self.memory: GuestMemory | None = None
        self.queue: DriverQueue | None = None
        self.generation = 0
        # QEMU's notifiers: the masked-interrupt notifier it polls itself, the guest notifier
        # (irqfd) it installs last, the error notifier, and the ioeventfd kick.
        self.masked_call_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.kick_fd: int | None = None
        #: GET_MAX_MEM_SLOTS's answer, when CONFIGURE_MEM_SLOTS was negotiated.
        self.max_mem_slots: int | None = None
        #: With CONFIGURE_MEM_SLOTS: the regions the back-end has been given (ADD_MEM_REG) and
        #: not taken back (REM_MEM_REG), with their fds: QEMU's shadow table, which it diffs
        #: each new memory table against.
        self.shadow: list[tuple[MemoryRegion, int]] = []
        self._closed = False

    # -- lifetime ---------------------------------------------------------------------------

    @classmethod
    async def connect(cls, path: str) -> Frontend:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock, path)

    async def aclose(self) -> None:
        """Hang up and close everything the harness created for this connection."""
        if self._closed:
            return
        self._closed = True
        self.sock.close()
        for name in ("masked_call_fd", "call_fd", "err_fd", "kick_fd"):
            self._close_fd(getattr(self, name))
            setattr(self, name, None)
        if self.memory is not None:
            self.memory.close()
        await trio.lowlevel.checkpoint()

    @staticmethod
    def _close_fd(fd: int | None) -> None:
        if fd is not None:
            # Another task may be parked in wait_call on it.
            trio.lowlevel.notify_closing(fd)
            os.close(fd)

    async def __aenter__(self) -> Frontend:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & ProtocolFeatures.REPLY_ACK)

    # -- wire -------------------------------------------------------------------------------

    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes as they are, ``fds`` with the first of them."""
        try:
            await self._send(data, fds)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise BackendDisconnected(f"back-end hung up: {exc}") from exc

    async def _send(self, data: bytes, fds: Sequence[int]) -> None:
        view = memoryview(data)
        if fds:
            sent = await self.sock.sendmsg(
                [view],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())],
            )
            view = view[sent:]
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]

    async def _recv_exact(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            try:
                chunk, ancdata, _flags, _addr = await self.sock.recvmsg(
                    size - len(data), socket.CMSG_SPACE(_MAX_REPLY_FDS * 4)
                )
            except ConnectionResetError as exc:
                raise BackendDisconnected(f"back-end reset the connection: {exc}") from exc
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    for fd in fds:
                        os.close(fd)
            if not chunk:
                raise BackendDisconnected(f"back-end hung up ({len(data)}/{size} bytes read)")
            data += chunk
        return bytes(data)

    async def recv_reply(self, request: int | None = None) -> Reply:
        """Read one reply; check its header (version, REPLY bit, and ``request`` if given)."""
        code, flags, size = decode_header(await self._recv_exact(HEADER_SIZE))
        payload = await self._recv_exact(size)
        if flags & HeaderFlags.VERSION_MASK != VERSION or not flags & HeaderFlags.REPLY:
            raise BackendError(f"reply to {code} has flags {flags:#x}")
        if request is not None and code != request:
            raise BackendError(f"reply to {code} while waiting for the reply to {request}")
        return Reply(code, flags, payload)

    async def expect_eof(self) -> None:
        """Wait until the back-end hangs up; fail if it sends anything first."""
        data = await self.sock.recv(1)
        if data:
            raise BackendError(f"expected EOF, got {data!r}")

    async def request(
        self,
        request: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        need_reply: bool = False,
        flags: int | None = None,
        expect_reply: bool | None = None,
    ) -> Reply | None:
        """Send any request and read its reply when one is due.

        ``flags`` replaces the header flags (the version is always set; build bytes for
        `send_raw` to break it). A reply is read when the request has one, or NEED_REPLY was
        set and REPLY_ACK agreed, unless ``expect_reply`` says otherwise.
        """
        header_flags = (HeaderFlags.NEED_REPLY if need_reply else 0) if flags is None else flags
        self.transcript.append((request, header_flags))
        await self.send_raw(encode_message(request, payload, header_flags), fds)
        if expect_reply is None:
            expect_reply = request in REQUESTS_WITH_REPLY or bool(
                header_flags & HeaderFlags.NEED_REPLY and self.reply_ack
            )
        if not expect_reply:
            return None
        return await self.recv_reply(request)

    async def _set(
        self, request: Request, payload: bytes, fds: Sequence[int] = (), need_reply: bool = False
    ) -> None:
        reply = await self.request(request, payload, fds, need_reply=need_reply)
        if reply is not None and not reply.ok:
            raise BackendError(f"{request.name} refused (ack {reply.u64})")

    async def _get_u64(self, request: Request) -> int:
        reply = await self.request(request)
        assert reply is not None
        return reply.u64

    async def settle(self) -> None:
        """Return once the daemon has handled every message sent so far, those that ask
        for no reply included (QEMU sends SET_VRING_CALL that way, and a guest may read
        before the daemon has taken it). One connection's messages are handled in order, so
        the reply to a request sent now proves it."""
        await self._get_u64(Request.GET_FEATURES)

    # -- one method per request -------------------------------------------------------------

    async def get_features(self) -> int:
        self.device_features = await self._get_u64(Request.GET_FEATURES)
        return self.device_features

    async def set_features(self, features: int, *, need_reply: bool = False) -> None:
        await self._set(Request.SET_FEATURES, encode_u64(features), need_reply=need_reply)
        self.acked_features = features

    async def get_protocol_features(self) -> int:
        return await self._get_u64(Request.GET_PROTOCOL_FEATURES)

    async def set_protocol_features(self, features: int, *, need_reply: bool = False) -> None:
        await self._set(Request.SET_PROTOCOL_FEATURES, encode_u64(features), need_reply=need_reply)
        self.protocol_features = features

    async def get_queue_num(self) -> int:
        self.queue_num = await self._get_u64(Request.GET_QUEUE_NUM)
        return self.queue_num

    async def set_owner(self, *, need_reply: bool = False) -> None:
        await self._set(Request.SET_OWNER, b"", need_reply=need_reply)

    async def reset_owner(self, *, need_reply: bool = False) -> None:
        """RESET_OWNER: the back-end forgets the owner's memory too, so the shadow table goes."""
        await self._set(Request.RESET_OWNER, b"", need_reply=need_reply)
        self.shadow.clear()

    async def set_mem_table(self, memory: GuestMemory, *, need_reply: bool = False) -> None:
        await self._set(
            Request.SET_MEM_TABLE, encode_memory_table(memory.table), memory.fds, need_reply
        )

    async def set_vring_num(self, index: int, num: int, *, need_reply: bool = False) -> None:
        await self._set(Request.SET_VRING_NUM, VringState(index, num).encode(), (), need_reply)

    async def set_vring_base(self, index: int, base: int, *, need_reply: bool = False) -> None:
        await self._set(Request.SET_VRING_BASE, VringState(index, base).encode(), (), need_reply)

    async def get_vring_base(self, index: int) -> int:
        """Stop vring ``index``; return the next avail index the back-end would process."""
        reply = await self.request(Request.GET_VRING_BASE, VringState(index, 0).encode())
        assert reply is not None
        if len(reply.payload) != 8:
            raise BackendError(f"GET_VRING_BASE reply of {len(reply.payload)} bytes")
        state = VringState(*(int.from_bytes(reply.payload[i : i + 4], "little") for i in (0, 4)))
        if state.index != index:
            raise BackendError(f"GET_VRING_BASE answered for vring {state.index}, not {index}")
        return state.num

    async def set_vring_addr(self, addr: VringAddr, *, need_reply: bool = False) -> None:
        await self._set(Request.SET_VRING_ADDR, addr.encode(), (), need_reply)

    async def _set_vring_fd(
        self, request: Request, index: int, fd: int | None, need_reply: bool
    ) -> None:
        value = index | (VRING_NOFD_MASK if fd is None else 0)
        await self._set(request, encode_u64(value), () if fd is None else (fd,), need_reply)

    async def set_vring_kick(self, index: int, fd: int | None, *, need_reply: bool = False) -> None:
        """``fd`` None sends the "no fd" bit (polling mode)."""
        await self._set_vring_fd(Request.SET_VRING_KICK, index, fd, need_reply)

    async def set_vring_call(self, index: int, fd: int | None, *, need_reply: bool = False) -> None:
        await self._set_vring_fd(Request.SET_VRING_CALL, index, fd, need_reply)

    async def set_vring_err(self, index: int, fd: int | None, *, need_reply: bool = False) -> None:
        await self._set_vring_fd(Request.SET_VRING_ERR, index, fd, need_reply)

    async def set_vring_enable(self, index: int, enable: bool, *, need_reply: bool = False) -> None:
        await self._set(
            Request.SET_VRING_ENABLE, VringState(index, int(enable)).encode(), (), need_reply
        )

    async def get_max_mem_slots(self) -> int:
        return await self._get_u64(Request.GET_MAX_MEM_SLOTS)

    async def add_mem_reg(self, region: MemoryRegion, fd: int, *, need_reply: bool = False) -> None:
        await self._set(Request.ADD_MEM_REG, encode_memory_region(region), (fd,), need_reply)

    async def rem_mem_reg(
        self, region: MemoryRegion, fd: int | None = None, *, need_reply: bool = False
    ) -> None:
        """``fd``: QEMU sends the region's fd along (the specification tolerates it)."""
        fds = () if fd is None else (fd,)
        await self._set(Request.REM_MEM_REG, encode_memory_region(region), fds, need_reply)

    async def reset_device(self, *, need_reply: bool = False) -> None:
        await self._set(Request.RESET_DEVICE, b"", need_reply=need_reply)

    async def get_status(self) -> int:
        return await self._get_u64(Request.GET_STATUS)

    async def set_status(self, status: int, *, need_reply: bool = False) -> None:
        await self._set(Request.SET_STATUS, encode_u64(status), need_reply=need_reply)

    async def add_status(self, status: int) -> None:
        """QEMU's vhost_user_add_status: GET_STATUS, then SET_STATUS with ``status`` added
        unless it is there already."""
        current = await self.get_status()
        if current & status != status:
            await self.set_status(current | status, need_reply=self.reply_ack)

    async def get_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG as QEMU sends it; returns the reply's payload as it came (a back-end
        without such bytes answers an empty payload)."""
        payload = ConfigSpace(offset, size, 0, bytes(size)).encode()
        reply = await self.request(Request.GET_CONFIG, payload)
        assert reply is not None
        return reply.payload

    async def set_config(self, offset: int, data: bytes, *, need_reply: bool = False) -> None:
        payload = ConfigSpace(offset, len(data), 0, data).encode()
        await self._set(Request.SET_CONFIG, payload, need_reply=need_reply)

    async def set_memory(self, memory: GuestMemory, *, need_reply: bool = False) -> None:
        """Give the back-end ``memory`` as QEMU 7.2's vhost_user_set_mem_table does: one
        SET_MEM_TABLE, or with CONFIGURE_MEM_SLOTS a REM_MEM_REG for each region of the shadow
        table that is gone and then an ADD_MEM_REG for each new one (nothing if nothing
        changed). A region is the same if its addresses, size and fd are."""
        if not self.protocol_features & ProtocolFeatures.CONFIGURE_MEM_SLOTS:
            await self.set_mem_table(memory, need_reply=need_reply)
            return
        wanted = list(zip(memory.table, memory.fds, strict=True))
        for region, fd in list(self.shadow):
            if (region, fd) not in wanted:
                await self.rem_mem_reg(region, fd, need_reply=need_reply)
                self.shadow.remove((region, fd))
        for region, fd in wanted:
            if (region, fd) not in self.shadow:
                await self.add_mem_reg(region, fd, need_reply=need_reply)
                self.shadow.append((region, fd))

    # -- QEMU 7.2 sequences -----------------------------------------------------------------

    async def handshake(
        self,
        *,
        protocol_features: bool = True,
        supported_protocol_features: int = QEMU72_PROTOCOL_FEATURES,
    ) -> None:
        """What QEMU sends on connect (vhost_dev_init): features, protocol features, queue
        count (with MQ), owner, and features again."""
        await self.get_features()
        self.protocol_features = 0
        self.protocol_negotiated = False
        if protocol_features and self.device_features & VirtioFeatures.PROTOCOL_FEATURES:
            self.protocol_negotiated = True
            offered = await self.get_protocol_features()
            await self.set_protocol_features(offered & supported_protocol_features)
            if self.protocol_features & ProtocolFeatures.MQ:
                await self.get_queue_num()
            if self.protocol_features & ProtocolFeatures.CONFIGURE_MEM_SLOTS:
                self.max_mem_slots = await self.get_max_mem_slots()
        await self.set_owner()
        await self.get_features()

    def prepare_driver(
        self,
        queue_size: int = 4,
        *,
        event_idx: bool = True,
        layout: Sequence[MemoryRegion] | None = None,
        ring_region: int | None = None,
    ) -> DriverQueue:
        """Lay out fresh guest memory and a ring for the next `start` (no messages yet).

        Buffers posted on the returned queue before `start` are in the ring when the
        back-end first looks at it: QEMU's kick starts signalled, so they must be served.
        """
        memory = GuestMemory(generation_layout(self.generation) if layout is None else layout)
        region = (1 + self.generation) % len(memory.regions) if ring_region is None else ring_region
        return DriverQueue(memory, queue_size, event_idx=event_idx, ring_region=region)

    async def start(
        self,
        queue: DriverQueue | None = None,
        *,
        event_idx: bool = True,
        indirect: bool = True,
        queue_size: int = 4,
        base: int | None = 0,
        wait_enable: bool = False,
    ) -> DriverQueue:
        """The guest driver starts the device: QEMU 7.2's vhost_dev_start sequence (as it
        goes on the wire against rngd, which offers STATUS and CONFIGURE_MEM_SLOTS).

        ``base`` None leaves SET_VRING_BASE out (the back-end's own idea of the base holds).
        ``wait_enable`` asks for a reply to SET_VRING_ENABLE, as QEMU 10 does.
        """
        if queue is None:
            queue = self.prepare_driver(queue_size, event_idx=event_idx)
        if queue.event_idx != event_idx:
            raise ValueError("the queue's event_idx and the features to ack disagree")
        for name in ("masked_call_fd", "call_fd", "err_fd"):
            if getattr(self, name) is None:
                setattr(self, name, new_eventfd())
        assert self.masked_call_fd is not None and self.call_fd is not None
        old_memory, old_kick = self.memory, self.kick_fd
        self.memory, self.queue = queue.memory, queue
        self.kick_fd = new_eventfd()
        self._close_fd(old_kick)
        queue.kick_fd, queue.call_fd = self.kick_fd, self.call_fd
        queue.masked_call_fd = self.masked_call_fd
        # The guest wants calls from the start (Linux enables callbacks when it adds the vq).
        queue.enable_calls(True)

        guest = VirtioFeatures.VERSION_1
        if event_idx:
            guest |= VirtioFeatures.RING_EVENT_IDX
        if indirect:
            guest |= VirtioFeatures.RING_INDIRECT_DESC
        features = self.device_features & guest
        if self.protocol_negotiated:
            # QEMU keeps the back-end-only bit in SET_FEATURES: it is what makes rings start
            # disabled until SET_VRING_ENABLE.
            features |= VirtioFeatures.PROTOCOL_FEATURES
        index = queue.index
        await self.set_vring_call(index, self.masked_call_fd)
        await self.set_vring_err(index, self.err_fd)
        await self.set_vring_call(index, self.masked_call_fd)
        await self.set_features(features)
        if self.protocol_features & ProtocolFeatures.STATUS:
            await self.add_status(STATUS_FEATURES_OK)
        await self.set_memory(queue.memory, need_reply=self.reply_ack)
        if old_memory is not None and old_memory is not queue.memory:
            old_memory.close()
        await self.set_vring_num(index, queue.size)
        if base is not None:
            await self.set_vring_base(index, base)
        await self.set_vring_addr(queue.vring_addr())
        os.write(self.kick_fd, (1).to_bytes(8, "little"))
        await self.set_vring_kick(index, self.kick_fd)
        if features & VirtioFeatures.PROTOCOL_FEATURES:
            await self.set_vring_enable(index, True, need_reply=wait_enable and self.reply_ack)
        await self.set_vring_call(index, self.call_fd)
        return queue

    async def start_qemu72(
        self,
        queue_size: int = 4,
        *,
        event_idx: bool = True,
        indirect: bool = True,
        protocol_features: bool = True,
        prepare: Callable[[DriverQueue], None] | None = None,
    ) -> DriverQueue:
        """Connect handshake then driver start, exactly as QEMU 7.2 with a Linux guest.

        ``prepare`` is called with the laid-out queue before the back-end learns of it (to
        post buffers that must be served without a kick of their own).
        """
        await self.handshake(protocol_features=protocol_features)
        queue = self.prepare_driver(queue_size, event_idx=event_idx)
        if prepare is not None:
            prepare(queue)
        return await self.start(queue, event_idx=event_idx, indirect=indirect)

    async def stop(self) -> int:
        """The guest resets the device: disable, GET_VRING_BASE, back to the masked notifier.
        Returns the back-end's next avail index."""
        if self.queue is None:
            raise RuntimeError("not started")
        index = self.queue.index
        if self.acked_features & VirtioFeatures.PROTOCOL_FEATURES:
            await self.set_vring_enable(index, False)
        base = await self.get_vring_base(index)
        await self.set_vring_call(index, self.masked_call_fd)
        return base

    async def reboot(
        self,
        queue_size: int | None = None,
        *,
        event_idx: bool | None = None,
        indirect: bool = True,
        prepare: Callable[[DriverQueue], None] | None = None,
    ) -> tuple[int, DriverQueue]:
        """A guest reboot on the same connection: `stop`, then a full `start` with new guest
        memory (new memfds), new ring addresses, a new kick eventfd and base 0.

        Returns the base GET_VRING_BASE answered and the new queue.
        """
        if self.queue is None:
            raise RuntimeError("not started")
        old = self.queue
        base = await self.stop()
        self.generation += 1
        event_idx = old.event_idx if event_idx is None else event_idx
        queue = self.prepare_driver(
            old.size if queue_size is None else queue_size, event_idx=event_idx
        )
        if prepare is not None:
            prepare(queue)
        await self.start(queue, event_idx=event_idx, indirect=indirect, base=0)
        return base, queue

    async def read_random(
        self,
        nbytes: int,
        chunk: int = 64,
        *,
        in_flight: int | None = 1,
        segments: int = 1,
        indirect: bool = False,
    ) -> bytes:
        """`DriverQueue.read_random` on the started queue."""
        if self.queue is None:
            raise RuntimeError("not started")
        return await self.queue.read_random(
            nbytes, chunk, in_flight=in_flight, segments=segments, indirect=indirect
        )


async def connect_when_listening(path: str, *, timeout: float = 5.0) -> Frontend:
    """Connect, retrying while the socket is not there yet or not listening."""
    with trio.fail_after(timeout):
        while True:
            try:
                return await Frontend.connect(path)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                    raise
            await trio.sleep(0.005)
