"""What a virtio-rng request is, and how one vring's requests are served, top to bottom.

A request is one descriptor chain of device-writable buffers. Serving it means: take up to the
chain's length from the bandwidth budget, read that many bytes from the entropy source straight
into guest memory, and return the chain on the used ring with the count written.

Each running vring has a trio task (`serve_vring`) that owns a worker thread (`VringWorker`).
The thread does the steady-state work without trio: it blocks in epoll on the kick eventfd,
drains the ring in batches (one budget grant, one `readv` per batch, one used-index store, one
interrupt decision) and signals the call eventfd. A trio wake-up per kick would cost several
times the request itself. The bandwidth scheduler stays single-threaded in trio: the thread
asks its task for a credit of bytes (`trio.from_thread.run`), and that task parks in the
scheduler when the budget is spent. Cancelling the task stops the thread and joins it.
"""

from __future__ import annotations

import contextlib
import io
import math
import operator
import os
import queue as queues
import select
import time
from collections.abc import Callable
from typing import cast

import trio

from rngd.bandwidth import Budget
from rngd.eventfds import SIGNAL, EventfdError, VringSignal
from rngd.incidents import IncidentLog
from rngd.observe import ConnectionCounters, RingCounters
from rngd.source import WOULD_BLOCK, EntropySource, wait_readable
from rngd.threads import ThreadStartError, run_owned_thread
from rngd.virtqueue import (
    DESC,
    LOADS_ORDERED,
    SMALL_TABLE,
    STORES_ORDERED,
    ChainError,
    Lone,
    Segment,
    SplitQueue,
)

#: Largest fill of one request. virtio-rng lets the device return fewer bytes than offered; a
#: bound keeps one request with a huge buffer from holding its vring (and budget) for long.
MAX_REQUEST_BYTES = 1 << 20
#: Most bytes one batch reads, so that a stop is never kept waiting behind a huge read.
MAX_BATCH_BYTES = 1 << 20
#: Most buffers one readv takes (the kernel's UIO_MAXIOV).
_IOV_MAX = os.sysconf("SC_IOV_MAX")
_FIRST = operator.itemgetter(0)
_SECOND = operator.itemgetter(1)
_EPOLL_TROUBLE = select.EPOLLERR | select.EPOLLHUP


class BusyPoll:
    """How a ring's thread waits for the guest's next request after serving one: it looks at
    the avail index for up to `window` seconds before it asks for a kick and sleeps in epoll
    (QEMU's poll-us, vhost-net's busyloop_timeout). One is shared by every ring of a daemon.

    The Linux driver keeps one request in flight and posts the next as soon as it has the
    last, so a thread that sleeps at once pays a wake-up, and the guest a kick, per request.
    While the ring polls it does not ask for a kick (avail_event stays behind the avail
    index), so the driver posts without one; when the window closes it asks, then looks
    once more before sleeping, so that a request posted in between is never missed. Each
    look yields the CPU (`sched_yield`, which also releases the GIL): a vCPU thread, the
    event loop or another ring's thread that wants this core gets it first. At most `slots`
    rings poll at once, the CPUs but one (at least one), so that polling never holds every
    core; a ring that finds no slot free sleeps at once. Idle, nothing polls: a poll only
    follows a request.
    """

    __slots__ = ("give", "take", "window")

    def __init__(self, microseconds: int, slots: int | None = None) -> None:
        if slots is None:
            slots = max(1, len(os.sched_getaffinity(0)) - 1)
        #: Seconds a ring polls after a request; 0: it sleeps at once.
        self.window = microseconds / 1e6
        # Slots as tokens in a queue: taking and giving one back are single C calls, atomic
        # under the GIL (a threading.Semaphore would be Python code around a Condition).
        tokens: queues.SimpleQueue[None] = queues.SimpleQueue()
        for _ in range(slots):
            tokens.put(None)
        #: Take a slot (queue.Empty: none free) and give it back.
        self.take = tokens.get_nowait
        self.give = tokens.put


