"""Kick, call and err fds from a hostile VMM: whatever state they are in, nothing blocks.

Each fd is checked when it arrives: one that is not a plain eventfd is refused (failure ack,
one incident line, closed) and the vring keeps the fd it had; an accepted one is made
non-blocking (on the file description it shares with the VMM, which the test sees). The
daemon runs as a real process serving two sockets: while the hostile VMM does its worst on
one, the other guest is served throughout; the daemon's CPU stays low where an fd would make
it spin; every fd is closed (its fd count is back where it was); and SIGTERM ends it within
1 s with status 0 (the `daemon_process` check on the way out).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio

from rngd.bandwidth import BandwidthScheduler
from rngd.eventfds import EventfdError, VringSignal
from rngd.incidents import IncidentLog
from rngd.memory import GuestMemory as MappedMemory
from rngd.protocol.codec import encode_u64
from rngd.protocol.constants import Request
from rngd.ring import VringWorker, serve_vring
from rngd.source import EntropySource
from rngd.testing import DaemonProcess, DriverQueue, Frontend, GuestMemory, daemon_process
from rngd.virtqueue import SplitQueue

STEP = 5.0
#: The largest count an eventfd holds: one more write would block (or fail with EAGAIN).
EVENTFD_MAX = 0xFFFF_FFFF_FFFF_FFFE
#: Most of one core the daemon may use while a hostile fd sits there (a spin uses all of it).
CPU_BOUND = 0.2

ROLE_REQUEST = {
    "kick": Request.SET_VRING_KICK,
    "call": Request.SET_VRING_CALL,
    "err": Request.SET_VRING_ERR,
}


# -- fds a hostile VMM sends: the first is sent, all are the test's to close ---------------


def pipe_read_end(d: str) -> list[int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    return [r, w]


def pipe_write_end(d: str) -> list[int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    return [w, r]


def pipe_at_eof(d: str) -> list[int]:
    """A read end whose writer has gone: readable for ever, every read returns b""."""
    r, w = os.pipe2(os.O_CLOEXEC)
    os.close(w)
    return [r]


def pipe_reader_gone(d: str) -> list[int]:
    """A write end whose reader has gone: every write fails with EPIPE."""
    r, w = os.pipe2(os.O_CLOEXEC)
    os.close(r)
    return [w]


def full_blocking_pipe(d: str) -> list[int]:
    """A blocking write end of a pipe that is full and never read: a write blocks for ever."""
    r, w = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, bytes(65536))
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    return [w, r]


def regular_file(d: str) -> list[int]:
    path = os.path.join(d, "not-an-eventfd")
    with open(path, "wb") as f:
        f.write(bytes(64))
    return [os.open(path, os.O_RDWR | os.O_CLOEXEC)]


def directory(d: str) -> list[int]:
    return [os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]


def semaphore_eventfd(d: str) -> list[int]:
    """Semaphore mode with a huge count: readable after every read, 2**64 - 2 times over."""
    fd = os.eventfd(0, os.EFD_SEMAPHORE | os.EFD_CLOEXEC)
    os.eventfd_write(fd, EVENTFD_MAX)
    return [fd]


def blocking_eventfd(d: str) -> list[int]:
    return [os.eventfd(0, os.EFD_CLOEXEC)]


def blocking_eventfd_at_max(d: str) -> list[int]:
    """A blocking eventfd whose counter is full: a write of 1 would block until it is read."""
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    os.eventfd_write(fd, EVENTFD_MAX)
    return [fd]


@dataclass(frozen=True)
class Refused:
    role: str
    make: Callable[[str], list[int]]
    #: Text of the incident line.
    log: str = "is not an eventfd"

    @property
    def id(self) -> str:
        return f"{self.role}-{self.make.__name__}"


REFUSED = [
    # The kick fd is polled and read by the ring's thread.
    Refused("kick", pipe_write_end),  # the pipe's wrong end
    Refused("kick", pipe_at_eof),  # stays readable: must not spin
    Refused("kick", regular_file),  # always readable
    Refused("kick", directory),
    Refused("kick", semaphore_eventfd, "semaphore-mode eventfd"),  # stays readable
    # The call and err fds are written, the call fd by the ring's thread, the err fd by the
    # event loop.
    Refused("call", pipe_read_end),  # the pipe's wrong end
    Refused("call", full_blocking_pipe),
    Refused("call", pipe_reader_gone),
    Refused("call", regular_file),
    Refused("call", directory),
    Refused("err", pipe_read_end),
    Refused("err", full_blocking_pipe),
    Refused("err", pipe_reader_gone),
    Refused("err", regular_file),
    Refused("err", directory),
]


# -- tools -------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        # Fields after the command name (which may hold spaces); utime and stime are the
        # 14th and 15th of the whole line.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def assert_not_spinning(daemon: DaemonProcess, seconds: float = 1.0) -> None:
    """The daemon uses less than `CPU_BOUND` of a core over `seconds` (a resource bound: the
    other guest's few requests meanwhile cost a small fraction of it)."""
    used, start = cpu_seconds(daemon.pid), trio.current_time()
    await trio.sleep(seconds)
    share = (cpu_seconds(daemon.pid) - used) / (trio.current_time() - start)
    assert share < CPU_BOUND, f"the daemon used {share:.0%} of a core"


class OtherGuest:
    """A guest on another socket, reading 64 bytes every 20 ms for the whole test; each read
    must complete within `STEP` (a stalled event loop or source fails the test)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.reads = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with await Frontend.connect(self.path) as vmm:
            await vmm.start_qemu72(4)
            task_status.started()
            while True:
                with trio.fail_after(STEP):
                    assert len(await vmm.read_random(64)) == 64
                self.reads += 1
                await trio.sleep(0.02)

    async def still_served(self) -> None:
        """Wait (at most `STEP`) for two more reads to complete from now."""
        target = self.reads + 2
        with trio.fail_after(STEP):
            while self.reads < target:
                await trio.sleep(0.01)


@asynccontextmanager
async def two_guests(workdir: str) -> AsyncIterator[tuple[DaemonProcess, Frontend, OtherGuest]]:
    """A daemon process on two sockets; a started guest on the first (the hostile VMM's),
    another on the second, served throughout."""
    async with daemon_process(
        os.path.join(workdir, "rng.sock"),
        socket_count=2,
        filename="/dev/urandom",
        log_level="info",
    ) as daemon:
        other = OtherGuest(daemon.socket_paths[1])
        async with trio.open_nursery() as nursery:
            await nursery.start(other.run)
            async with await Frontend.connect(daemon.socket_paths[0]) as vmm:
                with trio.fail_after(STEP):
                    await vmm.start_qemu72(4)
                    assert len(await vmm.read_random(64)) == 64
                    # Counts of fds taken from here on see the start complete.
                    await vmm.settle()
                yield daemon, vmm, other
                await other.still_served()
                with trio.fail_after(STEP):
                    # The ring stops on request: nothing holds its thread.
                    await vmm.get_vring_base(0)
            nursery.cancel_scope.cancel()
        log = daemon.log()
        assert "Traceback" not in log, log


def log_lines(daemon: DaemonProcess, text: str) -> list[str]:
    return [line for line in daemon.log().splitlines() if text in line]


async def send_fd(vmm: Frontend, role: str, fd: int) -> bool:
    """SET_VRING_<role> for vring 0 with `fd`, asking for an ack; return whether accepted."""
    reply = await vmm.request(ROLE_REQUEST[role], encode_u64(0), [fd], need_reply=True)
    assert reply is not None
    return reply.ok


async def wait_used_polling(queue: DriverQueue) -> None:
    """Wait for one completion by watching the used ring (for when calls cannot arrive)."""
    with trio.fail_after(STEP):
        while not queue.used():
            await trio.sleep(0.005)


# -- refused ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", REFUSED, ids=[c.id for c in REFUSED])
async def test_fd_that_is_not_an_eventfd_is_refused(case: Refused, workdir: str) -> None:
    """Decision: a failure ack, one incident line, the fd closed; the vring goes on with the
    fd it had (served, signalled, stoppable) and the other guest is served throughout."""
    async with two_guests(workdir) as (daemon, vmm, other):
        with trio.fail_after(STEP):
            baseline = daemon.fd_count()
            fds = case.make(workdir)
            try:
                assert not await send_fd(vmm, case.role, fds[0])
                # Closed before the reply: the daemon holds what it held.
                assert daemon.fd_count() == baseline
            finally:
                for fd in fds:
                    os.close(fd)
            lines = log_lines(daemon, case.log)
            assert len(lines) == 1 and case.role in lines[0], lines
            # The ring runs on its old fds: kicked, served and called as before.
            assert len(await vmm.read_random(256)) == 256
        if case.role == "kick":
            await assert_not_spinning(daemon)
        await other.still_served()


# -- accepted, in a state that would block ------------------------------------------------


async def test_blocking_call_eventfd_at_max_count(workdir: str) -> None:
    """A blocking call eventfd whose counter is full (a write would block the ring's thread,
    and with it every stop and SIGTERM): made non-blocking, so the call that cannot be added
    is dropped (the VMM has one pending anyway) and the ring goes on; once the VMM reads the
    counter, calls arrive again."""
    async with two_guests(workdir) as (_, vmm, other):
        assert vmm.queue is not None
        queue = vmm.queue
        (fd,) = blocking_eventfd_at_max(workdir)
        try:
            with trio.fail_after(STEP):
                assert await send_fd(vmm, "call", fd)
                assert not os.get_blocking(fd)
                for _ in range(3):
                    queue.post(64)
                    queue.kick(force=True)
                    await wait_used_polling(queue)
                assert os.eventfd_read(fd) == EVENTFD_MAX
                queue.post(64)
                queue.kick(force=True)
                await trio.lowlevel.wait_readable(fd)
                assert os.eventfd_read(fd) == 1
                assert len(queue.used()) == 1
            await other.still_served()
            # The daemon's copy is the one signalled from now on; ours may go.
            with trio.fail_after(STEP):
                await vmm.set_vring_call(0, vmm.call_fd)
        finally:
            os.close(fd)


async def test_blocking_err_eventfd_at_max_count(workdir: str) -> None:
    """A blocking err eventfd whose counter is full, then the guest breaks its ring: the err
    signal, sent from the event loop, would have blocked the whole daemon. It is dropped
    (EAGAIN: the VMM has one pending), the ring stops with one line, and both sockets and
    the protocol go on."""
    async with two_guests(workdir) as (daemon, vmm, other):
        assert vmm.queue is not None
        queue = vmm.queue
        (fd,) = blocking_eventfd_at_max(workdir)
        try:
            with trio.fail_after(STEP):
                assert await send_fd(vmm, "err", fd)
                assert not os.get_blocking(fd)
                queue.raw_write_avail_entry(queue.avail_idx, 0xFFFF)
                queue.raw_set_avail_idx(queue.avail_idx + 1)
                queue.kick(force=True)
                while not log_lines(daemon, "the guest broke it"):
                    await trio.sleep(0.01)
                await vmm.get_features()
            await other.still_served()
            assert len(log_lines(daemon, "the guest broke it")) == 1
            assert os.eventfd_read(fd) == EVENTFD_MAX
            with trio.fail_after(STEP):
                await vmm.set_vring_err(0, vmm.err_fd)
        finally:
            os.close(fd)


async def test_blocking_kick_eventfd(workdir: str) -> None:
    """A blocking kick eventfd is made non-blocking: a VMM that drains its own kick counter
    between the ring thread's poll() and read() costs that thread a spurious wake-up, not a
    read that blocks until the next kick (and holds up every stop meanwhile). The ring is
    served through the new fd, stops when asked, and does not spin."""
    async with two_guests(workdir) as (daemon, vmm, other):
        assert vmm.queue is not None
        queue = vmm.queue
        (fd,) = blocking_eventfd(workdir)
        try:
            with trio.fail_after(STEP):
                assert await send_fd(vmm, "kick", fd)
                assert not os.get_blocking(fd)
                # Kicks stolen back at once, many times over: the thread races us for each.
                for _ in range(2000):
                    os.eventfd_write(fd, 1)
                    with contextlib.suppress(BlockingIOError):  # the ring's thread won it
                        os.eventfd_read(fd)
                    await trio.lowlevel.checkpoint()
                # Kicked through the new fd, the ring serves.
                for _ in range(4):
                    queue.post(64)
                    os.eventfd_write(fd, 1)
                    (used,) = await queue.wait_used()
                    assert used.len == 64
                base = await vmm.get_vring_base(0)
                assert base == queue.avail_idx
            await assert_not_spinning(daemon)
            await other.still_served()
            # A fresh kick fd of the harness's own restarts the ring where it stopped.
            with trio.fail_after(STEP):
                await vmm.start(queue, base=base)
                assert len(await vmm.read_random(64)) == 64
        finally:
            os.close(fd)


def test_eventfd_max_is_where_writes_block() -> None:
    """The premise of the tests above: at `EVENTFD_MAX` one more write would block."""
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        os.eventfd_write(fd, EVENTFD_MAX - 1)
        os.eventfd_write(fd, 1)
        with pytest.raises(BlockingIOError) as exc:
            os.eventfd_write(fd, 1)
        assert exc.value.errno == errno.EAGAIN
    finally:
        os.close(fd)


# -- defence in depth: what the checks above keep from ever reaching the ring path ----------
# Errors of an fd later on stop that ring (EventfdError, one incident line in the backend);
# they never escape as anything else, and an fd that stays readable does not make the ring's
# thread spin.


def test_call_fd_whose_reader_is_gone_is_an_eventfd_error() -> None:
    (w,) = pipe_reader_gone("")
    call = VringSignal("call")
    call.replace(w)
    try:
        with pytest.raises(EventfdError, match="signalling the call fd failed"):
            call.signal()
    finally:
        call.close()


def test_saturated_non_blocking_call_fd_is_not_an_error() -> None:
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    os.eventfd_write(fd, EVENTFD_MAX)
    call = VringSignal("call")
    call.replace(fd)
    try:
        call.signal()  # dropped: the VMM has a wake-up pending anyway
        assert os.eventfd_read(fd) == EVENTFD_MAX
    finally:
        call.close()


@pytest.mark.parametrize(
    ("make", "error"),
    [(pipe_at_eof, "poll events"), (regular_file, "cannot be watched")],
    ids=["pipe_hung_up", "not_pollable"],
)
async def test_kick_fd_at_eof_stops_the_ring(
    make: Callable[[str], list[int]], error: str, workdir: str
) -> None:
    """A kick fd that is readable for good (a hung-up pipe) or cannot be watched at all (a
    regular file) ends the ring's task with EventfdError at once, rather than wake it for ever
    or never."""
    fds = make(workdir)
    source = EntropySource("/dev/urandom")
    try:
        with GuestMemory() as guest:
            driver = DriverQueue(guest, 4, event_idx=False)
            memory = MappedMemory.map(guest.table, guest.fds)
            addr = driver.vring_addr()
            queue = SplitQueue(
                memory, 4, addr.desc, addr.avail, addr.used, 0, event_idx=False, indirect=False
            )
            try:
                with trio.fail_after(STEP), pytest.raises(EventfdError, match=error):
                    worker = VringWorker(
                        queue,
                        source,
                        BandwidthScheduler(None, 1.0, 1).guest(0),
                        fds[0],
                        VringSignal("call"),
                        IncidentLog(logging.getLogger("rngd.test"), ""),
                    )
                    await serve_vring(worker, name="rngd test vring")
            finally:
                queue.release()
                memory.close()
    finally:
        source.close()
        for fd in fds:
            os.close(fd)
