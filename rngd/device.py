"""The device half of one vhost-user connection: what the session's events do.

`Connection` reads and answers messages; the sans-I/O `Session` validates and records them;
`Device.apply` carries out the resulting event: maps guest memory, swaps eventfds, starts and
stops vrings. Each started vring runs `serve_vring` (rngd.ring) in its own cancel scope inside
the connection's nursery, so stopping one ring is cancelling one scope, and a disconnect is
cancelling the nursery.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import trio

from rngd.bandwidth import Budget
from rngd.eventfds import EventfdError, VringSignal, check_eventfd
from rngd.incidents import IncidentLog
from rngd.memory import GuestMemory, GuestMemoryError
from rngd.observe import ConnectionCounters
from rngd.protocol.codec import Message
from rngd.protocol.constants import VirtioFeatures
from rngd.protocol.payloads import MemoryRegion
from rngd.protocol.session import (
    AddMemReg,
    Event,
    GetVringBase,
    RemMemReg,
    Reply,
    RequestRejected,
    ResetDevice,
    ResetOwner,
    RingOptionsChanged,
    Session,
    SetMemTable,
    SetVringBase,
    SetVringCall,
    SetVringErr,
    SetVringKick,
    VringChanged,
    VringConfig,
)
from rngd.ring import BusyPoll, VringWorker, serve_vring
from rngd.source import EntropySource, GuestMemoryFault, SourceError
from rngd.threads import ThreadStartError
from rngd.virtqueue import RingError, SplitQueue

log = logging.getLogger(__name__)


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _checked(fd: int | None, role: str) -> int | None:
    """`fd` if it is an eventfd fit to be a ring's `role` fd; refused (and closed) if not, so
    the ring keeps the fd it had."""
    if fd is not None:
        try:
            check_eventfd(fd, role)
        except EventfdError as exc:
            os.close(fd)
            raise RequestRejected(str(exc)) from exc
    return fd


@dataclass(eq=False)
class Vring:
    """The run-time state of one vring: its eventfds, where it stands and, while started, its
    task. (What the VMM configured, size, addresses and enable, is the session's.)

    The protocol task owns it; the vring's task writes `next_avail` once, when it ends, and
    the protocol task waits for that (`Device.stop`) before it touches the ring again.
    A RESET_OWNER or a disconnect replaces the whole object, so nothing of an old run can
    reach a new owner's ring.
    """

    index: int
    kick_fd: int | None = None
    call: VringSignal = field(default_factory=lambda: VringSignal("call"))
    err: VringSignal = field(default_factory=lambda: VringSignal("err"))
    #: The next avail index to serve: SET_VRING_BASE's, then wherever the last run stopped.
    next_avail: int = 0
    scope: trio.CancelScope | None = None
    done: trio.Event = field(default_factory=trio.Event)
    #: Set when the guest broke the ring; it stays stopped until the VMM restarts it.
    broken: bool = False


class Device:
    """Guest memory and the vrings of one connection, changed only by `apply` (and torn
    down by `drop_resources`), all from the connection's protocol task."""

    def __init__(
        self,
        session: Session,
        source: EntropySource,
        budget: Budget,
        counters: ConnectionCounters,
        incident: IncidentLog,
        nursery: trio.Nursery,
        prefix: str,
        poll: BusyPoll | None = None,
    ) -> None:
        self.session = session
        self.source = source
        self.budget = budget
        self.counters = counters
        self.incident = incident
        #: Where the vrings' tasks run: the connection's, cancelled at a disconnect.
        self._nursery = nursery
        self.prefix = prefix
        #: How the rings poll for requests before they sleep (None: they never do).
        self.poll = poll
        self.memory: GuestMemory | None = None
        self.vrings = [Vring(i) for i in range(session.num_queues)]
        #: Memory tables and vring starts so far: the first of each is logged at INFO, the
        #: rest (a VMM may send thousands) at DEBUG and counted once when the connection ends.
        self.memory_tables = 0
        self.vring_starts = 0

    def drop_resources(self) -> None:
        """Close every eventfd, unmap the memory and start the vrings' run-time state afresh
        (the vring tasks have stopped)."""
        self.drop_vrings()
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self.session.memory_mapped([])

    def drop_vrings(self) -> None:
        """Close every vring's eventfds and start their run-time state afresh (the vring tasks
        have stopped)."""
        for vring in self.vrings:
            _close(vring.kick_fd)
            vring.kick_fd = None
            vring.call.close()
            vring.err.close()
        self.vrings = [Vring(i) for i in range(self.session.num_queues)]

    async def apply(self, message: Message, event: Event) -> bytes | None:
        """Carry out what the session made of `message`; the reply to send, if any."""
        match event:
            case Reply(data):
                return data if data is not None else self.session.ack(message, True)
            case SetMemTable(regions, fds):
                await self._set_mem_table(regions, fds)
            case SetVringKick(index, fd):
                await self._set_vring_kick(self.vrings[index], _checked(fd, "kick"))
            case SetVringCall(index, fd):
                # The worker signals whichever fd is current, so a swap needs no stop.
                self.vrings[index].call.replace(_checked(fd, "call"))
            case SetVringErr(index, fd):
                self.vrings[index].err.replace(_checked(fd, "err"))
            case SetVringBase(index, base):
                vring = self.vrings[index]
                # Stopped first: where the running ring stood must not overwrite the VMM's word.
                # The base holds even if the ring cannot start (see `restart`).
                await self.stop(vring)
                vring.next_avail = base
                await self.restart(vring)
            case GetVringBase(index):
                vring = self.vrings[index]
                await self.stop(vring)
                # The ring is stopped until the next SET_VRING_KICK starts it again.
                self._replace_kick(vring, None)
                vring.broken = False
                return self.session.vring_base_reply(index, vring.next_avail)
            case VringChanged(index, config):
                vring = self.vrings[index]
                # Refused with nothing changed if the ring would not fit; else recorded, and
                # the ring runs (or not) as the new configuration says.
                self._check_fits(vring, config, has_kick=vring.kick_fd is not None)
                self.session.vring_configured(index, config)
                await self.restart(vring)
            case RingOptionsChanged():
                # A running ring's queue was built with the old options: build it anew.
                await self._restart_all()
            case ResetOwner():
                for vring in self.vrings:
                    await self.stop(vring)
                self.drop_resources()
            case ResetDevice():
                for vring in self.vrings:
                    await self.stop(vring)
                self.drop_vrings()
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
        # The new table stands even if a ring no longer fits in it: QEMU sends SET_MEM_TABLE
        # when the guest's RAM layout changed, and that is a fact to take, not a proposal to
        # refuse (QEMU only logs a refusal and goes on, and rngd would keep serving from
        # memory the VMM has let go of). A ring left outside stays stopped, with an incident
        # line, until the VMM maps its memory again or moves it: as ADD_MEM_REG and
        # REM_MEM_REG do. So success always means the new table is in use.
        for vring in self.vrings:
            await self.stop(vring)
        old, self.memory = self.memory, new
        if old is not None:
            old.close()
        self.session.memory_mapped(new.regions)
        self.memory_tables += 1
        log.log(
            logging.INFO if self.memory_tables == 1 else logging.DEBUG,
            "%smemory table: %s",
            self.prefix,
            ", ".join(f"gpa {r.guest_phys_addr:#x}+{r.memory_size:#x}" for r in new.regions),
        )
        # Every ring that is ready now starts: the ones that ran on the old table, and any
        # configured before the first table (or whose rings the old table did not hold).
        await self._restart_all()

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
            await self.stop(vring)
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
            await self.stop(vring)
        self.memory.remove(region)
        self._memory_changed(f"removed gpa {region.guest_phys_addr:#x}+{region.memory_size:#x}")
        await self._restart_all()

    def _memory_changed(self, what: str) -> None:
        assert self.memory is not None
        self.session.memory_mapped(self.memory.regions)
        self.memory_tables += 1
        log.debug("%smemory region %s (%d mapped)", self.prefix, what, len(self.memory.regions))

    async def _restart_all(self) -> None:
        """Start every ring that is ready on the memory and features as they now are (see
        `restart`)."""
        for vring in self.vrings:
            await self.restart(vring)

    async def _set_vring_kick(self, vring: Vring, fd: int | None) -> None:
        if fd is None:
            raise RequestRejected("polling mode (SET_VRING_KICK without an fd) is not supported")
        try:
            self._check_fits(vring, self.session.vrings[vring.index], has_kick=True)
        except RequestRejected:
            # Refused: the ring keeps the kick fd it had, and runs on if it ran.
            os.close(fd)
            raise
        await self.stop(vring)
        self._replace_kick(vring, fd)
        await self.restart(vring)

    def _replace_kick(self, vring: Vring, fd: int | None) -> None:
        if vring.kick_fd is not None:
            # Only the ring's thread watches it, and the ring is stopped: nothing waits on it.
            os.close(vring.kick_fd)
        vring.kick_fd = fd

    # --- vring tasks ---

    def _ready(self, vring: Vring, config: VringConfig, *, has_kick: bool) -> bool:
        return (
            self.memory is not None
            and config.size > 0
            and config.addr is not None
            and config.enabled
            and has_kick
            and not vring.broken
        )

    def _queue(self, vring: Vring, config: VringConfig) -> SplitQueue:
        """The ring `config` lays out in guest memory, from where `vring` stands, with the
        negotiated options; RingError if the memory does not hold it."""
        assert self.memory is not None and config.addr is not None
        return SplitQueue(
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

    def _check_fits(self, vring: Vring, config: VringConfig, *, has_kick: bool) -> None:
        """Refuse, before anything changed, a change to the ring's own setup (size, addresses,
        enable, kick fd) that would leave it ready to run where the memory does not hold it."""
        if not self._ready(vring, config, has_kick=has_kick):
            return
        try:
            self._queue(vring, config).release()
        except RingError as exc:
            raise RequestRejected(
                f"vring {vring.index} would not be in guest memory: {exc}"
            ) from exc

    async def restart(self, vring: Vring) -> None:
        """Bring the vring's task in line with its configuration: stop it, start it if ready.

        A ready ring that the memory does not hold stays stopped, with an incident line: the
        change that led here (a memory change, a base, new features) stands, and the ring
        waits until the VMM maps its memory again or reconfigures it. (A change to the ring's
        own setup passed `_check_fits` first: the ring it configures fits.)
        """
        await self.stop(vring)
        config = self.session.vrings[vring.index]
        if not self._ready(vring, config, has_kick=vring.kick_fd is not None):
            return
        try:
            queue = self._queue(vring, config)
        except RingError as exc:
            self.incident("vring %d not started: %s", vring.index, exc)
            return
        await self._nursery.start(self._run_vring, vring, queue)
        self.vring_starts += 1
        log.log(
            logging.INFO if self.vring_starts == 1 else logging.DEBUG,
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
                worker = VringWorker(
                    queue,
                    self.source,
                    self.budget,
                    vring.kick_fd,
                    vring.call,
                    self.incident,
                    self.poll,
                )
                await serve_vring(
                    worker,
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

    async def stop(self, vring: Vring) -> None:
        if vring.scope is None:
            return
        vring.scope.cancel()
        # The task may be between a wake-up and its next checkpoint; wait until it has really
        # stopped touching the ring before anyone reads next_avail or unmaps memory.
        await vring.done.wait()
