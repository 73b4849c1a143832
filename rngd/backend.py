"""One vhost-user connection: the I/O half of the session, and its vrings' kick-handler tasks.

The protocol task reads messages, lets the sans-I/O `Session` validate and record them, then
acts on the resulting event: maps memory, swaps eventfds, starts and stops vrings. Each started
vring runs `RngDevice.run` in its own cancel scope inside the connection's nursery, so stopping
one ring is cancelling one scope, and a disconnect is cancelling the nursery.
"""

from __future__ import annotations

import array
import logging
import os
import socket
from dataclasses import dataclass, field

import trio

from rngd.device import Budget, EventfdError, Notifier, serve_vring
from rngd.incidents import IncidentLog
from rngd.memory import GuestMemory, GuestMemoryError
from rngd.observe import ConnectionCounters, Peer, describe
from rngd.protocol.codec import Message, MessageError, MessageReader, ProtocolError
from rngd.protocol.constants import (
    MAX_FDS_PER_MESSAGE,
    ProtocolFeatures,
    Request,
    VirtioFeatures,
)
from rngd.protocol.payloads import MemoryRegion
from rngd.protocol.session import (
    REQUESTS_WITH_REPLY,
    AddMemReg,
    Event,
    GetVringBase,
    RemMemReg,
    Reply,
    RequestRejected,
    ResetDevice,
    ResetOwner,
    Session,
    SetMemTable,
    SetVringBase,
    SetVringFd,
    VringChanged,
)
from rngd.source import EntropySource, GuestMemoryFault, SourceError
from rngd.threads import ThreadStartError
from rngd.virtqueue import RingError, SplitQueue

log = logging.getLogger(__name__)

_FD_SIZE = array.array("i").itemsize
_ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _FD_SIZE)
_FD_ROLE = {
    Request.SET_VRING_KICK: "kick",
    Request.SET_VRING_CALL: "call",
    Request.SET_VRING_ERR: "err",
}


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _check_vring_fd(fd: int, what: str) -> None:
    """Refuse (RequestRejected) a kick/call/err fd that is not a plain eventfd, and make an
    accepted one non-blocking.

    Nothing else is safe to poll, read and write from the ring path: a pipe or a file can
    block, stay readable for ever (a pipe at end of file) or fail later; a directory cannot be
    written at all. fstat cannot tell an eventfd from other anonymous inodes; its /proc link
    can. A semaphore-mode eventfd gives back one count per read, so a large count would keep
    the ring's thread waking for nothing. O_NONBLOCK is set on the file description we share
    with the VMM (QEMU's are non-blocking already): a saturated counter then costs EAGAIN, not
    a thread or the event loop stuck in write().
    """
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise RequestRejected(f"{what} fd: cannot tell what it is: {exc.strerror}") from exc
    if kind != "anon_inode:[eventfd]":
        raise RequestRejected(f"{what} fd is not an eventfd ({kind})")
    try:
        with open(f"/proc/self/fdinfo/{fd}") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key == "eventfd-semaphore" and value.strip() == "1":
                    raise RequestRejected(f"{what} fd is a semaphore-mode eventfd")
        os.set_blocking(fd, False)
    except OSError as exc:
        raise RequestRejected(f"{what} fd: {exc.strerror}") from exc


@dataclass(eq=False)
class Vring:
    """The run-time state of one vring: its eventfds, where it stands and, while started, its
    task. (What the VMM configured, size, addresses and enable, is the session's.)

    The protocol task owns it; the vring's task writes `next_avail` once, when it ends, and
    the protocol task waits for that (`Connection._stop`) before it touches the ring again.
    A RESET_OWNER or a disconnect replaces the whole object, so nothing of an old run can
    reach a new owner's ring.
    """

    index: int
    kick_fd: int | None = None
    call: Notifier = field(default_factory=lambda: Notifier("call"))
    err: Notifier = field(default_factory=lambda: Notifier("err"))
    #: The next avail index to serve: SET_VRING_BASE's, then wherever the last run stopped.
    next_avail: int = 0
    scope: trio.CancelScope | None = None
    done: trio.Event = field(default_factory=trio.Event)
    #: Set when the guest broke the ring; it stays stopped until the VMM restarts it.
    broken: bool = False


