"""A guest in a process of its own, fast enough to load a back-end: for `scripts/bench`.

`Frontend` does the vhost-user part as QEMU 7.2 does (VERSION_1, EVENT_IDX, INDIRECT_DESC and
PROTOCOL_FEATURES negotiated); then `FastRing` drives the split ring from a synchronous loop.
`DriverQueue` checks every byte the device writes, which costs more than the device's work, so
a benchmark guest built on it measures the guest. Here the descriptor table is built once
(descriptor i -> buffer i, device-writable) and each round moves every used head back into
the avail ring with slice copies between typed views, publishes them with one avail-index
store and kicks only when EVENT_IDX says so.

The process takes JSON commands on stdin, one a line, and answers each with one JSON line on
stdout (``python -m rngd.testing.loadgen guest --socket PATH [--daemon-pid PID]``):

* ``{"cmd": "start", "queue_size": Q, "chunk": B}``: connect if not connected (else reset the
  device), start a ring of Q descriptors of B bytes, send one full ring through it.
* ``{"cmd": "run", "mode": "full"|"single", "at": T, "seconds": S}``: at monotonic time T
  (shared by every process on the host) run for S seconds: ``full`` keeps the ring full,
  ``single`` keeps one request in flight and times each. The answer has the requests, bytes,
  seconds, the daemon's CPU time over exactly that window, and for ``single`` the latencies.
  With ``"requests": N`` as well the run also ends once N requests are done (``full`` ends
  after the batch that reaches N); ``served`` in the answer counts every request the device
  completed in the run, the ones still in flight at its end included (what the daemon did:
  for instruction counts). ``"settle": true`` (``single`` only) posts each request only once
  every thread of the daemon sleeps, as it would behind a real guest's round trip.
* ``{"cmd": "close"}``: hang up.

``raw --source FILE`` answers ``run`` commands (with ``chunk``) by reading the source with
``os.readv`` into one reused buffer: the baseline.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import os
import select
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from rngd.protocol.constants import VirtioFeatures
from rngd.testing.driver import DESC_F_WRITE, DeviceMisbehaved, DriverQueue, need_event
from rngd.testing.frontend import Frontend, connect_when_listening, generation_layout

_ONE = (1).to_bytes(8, "little")
#: A device that leaves requests unanswered this long is stuck (or dead): fail, don't hang.
STALL_SECONDS = 10.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")

_FENCE = threading.Lock()


def _fence() -> None:
    # The store-load barrier EVENT_IDX needs (see driver.py): an uncontended lock is a locked
    # read-modify-write.
    with _FENCE:
        pass


# -- what the kernel says about a process ---------------------------------------------------


@dataclass(frozen=True)
class CpuSample:
    """CPU time of a process: per thread in ns (schedstat), and all threads in clock ticks."""

    threads: dict[int, int]
    ticks: int


def cpu_sample(pid: int) -> CpuSample:
    threads: dict[int, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                threads[int(tid)] = int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended between listdir and open
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces and parentheses: fields count from the last ")".
        fields = f.read().rpartition(")")[2].split()
    return CpuSample(threads, int(fields[11]) + int(fields[12]))


def cpu_ns_between(before: CpuSample, after: CpuSample) -> int:
    """CPU time the process used between two samples, in ns."""
    if before.threads.keys() <= after.threads.keys():
        return sum(ns - before.threads.get(tid, 0) for tid, ns in after.threads.items())
    # A thread ended in between and its schedstat went with it; the process's tick counts
    # keep dead threads' time, at clock-tick precision.
    return (after.ticks - before.ticks) * 1_000_000_000 // _CLK_TCK


def context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of every thread of ``pid`` so far."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def all_asleep(pid: int) -> bool:
    """Every thread of ``pid`` is asleep (state S: blocked in a system call, such as a poll)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended between listdir and open
        if state != "S":
            return False
    return True


