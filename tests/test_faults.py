"""Faults: VMMs that die, signals while guests wait, entropy sources in trouble, and many
connections. Each has a documented behaviour; none stalls the event loop or another guest.

The daemon runs as a real subprocess where its fds, memory or signals are checked, and in
this process where only its behaviour is (faster).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import tty
from collections.abc import Awaitable, Callable

import pytest
import trio

import rngd
from rngd.config import DaemonConfig
from rngd.daemon import Daemon, SocketServer
from rngd.health import HealthMode
from rngd.testing import (
    DaemonProcess,
    Frontend,
    daemon_in_process,
    daemon_process,
)

STEP = 5.0


async def serves(path: str, nbytes: int = 64) -> bytes:
    async with await Frontend.connect(path) as vmm:
        await vmm.start_qemu72(4)
        data = await vmm.read_random(nbytes)
        assert len(data) == nbytes
        return data


async def settled_fd_count(daemon: DaemonProcess, path: str) -> int:
    """The daemon's fd count once it has released the previous VMM on `path` and on each of
    its other sockets (the readiness probes of `daemon_process` included): it serves one VMM
    per socket at a time, so its reply to a probe on each proves the previous ones are gone.
    Counted while the probes are connected, one per socket."""
    async with contextlib.AsyncExitStack() as probes:
        for each in [path, *(p for p in daemon.socket_paths if p != path)]:
            probe = await probes.enter_async_context(await Frontend.connect(each))
            await probe.get_features()
        return daemon.fd_count()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- a VMM in another process, killed ------------------------------------------------------

# The child plays a VMM with the rngd.testing front-end, says "ready" at the chosen moment and
# waits to be killed.
_CHILD = r"""
import os, signal, struct, sys
import trio
from rngd.protocol.codec import encode_message
from rngd.protocol.constants import Request
from rngd.protocol.payloads import encode_memory_table
from rngd.testing import Frontend, GuestMemory

async def main(path, moment):
    vmm = await Frontend.connect(path)
    if moment == "mid_message":
        await vmm.handshake()
        memory = GuestMemory()
        whole = encode_message(Request.SET_MEM_TABLE, encode_memory_table(memory.table), 8)
        # Header and part of the payload, with the region fds: the rest never comes.
        await vmm.send_raw(whole[:30], memory.fds)
        print("ready", flush=True)
    elif moment == "mid_batch":
        queue = await vmm.start_qemu72(256)
        await queue.read_random(1 << 16, chunk=4096, in_flight=None)
        print("ready", flush=True)
        # The ring kept full until the kill: the daemon is in the middle of a batch.
        await queue.read_random(1 << 40, chunk=4096, in_flight=None)
    else:
        queue = await vmm.start_qemu72(256)
        for _ in range(256):
            queue.post(4096, publish=False)
        queue.publish()
        queue.kick(force=True)
        print("ready", flush=True)
    await trio.sleep_forever()