class Connection:
    def __init__(
        self,
        sock: trio.socket.SocketType,
        name: str,
        source: EntropySource,
        budget: Budget,
        *,
        peer: Peer | None = None,
    ) -> None:
        self.sock = sock
        self.name = name
        self.prefix = f"{name}: "
        #: Who connected (SO_PEERCRED at accept), for the log lines.
        self.peer = peer
        self.counters = ConnectionCounters(lambda: source.health_failures)
        #: trio time the connection started being served (see `uptime`).
        self.started = trio.current_time()
        #: How it ended, for the disconnect line.
        self._ending = "closed by rngd"
        #: The connect line is logged (at the first SET_FEATURES).
        self._announced = False
        self.session = Session()
        self.reader = MessageReader()
        self.memory: GuestMemory | None = None
        self.vrings = [Vring(i) for i in range(self.session.num_queues)]
        self.incident = IncidentLog(log, self.prefix)
        self.source = source
        self.budget = budget
        self._nursery: trio.Nursery | None = None
        #: Memory tables and vring starts so far: the first of each is logged at INFO, the
        #: rest (a VMM may send thousands) at DEBUG and counted once when the connection ends.
        self._memory_tables = 0
        self._vring_starts = 0

    # --- lifetime ---

    async def run(self) -> None:
        """Serve the connection until the VMM hangs up or breaks the protocol.

        Whatever way it ends, every task is cancelled, the memory unmapped and every fd we
        received closed before this returns.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await self._serve()
                except ProtocolError as exc:
                    log.warning("%sdisconnecting: %s", self.prefix, exc)
                    self._ending = "protocol error"
                nursery.cancel_scope.cancel()
        finally:
            self._release()

    def uptime(self) -> float:
        return trio.current_time() - self.started

    def summary(self) -> str:
        """The peer, the time connected and the counters so far, as the log lines give them."""
        counters = self.counters
        return (
            f"{describe(self.peer)} uptime={self.uptime():.1f}s {counters.total()} "
            f"health_failures={counters.health_failures()}"
        )

    def _release(self) -> None:
        if self._memory_tables > 1 or self._vring_starts > 1:
            log.info(
                "%s%d memory changes and %d vring starts on this connection",
                self.prefix,
                self._memory_tables,
                self._vring_starts,
            )
        self.incident.flush()
        self.reader.close()
        self._drop_resources()
        # Every ring has stopped: the counters are final.
        log.info("%sVMM disconnected (%s): %s", self.prefix, self._ending, self.summary())

    def _drop_resources(self) -> None:
        """Close every eventfd, unmap the memory and start the vrings' run-time state afresh
        (the vring tasks have stopped)."""
        self._drop_vrings()
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self.session.memory_mapped([])

    def _drop_vrings(self) -> None:
        """Close every vring's eventfds and start their run-time state afresh (the vring tasks
        have stopped)."""
        for vring in self.vrings:
            _close(vring.kick_fd)
            vring.kick_fd = None
            vring.call.close()
            vring.err.close()
        self.vrings = [Vring(i) for i in range(self.session.num_queues)]

    async def _serve(self) -> None:
        while True:
            message = await self._receive()
            if message is None:
                self._ending = "hung up"
                return
            reply = await self._dispatch(message)
            if reply is not None:
                try:
                    await self.sock.send(reply)
                except OSError as exc:
                    raise ProtocolError(f"cannot send reply: {exc}") from exc

    async def _receive(self) -> Message | None:
        """The next message, or None at a clean end of stream."""
        while True:
            message = self.reader.next()
            if message is not None:
                return message
            try:
                data, ancdata, flags, _ = await self.sock.recvmsg(
                    self.reader.wanted(), _ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
                )
            except OSError as exc:
                raise ProtocolError(f"receive failed: {exc}") from exc
            fds = _fds_from(ancdata)
            if flags & socket.MSG_CTRUNC:
                for fd in fds:
                    os.close(fd)
                raise ProtocolError("a message carried more fds than any request allows")
            if not data:
                for fd in fds:
                    os.close(fd)
                if self.reader.pending():
                    raise ProtocolError("VMM hung up in the middle of a message")
                return None
            self.reader.feed(data, fds)

    # --- requests ---

    async def _dispatch(self, message: Message) -> bytes | None:
        log.debug(
            "%s%s flags=%#x size=%d fds=%d",
            self.prefix,
            message.name,
            message.flags,
            len(message.payload),
            len(message.fds),
        )
        try:
            event = self.session.handle(message)
            reply = await self._apply(message, event)
            if message.request == Request.SET_FEATURES:
                self._features_set()
            return reply
        except MessageError as exc:
            kind = "refused" if isinstance(exc, RequestRejected) else "malformed"
            self.incident("%s %s: %s", message.name, kind, exc)
            self.counters.malformed += 1
            if message.request in REQUESTS_WITH_REPLY:
                # The VMM waits for an answer we cannot give; hanging up beats a hang.
                raise ProtocolError(f"cannot answer {message.name}") from exc
            return self.session.ack(message, False)
        finally:
            if message.fds:
                self.incident("%s: closing %d unexpected fds", message.name, len(message.fds))
                message.close_fds()

    def _features_set(self) -> None:
        """The one line per connection that says who connected and what was negotiated: at
        the first SET_FEATURES (QEMU sends one at every device start, a guest reboot say)."""
        first, self._announced = not self._announced, True
        session = self.session
        log.log(
            logging.INFO if first else logging.DEBUG,
            "%sVMM connected: %s features=%#x (%s) protocol_features=%#x (%s)",
            self.prefix,
            describe(self.peer),
            session.acked_features,
            VirtioFeatures(session.acked_features).name or "none",
            session.acked_protocol_features,
            ProtocolFeatures(session.acked_protocol_features).name or "none",
        )

    async def _apply(
        self,
        message: Message,
        event: Event,
    ) -> bytes | None:
        match event:
            case Reply(data):
                return data if data is not None else self.session.ack(message, True)
            case SetMemTable(regions, fds):
                await self._set_mem_table(regions, fds)
            case SetVringFd(request, index, fd):
                await self._set_vring_fd(request, self.vrings[index], fd)
            case SetVringBase(index, base):
                vring = self.vrings[index]
                # Stopped first: where the running ring stood must not overwrite the VMM's word.
                await self._stop(vring)
                vring.next_avail = base
                await self._restart(vring)
            case GetVringBase(index):
                vring = self.vrings[index]
                await self._stop(vring)
                # The ring is stopped until the next SET_VRING_KICK starts it again.
                self._replace_kick(vring, None)
                vring.broken = False
                return self.session.vring_base_reply(index, vring.next_avail)
            case VringChanged(index):
                await self._restart(self.vrings[index])
            case ResetOwner():
                for vring in self.vrings:
                    await self._stop(vring)
                self._drop_resources()
            case ResetDevice():
                for vring in self.vrings:
                    await self._stop(vring)
                self._drop_vrings()
                log.debug("%sdevice reset by %s", self.prefix, message.name)
            case AddMemReg(region, fd):
                await self._add_mem_reg(region, fd)
            case RemMemReg(region, fd):
                _close(fd)
                await self._rem_mem_reg(region)
        return self.session.ack(message, True)

    async def _set_mem_table(self, regions: list[MemoryRegion], fds: list[int]) -> None:
        try:
            new = GuestMemory.map(regions, fds)
        except GuestMemoryError as exc:
            raise RequestRejected(f"memory table not mapped: {exc}") from exc
        finally:
            # The mappings hold their own references; ours are no longer needed.
            for fd in fds:
                os.close(fd)
        for vring in self.vrings:
            await self._stop(vring)
        old, self.memory = self.memory, new
        if old is not None:
            old.close()
        self.session.memory_mapped(new.regions)
        self._memory_tables += 1
        log.log(
            logging.INFO if self._memory_tables == 1 else logging.DEBUG,
            "%smemory table: %s",
            self.prefix,
            ", ".join(f"gpa {r.guest_phys_addr:#x}+{r.memory_size:#x}" for r in new.regions),
        )
        # Every ring that is ready now starts: the ones that ran on the old table, and any
        # configured before the first table (or whose rings the old table did not hold).
        for vring in self.vrings:
            await self._restart(vring)

    async def _add_mem_reg(self, region: MemoryRegion, fd: int) -> None:
        """Map one more region. The rings stop while the table changes (their threads read it)
        and start again on the new one."""
        try:
            mapped = GuestMemory.map_region(region, fd)
        except GuestMemoryError as exc:
            raise RequestRejected(f"region not mapped: {exc}") from exc
        finally:
            os.close(fd)
        for vring in self.vrings:
            await self._stop(vring)
        if self.memory is None:
            self.memory = GuestMemory([])
        self.memory.add(mapped)
        self._memory_changed(f"added gpa {region.guest_phys_addr:#x}+{region.memory_size:#x}")
        await self._restart_all()

    async def _rem_mem_reg(self, region: MemoryRegion) -> None:
        """Unmap one region once no request uses it: stopping a ring waits for its thread to
        finish the request in hand and drops the ring's views of guest memory."""
        assert self.memory is not None  # the session checked the region is mapped
        for vring in self.vrings:
            await self._stop(vring)
        self.memory.remove(region)
        self._memory_changed(f"removed gpa {region.guest_phys_addr:#x}+{region.memory_size:#x}")
        await self._restart_all()

    def _memory_changed(self, what: str) -> None:
        assert self.memory is not None
        self.session.memory_mapped(self.memory.regions)
        self._memory_tables += 1
        log.debug("%smemory region %s (%d mapped)", self.prefix, what, len(self.memory.regions))

    async def _restart_all(self) -> None:
        """Start every ring that is ready on the memory as it now is. A ring whose addresses
        the change took away stays stopped (the change itself stands) until the VMM maps them
        again or reconfigures the ring."""
        for vring in self.vrings:
            try:
                await self._restart(vring)
            except RequestRejected as exc:
                self.incident("%s", exc)

    async def _set_vring_fd(self, request: Request, vring: Vring, fd: int | None) -> None:
        if fd is not None:
            try:
                _check_vring_fd(fd, _FD_ROLE[request])
            except RequestRejected:
                # Refused: the vring keeps the fd it had.
                os.close(fd)
                raise
        if request == Request.SET_VRING_KICK:
            if fd is None:
                raise RequestRejected(
                    "polling mode (SET_VRING_KICK without an fd) is not supported"
                )
            await self._stop(vring)
            self._replace_kick(vring, fd)
            await self._restart(vring)
        elif request == Request.SET_VRING_CALL:
            # The worker signals whichever fd is current, so a swap needs no stop.
            vring.call.replace(fd)
        else:
            vring.err.replace(fd)

    def _replace_kick(self, vring: Vring, fd: int | None) -> None:
        if vring.kick_fd is not None:
            # Only the ring's thread watches it, and the ring is stopped: nothing waits on it.
            os.close(vring.kick_fd)
        vring.kick_fd = fd

    # --- vring tasks ---

    def _ready(self, vring: Vring) -> bool:
        config = self.session.vrings[vring.index]
        return (
            self.memory is not None
            and config.size > 0
            and config.addr is not None
            and config.enabled
            and vring.kick_fd is not None
            and not vring.broken
        )

    async def _restart(self, vring: Vring) -> None:
        """Bring the vring's task in line with its configuration: stop it, start it if ready."""
        await self._stop(vring)
        if not self._ready(vring):
            return
        config = self.session.vrings[vring.index]
        assert self.memory is not None and config.addr is not None and self._nursery is not None
        try:
            queue = SplitQueue(
                self.memory,
                config.size,
                config.addr.desc,
                config.addr.avail,
                config.addr.used,
                vring.next_avail,
                event_idx=self.session.has_feature(VirtioFeatures.RING_EVENT_IDX),
                indirect=self.session.has_feature(VirtioFeatures.RING_INDIRECT_DESC),
                notify_on_empty=self.session.has_feature(VirtioFeatures.NOTIFY_ON_EMPTY),
            )
        except RingError as exc:
            raise RequestRejected(f"vring {vring.index} not started: {exc}") from exc
        await self._nursery.start(self._run_vring, vring, queue)
        self._vring_starts += 1
        log.log(
            logging.INFO if self._vring_starts == 1 else logging.DEBUG,
            "%svring %d started (size %d, next avail %d)",
            self.prefix,
            vring.index,
            config.size,
            vring.next_avail,
        )

    async def _run_vring(
        self,
        vring: Vring,
        queue: SplitQueue,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        assert vring.kick_fd is not None
        done = vring.done = trio.Event()
        started = False

        def ready() -> None:
            # The ring's fds are open: whoever started it (a request's reply) may go on.
            nonlocal started
            started = True
            task_status.started()

        try:
            with trio.CancelScope() as scope:
                vring.scope = scope
                await serve_vring(
                    queue,
                    self.source,
                    self.budget,
                    vring.kick_fd,
                    vring.call,
                    self.incident,
                    name=f"rngd {self.prefix}vring {vring.index}",
                    counters=self.counters,
                    ready=ready,
                )
        except RingError as exc:
            self.incident("vring %d stopped, the guest broke it: %s", vring.index, exc)
            self.counters.malformed += 1
            self._break(vring)
        except GuestMemoryFault as exc:
            self.incident("vring %d stopped: %s", vring.index, exc)
            self._break(vring)
        except EventfdError as exc:
            self.incident("vring %d stopped: %s", vring.index, exc)
            vring.broken = True
        except SourceError as exc:
            # The source is shared; its failure is the host's problem, not this guest's. Stop
            # this ring (the VMM can restart it) rather than take the connection down.
            log.error("%svring %d stopped: %s", self.prefix, vring.index, exc)
            vring.broken = True
        except ThreadStartError as exc:
            # The host is short of fds: the ring waits for the VMM's next word on it (a new
            # kick fd, an enable) to try again.
            log.error("%svring %d stopped: %s", self.prefix, vring.index, exc)
        finally:
            # Where the ring stands is where a restart must resume. (This run's own Vring: a
            # RESET_OWNER replaces it, once this task has ended.)
            vring.next_avail = queue.next_avail
            queue.release()
            vring.scope = None
            done.set()
            if not started:
                # It failed to start (logged above): the starter goes on without it.
                task_status.started()

    def _break(self, vring: Vring) -> None:
        """Stop the ring until the VMM restarts it, and tell the VMM through the err fd."""
        vring.broken = True
        try:
            vring.err.signal()
        except EventfdError as exc:
            self.incident("vring %d: %s", vring.index, exc)

    async def _stop(self, vring: Vring) -> None:
        if vring.scope is None:
            return
        vring.scope.cancel()
        # The task may be between a wake-up and its next checkpoint; wait until it has really
        # stopped touching the ring before anyone reads next_avail or unmaps memory.
        await vring.done.wait()


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _FD_SIZE
            fds.extend(array.array("i", data[:usable]))
    return fds