def wait_asleep(pid: int, timeout: float = STALL_SECONDS) -> None:
    """Return once every thread of ``pid`` has been seen asleep twice, 100 µs apart."""
    deadline = time.monotonic() + timeout
    while True:
        if all_asleep(pid):
            time.sleep(0.0001)
            if all_asleep(pid):
                return
        if time.monotonic() > deadline:
            raise DeviceMisbehaved(f"process {pid} did not go to sleep in {timeout:.0f} s")
        time.sleep(0.0001)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


# -- the ring -------------------------------------------------------------------------------


@dataclass
class Window:
    """What one timed run did."""

    requests: int
    bytes: int
    seconds: float
    #: CPU time of the measured process (the daemon, or the raw reader itself) in the window.
    cpu_ns: int | None
    #: CPU time of the guest process itself in the window: it must stay well below the
    #: daemon's for the daemon to be what is measured.
    guest_cpu_ns: int | None = None
    #: Kicks the guest sent and times it slept for a call: what notification suppression saved.
    kicks: int = 0
    waits: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    #: Requests the device completed from the run's start through the drain that ends it:
    #: ``requests`` plus those in flight when the run ended.
    served: int = 0


class FastRing:
    """The driver side of a started split ring whose descriptors all point at fixed buffers.

    Between runs the ring is idle: every descriptor free, nothing in the avail ring that the
    device has not used.
    """

    def __init__(self, queue: DriverQueue, chunk: int) -> None:
        if not queue.event_idx:
            raise ValueError("FastRing needs EVENT_IDX")
        if queue.kick_fd is None or queue.call_fd is None or queue.masked_call_fd is None:
            raise ValueError("the queue is not started")
        memory, size = queue.memory, queue.size
        self.size = size
        self.chunk = chunk
        for head in range(size):
            queue.raw_write_desc(head, memory.alloc(chunk, 64), chunk, DESC_F_WRITE, 0)
        self._kick_fd = queue.kick_fd
        # Typed views: an item store is one aligned access, so the device never sees half an
        # index (struct.pack_into would zero the field first).
        self._avail_bytes = memory.view(queue.avail_ring, 6 + 2 * size)
        self._used_bytes = memory.view(queue.used_ring, 6 + 8 * size)
        # avail: flags, idx, ring[size], used_event
        self._avail = self._avail_bytes.cast("H")
        # used: flags, idx, {id u32, len u32}[size], avail_event. As u16s, entry k's id (always
        # below 32768) is item 2 + 4k, so heads go back to the avail ring by strided copy.
        self._used = self._used_bytes.cast("H")
        self._elems = self._used_bytes[4 : 4 + 8 * size].cast("I")
        self._avail_idx = queue.avail_idx
        self._kicked_at = self._avail_idx
        self._seen = int(self._used[1])
        # QEMU polls the masked notifier and injects what arrives there: a call sent before the
        # back-end switched to the guest notifier still counts.
        self._poll = select.poll()
        self._call_fds = (queue.call_fd, queue.masked_call_fd)
        for fd in self._call_fds:
            self._poll.register(fd, select.POLLIN)
        self._heads = array.array("H", range(size))
        self.kicks = 0
        self.waits = 0

    def close(self) -> None:
        """Let go of guest memory (before it is closed or replaced)."""
        for view in (self._avail, self._used, self._elems, self._avail_bytes, self._used_bytes):
            view.release()

    def _wait(self) -> None:
        """Block until the device calls."""
        self.waits += 1
        events = self._poll.poll(int(STALL_SECONDS * 1000))
        if not events:
            raise DeviceMisbehaved(
                f"no call for {STALL_SECONDS:.0f} s with {(self._avail_idx - self._seen) & 0xFFFF}"
                " requests in flight"
            )
        for fd, _ in events:
            with contextlib.suppress(BlockingIOError):
                os.read(fd, 8)

    def _publish(self, new: int) -> None:
        """Store the avail index, then kick if the device asked to hear of it."""
        self._avail[1] = new
        self._avail_idx = new
        _fence()
        event = int(self._used[2 + 4 * self.size])
        if need_event(event, new, self._kicked_at):
            os.write(self._kick_fd, _ONE)
            self.kicks += 1
        self._kicked_at = new

    def _repost(self, used_slot: int, count: int) -> None:
        """Copy the heads of ``count`` used entries from ``used_slot`` into the avail ring."""
        avail, used, size = self._avail, self._used, self.size
        slot = self._avail_idx & (size - 1)
        while count:
            n = min(count, size - used_slot, size - slot)
            avail[2 + slot : 2 + slot + n] = used[2 + 4 * used_slot : 2 + 4 * (used_slot + n) : 4]
            used_slot = (used_slot + n) & (size - 1)
            slot = (slot + n) & (size - 1)
            count -= n

    def drain(self) -> None:
        """Wait until the device has used everything posted."""
        used_event = 2 + self.size
        while (seen := int(self._used[1])) != self._avail_idx:
            self._avail[used_event] = seen
            _fence()
            if self._used[1] == seen:
                self._wait()
        self._seen = seen

    def run_full(self, until_ns: int, pid: int | None, max_requests: int | None = None) -> Window:
        """Keep every descriptor posted until ``until_ns`` (time.monotonic_ns), or until the
        batch that completes ``max_requests``."""
        avail, used, elems = self._avail, self._used, self._elems
        size, mask, chunk = self.size, self.size - 1, self.chunk
        used_event = 2 + size
        clock = time.monotonic_ns
        limit = sys.maxsize if max_requests is None else max_requests
        requests = nbytes = 0
        cpu0 = None if pid is None else cpu_sample(pid)
        own0 = time.process_time_ns()
        kicks0, waits0 = self.kicks, self.waits
        t0 = clock()
        # The ring is idle and every descriptor free: offer them all.
        slot = self._avail_idx & mask
        first = size - slot
        avail[2 + slot : 2 + size] = self._heads[:first]
        avail[2 : 2 + slot] = self._heads[first:]
        self._publish((self._avail_idx + size) & 0xFFFF)
        seen = self._seen
        while True:
            now_used = int(used[1])
            count = (now_used - seen) & 0xFFFF
            if not count:
                # About to sleep: ask for a call at the next completion, then look once more
                # (a completion between our look and the store would not call).
                avail[used_event] = seen
                _fence()
                if used[1] == seen:
                    self._wait()
                continue
            if count > size:
                raise DeviceMisbehaved(f"used idx {now_used} is {count} past {seen}")
            start = seen & mask
            end = start + count
            if end <= size:
                got = sum(elems[2 * start + 1 : 2 * end : 2])
            else:
                got = sum(elems[2 * start + 1 :: 2]) + sum(elems[1 : 2 * (end - size) : 2])
            if got > count * chunk:
                raise DeviceMisbehaved(f"{got} bytes used in {count} buffers of {chunk}")
            requests += count
            nbytes += got
            self._repost(start, count)
            seen = now_used
            self._seen = seen
            if clock() >= until_ns or requests >= limit:
                break
            self._publish((self._avail_idx + count) & 0xFFFF)
        t1 = clock()
        own = time.process_time_ns() - own0
        cpu = None if pid is None or cpu0 is None else cpu_ns_between(cpu0, cpu_sample(pid))
        kicks, waits = self.kicks - kicks0, self.waits - waits0
        self.drain()
        served = requests + ((self._seen - seen) & 0xFFFF)
        return Window(requests, nbytes, (t1 - t0) / 1e9, cpu, own, kicks, waits, served=served)

    def run_single(
        self,
        until_ns: int,
        pid: int | None,
        max_requests: int | None = None,
        settle: bool = False,
    ) -> Window:
        """One request in flight, as the Linux driver: post, kick, wait for the call, repeat;
        until ``until_ns`` or ``max_requests`` requests.

        With ``settle``, each request waits until every thread of the daemon ``pid`` sleeps:
        as behind a real guest, whose round trip is long enough for the daemon to go back to
        its poll, and unlike a daemon slowed down by valgrind, which would otherwise find the
        next request before it sleeps and never pay for the wake-up.
        """
        avail, used, elems = self._avail, self._used, self._elems
        mask = self.size - 1
        used_event = 2 + self.size
        clock = time.monotonic_ns
        latencies = array.array("q")
        limit = sys.maxsize if max_requests is None else max_requests
        requests = nbytes = 0
        seen = self._seen
        cpu0 = None if pid is None else cpu_sample(pid)
        own0 = time.process_time_ns()
        kicks0, waits0 = self.kicks, self.waits
        t0 = clock()
        settle_pid = pid if settle else None
        while True:
            if settle_pid is not None:
                wait_asleep(settle_pid)
            posted = clock()
            if posted >= until_ns or requests >= limit:
                break
            # One in flight and it came back: every descriptor is free.
            head = self._avail_idx & mask
            avail[2 + head] = head
            avail[used_event] = seen
            self._publish((self._avail_idx + 1) & 0xFFFF)
            while used[1] == seen:
                self._wait()
            latencies.append(clock() - posted)
            got = int(elems[2 * (seen & mask) + 1])
            if got > self.chunk:
                raise DeviceMisbehaved(f"{got} bytes used in a buffer of {self.chunk}")
            nbytes += got
            requests += 1
            seen = (seen + 1) & 0xFFFF
            self._seen = seen
        t1 = clock()
        own = time.process_time_ns() - own0
        cpu = None if pid is None or cpu0 is None else cpu_ns_between(cpu0, cpu_sample(pid))
        kicks, waits = self.kicks - kicks0, self.waits - waits0
        return Window(
            requests,
            nbytes,
            (t1 - t0) / 1e9,
            cpu,
            own,
            kicks,
            waits,
            latencies.tolist(),
            served=requests,  # one in flight, and it came back
        )