async def serve_vring(
    worker: VringWorker,
    *,
    name: str,
    counters: ConnectionCounters | None = None,
    ready: Callable[[], None] | None = None,
) -> None:
    """The kick-handler task of one vring: serve it with `worker` in a thread of its own
    until cancelled.

    `ready` is called once the ring's fds (its epoll, the thread's stop eventfd) are open and
    its kick fd is watched, so that a start reported from there is complete: nothing fails
    later for want of an fd, and the daemon's fd count is the running ring's.

    The worker's counters are among `counters`' running rings while it runs, and added to
    them when it has stopped.

    Raises what stops the ring for good: RingError (the guest broke it), EventfdError,
    GuestMemoryFault, SourceError, ThreadStartError.
    """

    def stop() -> None:
        worker.stopping = True

    epoll = worker.open_epoll()
    try:
        if counters is not None:
            counters.ring_started(worker.counts)
        try:
            await run_owned_thread(worker.run, name=name, on_stop=stop, ready=ready)
        finally:
            # Credit of the current window the thread did not use goes back to the others.
            if worker.credit and trio.current_time() < worker.credit_until:
                worker.budget.refund(worker.credit)
            if counters is not None:
                counters.ring_stopped(worker.counts)
    finally:
        # The thread has returned (or never started): nothing waits on it any more.
        epoll.close()


