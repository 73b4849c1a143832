"""Faults: VMMs that die, signals while guests wait, entropy sources in trouble, and many
connections. Each has a documented behaviour; none stalls the event loop or another guest.

The daemon runs as a real subprocess where its fds, memory or signals are checked, and in
this process where only its behaviour is (faster).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tty

import pytest
import trio

import rngd
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
    """The daemon's fd count once it has released the previous VMM on `path` (it serves one
    VMM per socket at a time, so its reply to the next proves the previous one is gone)."""
    async with await Frontend.connect(path) as probe:
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
            os.path.join(workdir, "rng.sock"), filename=path, socket_count=2
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
            os.path.join(workdir, "rng.sock"), filename=fifo, socket_count=2
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
        os.path.join(workdir, "rng.sock"), filename=fifo, socket_count=2
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
                os.path.join(workdir, "rng.sock"), filename=device, socket_count=2
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