# -- the guest process ----------------------------------------------------------------------


class Guest:
    """One vhost-user connection and its ring, driven by commands."""

    def __init__(self, socket_path: str, daemon_pid: int | None) -> None:
        self.socket_path = socket_path
        self.daemon_pid = daemon_pid
        self.vmm: Frontend | None = None
        self.ring: FastRing | None = None

    def start(self, queue_size: int, chunk: int) -> dict[str, Any]:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        queue = trio.run(self._start, queue_size, chunk)
        self.ring = FastRing(queue, chunk)
        # One full ring through the device: proves it works, faults the buffers in.
        self.ring.run_full(0, None)
        assert self.vmm is not None
        return {"features": self.vmm.acked_features}

    async def _start(self, queue_size: int, chunk: int) -> DriverQueue:
        if self.vmm is None:
            self.vmm = await connect_when_listening(self.socket_path, timeout=10.0)
            await self.vmm.handshake()
        else:
            # A device reset, as a rebooting guest: new memory and rings, base 0.
            await self.vmm.stop()
            self.vmm.generation += 1
        vmm = self.vmm
        # Each region can hold every buffer; pages nobody touches cost nothing.
        size = max(1 << 20, -(-(queue_size * chunk + (64 << 10)) // (1 << 20)) * (1 << 20))
        queue = vmm.prepare_driver(queue_size, layout=generation_layout(vmm.generation, size))
        await vmm.start(queue)
        wanted = VirtioFeatures.RING_EVENT_IDX | VirtioFeatures.VERSION_1
        if vmm.acked_features & wanted != wanted:
            raise RuntimeError(
                f"back-end did not offer EVENT_IDX and VERSION_1 ({vmm.device_features:#x})"
            )
        # A request with a reply: once it comes, every message before it has been handled.
        await vmm.get_features()
        return queue

    def run(
        self, mode: str, until_ns: int, max_requests: int | None = None, settle: bool = False
    ) -> Window:
        if self.ring is None:
            raise RuntimeError("run before start")
        if mode == "full":
            return self.ring.run_full(until_ns, self.daemon_pid, max_requests)
        if mode == "single":
            if settle and self.daemon_pid is None:
                raise ValueError("settle needs --daemon-pid")
            return self.ring.run_single(until_ns, self.daemon_pid, max_requests, settle)
        raise ValueError(f"unknown mode {mode!r}")

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self.vmm is not None:
            trio.run(self.vmm.aclose)
            self.vmm = None


def raw_reads(fd: int, chunk: int, until_ns: int) -> Window:
    """``os.readv`` of ``chunk`` bytes into one reused buffer until ``until_ns``."""
    buffers = [memoryview(bytearray(chunk))]
    # Look at the clock every ~1 MiB: often enough, and cheap next to the reads.
    batch = max(1, (1 << 20) // chunk)
    clock = time.monotonic_ns
    reads = 0
    cpu0 = time.process_time_ns()
    t0 = clock()
    while clock() < until_ns:
        for _ in range(batch):
            if os.readv(fd, buffers) < chunk:
                os.lseek(fd, 0, os.SEEK_SET)  # a regular file at its end: start over
        reads += batch
    t1 = clock()
    cpu = time.process_time_ns() - cpu0
    return Window(reads, reads * chunk, (t1 - t0) / 1e9, cpu, served=reads)


def _until(command: dict[str, Any]) -> int:
    """Sleep until the command's start time; return its end time (time.monotonic_ns)."""
    start = float(command["at"])
    delay = start - time.monotonic()
    if delay > 0:
        time.sleep(delay)  # a plain process, no event loop: a sleep is what we want
    return int((start + float(command["seconds"])) * 1e9)


def _serve(handle: Any) -> int:
    """Answer commands from stdin until EOF or ``close``."""
    for line in sys.stdin:
        command: dict[str, Any] = json.loads(line)
        try:
            reply: dict[str, Any] | None = handle(command)
        except Exception as exc:
            traceback.print_exc()
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
            return 1
        if reply is None:
            return 0
        print(json.dumps(reply), flush=True)
    return 0


def guest_main(socket_path: str, daemon_pid: int | None) -> int:
    guest = Guest(socket_path, daemon_pid)

    def handle(command: dict[str, Any]) -> dict[str, Any] | None:
        name = command["cmd"]
        if name == "start":
            return guest.start(int(command["queue_size"]), int(command["chunk"]))
        if name == "run":
            limit = command.get("requests")
            window = guest.run(
                str(command["mode"]),
                _until(command),
                None if limit is None else int(limit),
                bool(command.get("settle", False)),
            )
            return asdict(window)
        if name == "close":
            guest.close()
            return {}
        raise ValueError(f"unknown command {name!r}")

    try:
        return _serve(handle)
    finally:
        guest.close()


def raw_main(source: str) -> int:
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)

    def handle(command: dict[str, Any]) -> dict[str, Any] | None:
        if command["cmd"] != "run":
            raise ValueError(f"unknown command {command['cmd']!r}")
        return asdict(raw_reads(fd, int(command["chunk"]), _until(command)))

    try:
        return _serve(handle)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rngd.testing.loadgen", description=__doc__)
    sub = parser.add_subparsers(dest="role", required=True)
    guest = sub.add_parser("guest", help="play one guest on a vhost-user socket")
    guest.add_argument("--socket", required=True)
    guest.add_argument("--daemon-pid", type=int, help="measure this process's CPU time")
    raw = sub.add_parser("raw", help="read the source directly (the baseline)")
    raw.add_argument("--source", required=True)
    args = parser.parse_args(argv)
    if args.role == "guest":
        return guest_main(args.socket, args.daemon_pid)
    return raw_main(args.source)


if __name__ == "__main__":
    sys.exit(main())