trio.run(main, sys.argv[1], sys.argv[2])
"""


async def run_and_kill_vmm(path: str, moment: str) -> None:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(rngd.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-P", "-c", _CHILD, path, moment],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    try:
        assert proc.stdout is not None
        got = b""
        while b"ready\n" not in got:
            chunk = await proc.stdout.receive_some(64)
            assert chunk, f"child VMM exited before it was ready ({got!r})"
            got += chunk
        proc.kill()  # SIGKILL: no goodbye, the kernel closes its end
        assert await proc.wait() == -signal.SIGKILL
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()


@pytest.mark.parametrize("moment", ["mid_message", "mid_batch", "parked_on_budget"])
async def test_vmm_sigkilled(moment: str, workdir: str) -> None:
    """Behaviour: the daemon sees the hang-up, cancels the connection's tasks (a batch being
    served, a request parked on the budget), unmaps its memory, closes every fd it received,
    and the socket takes the next VMM; the other socket is served throughout."""
    throttled = moment == "parked_on_budget"
    async with daemon_process(
        os.path.join(workdir, "rng.sock"),
        socket_count=2,
        filename="/dev/urandom",
        # 2 sockets: 4096 bytes each per minute; the child's 256 requests park after one.
        max_bytes=8192 if throttled else None,
        log_level="info",
    ) as daemon:
        path0, path1 = daemon.socket_paths
        with trio.fail_after(STEP):
            baseline = await settled_fd_count(daemon, path0)
            await run_and_kill_vmm(path0, moment)
            assert await settled_fd_count(daemon, path0) == baseline, daemon.log()[-2000:]
            if throttled:
                # Budget spent: a new VMM on either socket is answered (not served).
                await assert_responsive(path0)
                await assert_responsive(path1)
            else:
                await serves(path0)
                await serves(path1)
        log = daemon.log()
        assert "Traceback" not in log
        assert "VMM disconnected" in log or "hung up in the middle of a message" in log
        if moment == "mid_message":
            assert "hung up in the middle of a message" in log


# -- SIGTERM while guests wait for the budget -----------------------------------------------


async def test_sigterm_while_guests_parked_on_rate_limit(
    workdir: str, source: tuple[str, bytes]
) -> None:
    """`-m 64 -p 65536`: each guest drains its budget, then a request parks for a minute.
    SIGTERM ends the daemon within 1 s, exit status 0, socket files removed."""
    frontends: list[Frontend] = []
    try:
        async with daemon_process(
            os.path.join(workdir, "rng.sock"),
            socket_count=2,
            filename=source[0],
            max_bytes=64,
            period_ms=65536,
            check_exit=False,
            log_level="info",
        ) as daemon:
            with trio.fail_after(STEP):
                for path in daemon.socket_paths:
                    vmm = await Frontend.connect(path)
                    frontends.append(vmm)
                    queue = await vmm.start_qemu72(4)
                    # 64 bytes split over 2 sockets: 32 each, then nothing for 65.5 s.
                    queue.post(64)
                    queue.kick()
                    (used,) = await queue.wait_used()
                    assert used.len == 32
                    queue.post(64)
                    queue.kick()
                    await vmm.get_features()
                    assert queue.in_flight == 1  # parked, not served
            start = trio.current_time()
            code = await daemon.terminate(timeout=1.0)
            assert trio.current_time() - start < 1.0
            assert code == 0, daemon.log()
            for path in daemon.socket_paths:
                assert not os.path.lexists(path)
    finally:
        for vmm in frontends:
            await vmm.aclose()


# -- the entropy source in trouble ---------------------------------------------------------
# One source is shared by every socket (as the original: one --filename): when it has
# nothing to give, every guest's requests wait, on every socket. What must go on is
# everything else: the protocol on every connection, other rings, the daemon.


async def assert_responsive(path: str, rounds: int = 20, limit: float = 0.25) -> None:
    """A new VMM on `path` gets `rounds` replies, each within `limit` seconds."""
    async with await Frontend.connect(path) as vmm:
        for _ in range(rounds):
            with trio.fail_after(limit):
                await vmm.get_features()


async def test_regular_file_at_eof_waits_then_serves_appended_data(workdir: str) -> None:
    """Behaviour: at end of file a request waits (it is not completed empty, which would make
    the guest spin); the file is retried every second, so appended data is served."""
    path = os.path.join(workdir, "short")
    head, tail = os.urandom(128), os.urandom(64)
    with open(path, "wb") as f:
        f.write(head)
    async with (
        daemon_in_process(
            os.path.join(workdir, "rng.sock"),
            filename=path,
            socket_count=2,
            health_tests=HealthMode.OFF,  # 192 bytes: less than the start-up test takes
        ) as paths,
        await Frontend.connect(paths[0]) as vmm,
    ):
        queue = await vmm.start_qemu72(4)
        with trio.fail_after(STEP):
            assert await queue.read_random(128) == head
            queue.post(64)
            queue.kick()
            # Waiting: the protocol is answered here and on the other socket meanwhile.
            await vmm.get_features()
            await assert_responsive(paths[1])
            assert queue.in_flight == 1
            with open(path, "ab") as f:
                f.write(tail)
            (used,) = await queue.wait_used()
        assert used.data == tail


async def test_fifo_without_writer(workdir: str) -> None:
    """Behaviour: the daemon starts on a FIFO nobody writes to yet (opened non-blocking);
    requests wait, the protocol is answered on every socket, and once a writer comes the
    waiting request is served with its bytes."""
    fifo = os.path.join(workdir, "fifo")
    os.mkfifo(fifo)
    async with (
        daemon_in_process(
            os.path.join(workdir, "rng.sock"),
            filename=fifo,
            socket_count=2,
            health_tests=HealthMode.OFF,  # 64 bytes: less than the start-up test takes
        ) as paths,
        await Frontend.connect(paths[0]) as vmm,
    ):
        queue = await vmm.start_qemu72(4)
        with trio.fail_after(STEP):
            queue.post(64)
            queue.kick()
            await vmm.get_features()
            await assert_responsive(paths[1])
            assert queue.in_flight == 1
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            try:
                data = os.urandom(64)
                os.write(writer, data)
                (used,) = await queue.wait_used()
            finally:
                os.close(writer)
        assert used.data == data


async def test_slow_source_parks_only_the_reader(workdir: str) -> None:
    """Behaviour: a FIFO fed 16 bytes every 20 ms serves short completions as bytes come
    (virtio-rng allows fewer bytes than offered); while it trickles, another socket's
    protocol requests are answered promptly (the loop is not blocked by the reader)."""
    fifo = os.path.join(workdir, "fifo")
    os.mkfifo(fifo)
    fed = bytearray()

    async def trickle(writer: int) -> None:
        while True:
            chunk = os.urandom(16)
            os.write(writer, chunk)
            fed.extend(chunk)
            await trio.sleep(0.02)

    async with daemon_in_process(
        os.path.join(workdir, "rng.sock"),
        filename=fifo,
        socket_count=2,
        health_tests=HealthMode.OFF,  # a trickle of 16 bytes: served as it comes
    ) as paths:
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle, writer)
                async with await Frontend.connect(paths[0]) as vmm:
                    await vmm.start_qemu72(4)
                    with trio.fail_after(STEP):
                        async with trio.open_nursery() as inner:
                            inner.start_soon(assert_responsive, paths[1], 30, 0.1)
                            got = await vmm.read_random(256, chunk=256)
                    assert got == bytes(fed[:256])
                nursery.cancel_scope.cancel()
        finally:
            os.close(writer)


async def test_slow_character_device_is_read_in_a_thread(workdir: str) -> None:
    """Behaviour: a character device that cannot be polled (as /dev/hwrng) is read in a
    worker thread. Played here by a pty in raw mode fed by hand: the guest gets exactly the
    bytes written, other sockets are answered while the read blocks, and SIGTERM ends the
    daemon within 1 s even with a read still blocked (the daemon_process check)."""
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        device = os.ttyname(slave)
        async with (
            daemon_process(
                os.path.join(workdir, "rng.sock"),
                filename=device,
                socket_count=2,
                # 64 bytes fed by hand: less than the start-up test takes.
                extra_args=["--health-tests", "off"],
            ) as daemon,
            await Frontend.connect(daemon.socket_paths[0]) as vmm,
        ):
            queue = await vmm.start_qemu72(4)
            fed = os.urandom(64)
            got: list[bytes] = []

            async def read() -> None:
                got.append(await vmm.read_random(64, chunk=64))

            with trio.fail_after(STEP):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read)
                    # Nothing to read yet: the worker blocks, the event loop does not.
                    await assert_responsive(daemon.socket_paths[1], 10, 0.25)
                    for i in range(0, 64, 16):
                        os.write(master, fed[i : i + 16])
                        await trio.sleep(0.01)
            assert got == [fed]
            # Leave one request blocked in the worker for the SIGTERM on the way out.
            queue.post(64)
            queue.kick(force=True)
            await vmm.get_features()
    finally:
        os.close(master)
        os.close(slave)


# -- guest memory that vanishes under a request ---------------------------------------------


class Reader:
    """A guest on another socket reading 64 bytes at a time until cancelled."""

    def __init__(self, vmm: Frontend) -> None:
        self.vmm = vmm
        self.reads = 0

    async def run(self) -> None:
        while True:
            with trio.fail_after(STEP):
                assert len(await self.vmm.read_random(64)) == 64
            self.reads += 1
            await trio.sleep(0.01)

    async def more(self, count: int = 2) -> None:
        target = self.reads + count
        with trio.fail_after(STEP):
            while self.reads < target:
                await trio.sleep(0.01)


async def feed(master: int) -> None:
    """Keep a raw pty's reader supplied (64 bytes every 10 ms) until cancelled."""
    while True:
        with contextlib.suppress(BlockingIOError):
            os.write(master, os.urandom(64))
        await trio.sleep(0.01)