class VringWorker:
    """The thread side of one vring. `run` is the whole request path.

    It counts what it does in `counts`, plain ints it alone writes (`_grant`, which counts
    the parking, runs while the thread waits for it); the trio side only reads them.
    """

    def __init__(
        self,
        queue: SplitQueue,
        source: EntropySource,
        budget: Budget,
        kick_fd: int,
        call: VringSignal,
        incident: IncidentLog,
        poll: BusyPoll | None = None,
    ) -> None:
        self.counts = RingCounters()
        self.queue = queue
        self.source = source
        self.budget = budget
        self.kick_fd = kick_fd
        self.call = call
        self.incident = incident
        #: How long to poll for the next request before sleeping (None: never).
        self.poll = poll
        #: trio's clock as the thread reads it cheaply: `clock_reader() + clock_offset` is
        #: trio time.
        self.clock_reader, self.clock_offset = clock_reader(trio.lowlevel.current_clock())
        #: Bytes granted by the budget and not used yet, valid until `credit_until` (trio
        #: time), that is until `clock_reader()` reaches `deadline`.
        self.credit = 0
        self.credit_until = self.deadline = -math.inf
        #: No rate limit: credit is never asked for.
        self.unlimited = budget.window_end() == math.inf
        #: Set by the owning task when it is cancelled (before the stop fd is signalled), so
        #: that a ring kept full stops between two batches.
        self.stopping = False
        self._stop_fd = -1
        self._epoll: select.epoll | None = None

    def open_epoll(self) -> select.epoll:
        """Make the epoll the thread sleeps in, watching the kick fd; the caller closes it
        once the thread has returned.

        The kick eventfd is watched edge-triggered and never read, as the kernel's vhost
        does: every write to an eventfd is a new edge, so a kick that comes after the ring
        was re-armed always ends the next wait, and the request path saves a system call.
        """
        try:
            epoll = select.epoll(2)
        except OSError as exc:  # EMFILE: the daemon is at its fd limit
            raise ThreadStartError(f"cannot make the ring's epoll: {exc.strerror}") from exc
        try:
            epoll.register(self.kick_fd, select.EPOLLIN | select.EPOLLET)
        except OSError as exc:  # a regular file, say: it cannot tell when it is kicked
            epoll.close()
            raise EventfdError(f"kick fd cannot be watched: {exc.strerror}") from exc
        self._epoll = epoll
        return epoll

    def run(self, stop_fd: int) -> None:
        """Drain, then sleep in epoll until kicked or stopped; forever.

        The ring is drained once before the first wait: QEMU's kick eventfd starts out
        signalled, and requests may have been posted before the ring was started.
        """
        epoll = self._epoll
        assert epoll is not None, "open_epoll first"
        self._stop_fd = stop_fd
        epoll.register(stop_fd, select.EPOLLIN)
        try:
            if self.queue.event_idx:
                self.serve()
            else:
                self.serve_without_event_idx()
        except _Stopped:
            return
        finally:
            # Also when a stop or an error cuts a batch short: completions already made
            # must reach the guest.
            with contextlib.suppress(EventfdError):
                self.flush()

    def serve(self) -> None:
        """The steady state of an EVENT_IDX ring (every Linux guest's), top to bottom.

        Each turn takes what the avail ring holds. The Linux driver's request, one buffer of
        a descriptor seen before with credit in hand, is served right here: one read, one
        used element, the used index. Anything else (several requests, a new or chained
        descriptor, no credit left, a broken ring) goes through `serve_batch`. Then, if the
        ring looks empty, avail_event is re-armed; one fence covers both halves of the
        handshake (our used index before the driver's used_event is read, our avail_event
        before its avail index is read again), the guest is interrupted if it asked to be,
        and the thread sleeps in epoll if the ring is still empty.

        Hot names are locals: this loop is what a guest waits on, per request.
        """
        assert self._epoll is not None
        poll, stop_fd = self._epoll.poll, self._stop_fd
        queue, call, source = self.queue, self.call, self.source
        avail, used, elems, desc = queue.avail, queue.used, queue.used_elems, queue.desc
        size = queue.size
        copy_table = desc.tobytes if size <= SMALL_TABLE else None
        by_index = queue.lone_by_index
        used_event_slot, avail_event_slot = queue.used_event_slot, queue.avail_event_slot
        lone = queue.lone.get
        unpack = DESC.unpack_from
        release, acquire = queue.fence.release, queue.fence.acquire
        stores_ordered, loads_ordered = STORES_ORDERED, LOADS_ORDERED
        # A source that needs no more than a read is read here, through a file object's
        # readinto (cheaper than os.readv; None at EAGAIN); any other, and every error, end
        # of file or empty pipe, through `source.read`.
        readinto: Callable[[memoryview], int | None] = _no_read
        if source.direct_fd is not None:
            readinto = io.FileIO(source.direct_fd, closefd=False).readinto
        clock = self.clock_reader
        unlimited = self.unlimited
        counts = self.counts
        busy_poll = self.poll
        window = busy_poll.window if busy_poll is not None else 0.0
        polling = False
        while True:
            # (The used index always equals the avail index consumed: requests are completed
            # in order, and none is kept across a stop.)
            start = queue.next_avail
            waiting = (avail[1] - start) & 0xFFFF
            if not loads_ordered and waiting == 1:
                # The avail index before the entry and descriptor it publishes (several
                # requests go to `serve_batch`, whose `pending` fences for itself).
                release()
                acquire()
            if (
                waiting == 1
                and (head := avail[2 + start % size]) < size
                and (
                    entry := by_index(copy_table())[head]
                    if copy_table
                    else lone(unpack(desc, head << 4))
                )
                is not None
                and (length := entry[0]) <= MAX_REQUEST_BYTES
                and (unlimited or (self.credit >= length and clock() < self.deadline))
            ):
                try:
                    count = readinto(entry[1])
                except OSError:
                    count = 0
                if not count:
                    iov = [entry[1]]
                    count = source.read(iov)
                    if count <= 0:
                        count = self.wait_for_source(iov, count)
                slot = (start % size) << 1
                elems[slot] = head
                elems[slot + 1] = count
                start = queue.next_used = queue.next_avail = (start + 1) & 0xFFFF
                if not unlimited:
                    self.credit -= count
                counts.requests += 1
                counts.bytes += count
                if not stores_ordered:
                    release()  # the element before the index that publishes it
                    acquire()
                used[1] = queue.published_used = start
                # The driver keeps one request in flight: expect the ring to be empty now, and
                # ask for a kick, unless it is polled for the next (below).
                if window:
                    polling = True
                else:
                    used[avail_event_slot] = start
                empty = True
            else:
                if waiting:
                    self.serve_batch(queue.pending())
                    if self.stopping:
                        raise _Stopped
                    queue.publish_used()
                # Re-arm only if the ring looks empty: a busy ring is not asked for kicks.
                # After serving, poll first (as above); woken for nothing, sleep.
                start = queue.next_avail
                empty = avail[1] == start
                if empty:
                    if waiting and window:
                        polling = True
                    else:
                        used[avail_event_slot] = start
            # One fence for both handshakes: our used index before the driver's used_event
            # is read, our avail_event before its avail index is read again.
            release()
            acquire()
            old = queue.signalled_used
            if old != start:
                # vring_need_event(): did `start` pass the index the driver asked to hear of?
                if (start - avail[used_event_slot] - 1) & 0xFFFF < (start - old) & 0xFFFF:
                    # `call.signal()`, inlined: a method call here would be one per request.
                    write = call.write
                    if write is not None:
                        try:
                            write(SIGNAL)  # None if the counter is saturated: a wake-up is due
                        except OSError as exc:
                            raise call.failed(exc) from exc
                    counts.interrupts += 1
                queue.signalled_used = start
            if not empty or avail[1] != start:
                if polling:
                    polling = False
                    counts.polled += 1  # posted without a kick: we had not asked for one
                if self.stopping:
                    raise _Stopped
                continue
            if polling:
                # BusyPoll: look for the next request before asking for a kick. (Without a
                # slot free, ask at once.)
                polling = False
                assert busy_poll is not None  # polling is set only with a window
                try:
                    busy_poll.take()
                except queues.Empty:
                    pass
                else:
                    try:
                        end = clock() + window
                        while avail[1] == start and clock() < end and not self.stopping:
                            os.sched_yield()
                    finally:
                        busy_poll.give(None)
                if avail[1] == start:
                    # Ask for a kick, then look again: a request posted before the driver saw
                    # avail_event would have none (the fence as above).
                    used[avail_event_slot] = start
                    release()
                    acquire()
                if avail[1] != start:
                    counts.polled += 1
                    if self.stopping:
                        raise _Stopped
                    continue
            # A stop is told by the stop fd while asleep, by `stopping` while busy. At most
            # two events (kick, stop): without the bound, epoll.poll allocates room for 1023.
            for fd, events in poll(None, 2):
                if fd == stop_fd:
                    return
                if events & _EPOLL_TROUBLE:
                    raise EventfdError(f"kick fd reports poll events {events:#x}")
                counts.kicks += 1

    def serve_without_event_idx(self) -> None:
        """The same for a ring without EVENT_IDX (flags say whether to interrupt, and the
        driver always kicks), through the queue's own steps: no guest of today's is here."""
        assert self._epoll is not None
        poll, stop_fd = self._epoll.poll, self._stop_fd
        queue = self.queue
        while not self.stopping:
            pending = queue.pending()
            if pending:
                self.serve_batch(pending)
                if self.stopping:
                    raise _Stopped
                self.flush()
            elif not queue.arm():
                for fd, events in poll(None, 2):
                    if fd == stop_fd:
                        return
                    if events & _EPOLL_TROUBLE:
                        raise EventfdError(f"kick fd reports poll events {events:#x}")
                    self.counts.kicks += 1
        raise _Stopped

    def flush(self) -> None:
        """Publish the completions made so far; interrupt the guest if it wants to hear."""
        if self.queue.publish():
            self.call.signal()
            self.counts.interrupts += 1

    def serve_batch(self, pending: int) -> None:
        """Serve up to `pending` requests (fewer if the budget or a batch's bounds say so)."""
        queue = self.queue
        heads = queue.heads(pending)
        # A ring kept full of buffers seen before, within the bounds and the credit: every
        # step at C speed (map, sum, one readv, one store of the used elements).
        entries = queue.lone_at(heads)
        if all(entries) and len(entries) <= _IOV_MAX:
            found = cast(list[Lone], entries)
            lengths = list(map(_FIRST, found))
            total = sum(lengths)
            if total <= MAX_BATCH_BYTES and (self.unlimited or self.take_credit(total) == total):
                self.fill(heads, list(map(_SECOND, found)), lengths, total)
                return
        # Anything else, a step at a time.
        self.serve_chains(heads)

    def serve_chains(self, heads: list[int]) -> None:
        """`serve_batch` for requests that are not all plain buffers seen before, or more
        than a batch's bounds or the credit let through at once: walk the chains, take one
        grant for all of them, lay out what it covers, fill."""
        chains, total = self.walk(heads)
        want = total if total < MAX_BATCH_BYTES else MAX_BATCH_BYTES
        credit = want if self.unlimited or not want else self.take_credit(want)
        iov: list[memoryview] = []
        takes = lay_out_batch(chains, credit, iov)
        self.fill(heads, iov, takes, sum(takes))

    def walk(self, heads: list[int]) -> tuple[list[list[Segment] | None], int]:
        """The chains of `heads`, in order, as far as a batch's bytes go, and their bytes.
        A chain the guest broke is None: it is refused (completed empty) with one line."""
        chain_of = self.queue.chain
        chains: list[list[Segment] | None] = []
        total = 0
        for head in heads:
            try:
                chain = chain_of(head)
            except ChainError as exc:
                self.incident("request %d refused, completed empty: %s", head, exc)
                self.counts.malformed += 1
                chains.append(None)
                continue
            chains.append(chain)
            total += chain[0].length if len(chain) == 1 else sum(s.length for s in chain)
            if total >= MAX_BATCH_BYTES:
                break
        return chains, total

    def fill(self, heads: list[int], iov: list[memoryview], takes: list[int], total: int) -> None:
        """One read into `iov` (`total` bytes laid out as `takes`, per request of `heads`),
        then the used elements, in order, of the requests it reached."""
        count = 0
        if iov:
            count = self.source.read(iov)
            if count <= 0:
                count = self.wait_for_source(iov, count)
        if count < total:
            takes = _fills(takes, count)  # a short read: the rest wait
        self.queue.put_used_many(heads, takes)
        if not self.unlimited:
            self.credit -= count
        self.counts.bytes += count
        self.counts.requests += len(takes)

    def take_credit(self, want: int) -> int:
        """Up to `want` bytes of budget: from the credit held, topped up from the scheduler
        when it is short (one trio round trip per lease, not per request)."""
        credit = self.credit
        if credit and self.clock_reader() >= self.deadline:
            credit = self.credit = 0  # granted for a window that is over
        if credit < want:
            # Asking may park this ring until the refill: let the guest see what is done.
            self.flush()
            granted, until = trio.from_thread.run(self._grant, want - credit, credit)
            if until != self.credit_until:
                credit = 0  # what was held belongs to a window that is over
            credit += granted
            self.credit, self.credit_until = credit, until
            self.deadline = until - self.clock_offset
        return want if want <= credit else credit

    async def _grant(self, want: int, held: int) -> tuple[int, float]:
        # Runs in the owning task, in trio: the scheduler is not thread-safe. Asks for a
        # lease beyond `want` (what is free for this guest anyway) so that the next
        # requests need no round trip; bytes left over go back when the ring stops, or lapse
        # with the window (charged to it, so it is never exceeded).
        budget = self.budget
        granted = budget.try_acquire(want, spare=budget.lease - want)
        until = budget.window_end()
        if not granted and not (held and until == self.credit_until):
            # Nothing left for this guest now, nor held: park until the refill, and count
            # the wait.
            parked_at = trio.current_time()
            try:
                granted = await budget.acquire(want)
            finally:
                self.counts.parked += trio.current_time() - parked_at
            self.counts.held_back += granted
            until = budget.window_end()
        return granted, until

    def wait_for_source(self, iov: list[memoryview], count: int) -> int:
        """Fill `iov` from a source that just gave `count` (end of file or WOULD_BLOCK):
        at least one byte, waiting (stoppably) for it."""
        source = self.source
        while True:
            self.flush()
            if count == WOULD_BLOCK:
                ready = select.poll()
                ready.register(source.fd, select.POLLIN)
                ready.register(self._stop_fd, select.POLLIN)
                if any(fd == self._stop_fd for fd, _ in ready.poll()):
                    raise _Stopped
            elif wait_readable(self._stop_fd, source.eof_retry * 1000):
                raise _Stopped
            count = source.read(iov)
            if count > 0:
                return count