@pytest.mark.parametrize("source_kind", ["urandom", "pumped_device"])
async def test_guest_memory_shrunk_under_a_request(source_kind: str, workdir: str) -> None:
    """A VMM truncates a region's memfd after SET_MEM_TABLE, and the guest posts a buffer in
    the part that is gone. Bytes enter guest memory only through readv, so the fill fails
    with EFAULT (never SIGBUS, which would kill the daemon): that ring stops, its err fd is
    signalled, one line is logged; the daemon lives on, the other guest is served
    throughout, the ring answers GET_VRING_BASE (the request was not consumed) and the
    socket serves the next VMM. Both ways bytes reach guest memory are covered: a source
    read directly (/dev/urandom) and a character device read through the pump's pipe (a raw
    pty, fed here)."""
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        os.set_blocking(master, False)
        filename = "/dev/urandom" if source_kind == "urandom" else os.ttyname(slave)
        async with (
            daemon_process(
                os.path.join(workdir, "rng.sock"),
                socket_count=2,
                filename=filename,
                log_level="info",
            ) as daemon,
            await Frontend.connect(daemon.socket_paths[0]) as vmm,
            await Frontend.connect(daemon.socket_paths[1]) as other,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(feed, master)
            with trio.fail_after(STEP):
                queue = await vmm.start_qemu72(4)
                await other.start_qemu72(4)
                assert len(await vmm.read_random(64)) == 64
            reader = Reader(other)
            nursery.start_soon(reader.run)
            await reader.more()
            # The rings live in region 1 and stay; region 0 loses its upper half.
            memory = queue.memory
            for part in (queue.desc_table, queue.avail_ring, queue.used_ring):
                assert memory.regions[1].contains(part, 1)
            gone = memory.regions[0].spec.memory_size // 2
            os.ftruncate(memory.regions[0].fd, gone)
            # From here on this process must not touch region 0's upper half either.
            bad = queue.avail_idx
            queue.raw_post_buffer(queue.size - 1, memory.regions[0].spec.guest_phys_addr + gone, 64)
            queue.kick(force=True)
            assert vmm.err_fd is not None
            with trio.fail_after(STEP):
                await trio.lowlevel.wait_readable(vmm.err_fd)
            assert os.eventfd_read(vmm.err_fd) == 1
            await reader.more()
            # Stopped: another kick finds no ring to serve, and logs nothing more.
            queue.kick(force=True)
            with trio.fail_after(STEP):
                await vmm.get_features()
                assert await vmm.get_vring_base(0) == bad
            await reader.more()
            lines = [line for line in daemon.log().splitlines() if "vanished" in line]
            assert len(lines) == 1 and "rng.sock0: vring 0 stopped" in lines[0], lines
            assert "Traceback" not in daemon.log()
            await vmm.aclose()
            with trio.fail_after(STEP):
                async with await Frontend.connect(daemon.socket_paths[0]) as again:
                    await again.start_qemu72(4)
                    assert len(await again.read_random(64)) == 64
            await reader.more()
            nursery.cancel_scope.cancel()
    finally:
        os.close(master)
        os.close(slave)


# -- many connections ----------------------------------------------------------------------

CYCLES = int(os.environ.get("RNGD_CYCLES", "10000"))


async def test_connect_disconnect_cycles_flat_fds_and_memory(
    workdir: str, source: tuple[str, bytes]
) -> None:
    """Bare connect + GET_FEATURES + hang-up, 10,000 times (RNGD_CYCLES to change it): the
    daemon's fd count is back where it was, and its resident memory has not grown by more
    than noise."""
    async with daemon_process(
        os.path.join(workdir, "rng.sock"), filename=source[0], log_level="warning"
    ) as daemon:
        path = daemon.socket_paths[0]
        with trio.fail_after(60):
            for _ in range(200):  # warm-up: allocator pools, caches
                async with await Frontend.connect(path) as vmm:
                    await vmm.get_features()
            fds = await settled_fd_count(daemon, path)
            rss = rss_kib(daemon.pid)
            for _ in range(CYCLES):
                async with await Frontend.connect(path) as vmm:
                    await vmm.get_features()
            assert await settled_fd_count(daemon, path) == fds
            grown = rss_kib(daemon.pid) - rss
        assert grown < 1024, f"RSS grew by {grown} KiB over {CYCLES} cycles"
        await serves(path)


SOAK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "soak")