def _no_read(buffer: memoryview) -> int | None:
    return None


def _fills(lengths: list[int], count: int) -> list[int]:
    """How much of `count` bytes, read into buffers of `lengths` in order, each request got,
    up to the first that got nothing of what it was laid out for (a short read: it and the
    rest wait for the next batch). A length of 0, a request completed empty, always fits."""
    fills = []
    for length in lengths:
        written = length if length <= count else count
        if written == 0 and length:
            break
        count -= written
        fills.append(written)
    return fills


def lay_out_batch(
    chains: list[list[Segment] | None], credit: int, iov: list[memoryview]
) -> list[int]:
    """Append views of the chains' buffers to `iov`, as far as `credit` and readv's limit
    go; return how many bytes each request (in order, up to the first left out) may take.
    A refused chain (None) takes 0."""
    takes: list[int] = []
    for segments in chains:
        if segments is None:
            takes.append(0)
            continue
        limit = credit if credit < MAX_REQUEST_BYTES else MAX_REQUEST_BYTES
        if limit == 0:
            break
        if len(segments) == 1 and segments[0].length <= limit:
            # The common request, one buffer that fits, without a call.
            segment = segments[0]
            assert segment.buffer is not None
            iov.append(segment.buffer)
            laid = segment.length
        else:
            room = _IOV_MAX - len(iov)
            if len(segments) > room:
                if iov:
                    break
                # A chain longer than readv takes is filled as far as its first buffers go.
                segments = segments[:room]
            laid = lay_out(segments, limit, iov)
        credit -= laid
        takes.append(laid)
    return takes


def lay_out(segments: list[Segment], limit: int, iov: list[memoryview]) -> int:
    """Append views of the first `limit` bytes of a chain's buffers to `iov`; return how many
    bytes they hold (less than `limit` if the chain is shorter)."""
    laid = 0
    for segment in segments:
        buffer = segment.buffer
        assert buffer is not None
        room = limit - laid
        if segment.length <= room:
            iov.append(buffer)
            laid += segment.length
        else:
            iov.append(buffer[:room])
            return limit
    return laid


def clock_reader(clock: trio.abc.Clock) -> tuple[Callable[[], float], float]:
    """A function reading `clock` from any thread, and what to add to its readings to get
    the clock's time. trio's own clock is `time.perf_counter` plus a fixed offset: reading
    that directly saves the request path a Python call."""
    offset = getattr(clock, "offset", None)
    if (
        type(clock).__name__ == "SystemClock"
        and isinstance(offset, float)
        and abs(clock.current_time() - offset - time.perf_counter()) < 1.0
    ):
        return time.perf_counter, offset
    return clock.current_time, 0.0


class _Stopped(Exception):
    """The owning task asked the thread to stop while it waited."""