async def test_soak_script_briefly(workdir: str) -> None:
    """`scripts/soak` in brief: 200 full connections and 50 resets (RESET_OWNER, a new memory
    table, the ring restarted) against one daemon; its fd count is back exactly where it
    started in both phases and its RSS has grown by no more than noise."""
    figures_path = os.path.join(workdir, "soak.json")
    result = await trio.run_process(
        [
            *(sys.executable, SOAK),
            *("--cycles", "200", "--resets", "50", "--warmup", "20"),
            *("--json", figures_path),
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, out + err
    assert "| phase | rounds |" in out
    with open(figures_path) as f:
        figures = json.load(f)
    assert figures["daemon_warnings"] == []
    connections, resets = figures["phases"]
    assert (connections["rounds"], resets["rounds"]) == (200, 50)
    for phase in (connections, resets):
        assert phase["end"]["fds"] == phase["start"]["fds"], phase
        assert phase["end"]["rss_kib"] - phase["start"]["rss_kib"] < 4096, phase


# -- accept() failing ----------------------------------------------------------------------


def lowest_free_fd(pid: int) -> int:
    """The fd number the process `pid` gets for its next fd."""
    used = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    fd = 0
    while fd in used:
        fd += 1
    return fd


async def test_out_of_fds_accept_backs_off_and_guests_keep_their_service(
    workdir: str, source: tuple[str, bytes]
) -> None:
    """Behaviour: with its fd limit reached the daemon cannot accept (EMFILE). It says so in
    one line, retries every 0.1 s, keeps serving the guests it has (on the same and other
    sockets), and accepts the waiting VMM as soon as an fd is freed. SIGTERM while it backs
    off still ends it with status 0 within 1 s (daemon_process checks on the way out).

    The daemon is a subprocess whose soft RLIMIT_NOFILE is lowered (prlimit) to leave room
    for exactly one more fd once a first guest is running."""
    opened: list[Frontend] = []

    async def connect(path: str) -> Frontend:
        vmm = await Frontend.connect(path)
        opened.append(vmm)
        return vmm

    try:
        async with daemon_process(
            os.path.join(workdir, "rng.sock"),
            socket_count=3,
            filename=source[0],
            log_level="debug",
        ) as daemon:
            path0, path1, path2 = daemon.socket_paths
            with trio.fail_after(4 * STEP):
                guest = await connect(path0)
                await guest.start_qemu72(4)
                got = await guest.read_random(64)
                # The fds it holds from here on are the running guest's.
                await guest.settle()
                hard = resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE)[1]
                room = lowest_free_fd(daemon.pid) + 1
                resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (room, hard))
                # The last fd goes to a VMM on another socket.
                second = await connect(path1)
                await second.get_features()
                # This one waits in the kernel's backlog: accept() fails with EMFILE.
                third = await connect(path2)
                answered = trio.Event()

                async def third_asks() -> None:
                    await third.get_features()
                    answered.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(third_asks)
                    # Both guests are served while accept() is retried, several times.
                    while daemon.log().count("accept still failing") < 3:
                        got += await guest.read_random(64)
                        await second.get_features()
                    assert not answered.is_set()
                    # The second VMM leaves: its fd is free, the next retry accepts.
                    await second.aclose()
                got += await guest.read_random(64)
                # The third took the last fd: a VMM on the second socket now waits, and the
                # daemon backs off when the SIGTERM comes.
                await connect(path1)
                while f"{os.path.basename(path1)}: cannot accept" not in daemon.log():
                    got += await guest.read_random(64)
            assert got == source[1][: len(got)]
            log = daemon.log()
            failed = [line for line in log.splitlines() if "cannot accept connections" in line]
            assert len(failed) == 2, log
            # Once per socket, though retried several times on the third socket.
            assert os.path.basename(path2) in failed[0] and "EMFILE" in failed[0]
            assert os.path.basename(path1) in failed[1]
            assert "accepting connections again" in log
            assert "Traceback" not in log
    finally:
        for vmm in opened:
            await vmm.aclose()


async def test_out_of_fds_when_a_ring_starts_stops_that_ring_only(
    workdir: str, source: tuple[str, bytes]
) -> None:
    """Behaviour: a ring started while the daemon is at its fd limit cannot get what its
    worker thread needs (a stop eventfd, an epoll). That ring stops with one line, no
    traceback; the connection answers on, and once fds are free again a new SET_VRING_KICK
    starts the ring where it stood. (A SET_VRING_KICK that arrives at the limit is refused
    before that: checking the fd is an eventfd takes an fd too.)

    The daemon is a subprocess whose soft RLIMIT_NOFILE, lowered while the ring is disabled,
    leaves room for one fd: the epoll gets it, the stop eventfd none (and the epoll is closed
    again)."""
    async with (
        daemon_process(
            os.path.join(workdir, "rng.sock"), filename=source[0], log_level="info"
        ) as daemon,
        await Frontend.connect(daemon.socket_paths[0]) as vmm,
    ):
        with trio.fail_after(4 * STEP):
            queue = await vmm.start_qemu72(4)
            got = await queue.read_random(64)
            await vmm.set_vring_enable(0, False)
            await vmm.get_features()  # the ring has stopped: its fds are closed
            limits = resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE)
            resource.prlimit(
                daemon.pid, resource.RLIMIT_NOFILE, (lowest_free_fd(daemon.pid) + 1, limits[1])
            )
            await vmm.set_vring_enable(0, True)
            while "vring 0 stopped" not in daemon.log():
                assert await vmm.get_features()
                await trio.sleep(0.01)
            resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, limits)
            kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                await vmm.set_vring_kick(0, kick, need_reply=True)
                queue.kick_fd = kick
                got += await queue.read_random(64)
            finally:
                os.close(kick)
        assert got == source[1][:128]
        log = daemon.log()
        assert log.count("vring 0 stopped") == 1, log
        assert "cannot make a stop eventfd: Too many open files" in log, log
        assert "Traceback" not in log, log


async def _failing_first(
    errnos: list[int], accept: Callable[[], Awaitable[trio.socket.SocketType]]
) -> trio.socket.SocketType:
    """The listening socket's own accept(), after raising `errnos` one by one: errors this
    test cannot cause for real on a Unix socket (ECONNABORTED, ENOBUFS, ...)."""
    await trio.lowlevel.checkpoint()
    if errnos:
        code = errnos.pop(0)
        raise OSError(code, os.strerror(code))
    return await accept()


async def _accept(sock: trio.socket.SocketType) -> trio.socket.SocketType:
    conn, _ = await sock.accept()
    return conn


@pytest.mark.parametrize(
    ("code", "logged"),
    [
        pytest.param(code, logged, id=errno.errorcode[code])
        for code, logged in [
            (errno.ECONNABORTED, False),
            (errno.EPROTO, False),
            (errno.EPERM, False),
            (errno.EMFILE, True),
            (errno.ENFILE, True),
            (errno.ENOBUFS, True),
            (errno.ENOMEM, True),
            (errno.EINVAL, True),  # not a known one: retried the same way, never fatal
        ]
    ],
)
async def test_accept_errors_never_end_the_socket(
    code: int,
    logged: bool,
    workdir: str,
    source: tuple[str, bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Behaviour: an error about one connection that vanished (as trio's SocketListener
    ignores) is skipped; a resource error (as trio's serve_listeners backs off on) or an
    unknown one is logged once and retried until accept() works. Either way the socket then
    serves the next VMM."""
    caplog.set_level(logging.DEBUG, logger="rngd")
    # No pump task runs here: the source is read by the ring directly (untested).
    config = DaemonConfig(
        os.path.join(workdir, "rng.sock"), filename=source[0], health_tests=HealthMode.OFF
    )
    daemon = Daemon(config)
    try:
        listener = daemon.listeners[0]
        real = functools.partial(_accept, trio.socket.from_stdlib_socket(listener.sock))
        failures = [code] * 5
        server = SocketServer(
            "rng.sock0",
            functools.partial(_failing_first, failures, real),
            daemon.source,
            daemon.scheduler.guest(0),
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.run)
            with trio.fail_after(STEP):
                assert await serves(listener.path) == source[1][:64]
            nursery.cancel_scope.cancel()
        assert failures == []
    finally:
        daemon.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if logged:
        assert len(errors) == 1, errors
        assert errors[0].startswith("rng.sock0: cannot accept connections")
        assert errno.errorcode[code] in errors[0]
        assert any(
            "accepting connections again (after 5 failed attempts)" in r.getMessage()
            for r in caplog.records
        )
    else:
        assert errors == []
