"""Health tests on real sources: FIFOs fed by this process (or a child), read by the daemon's
pump, served to guests through real vhost-user connections.

Ordering comes from handshakes, never from sleeps: the daemon tells systemd's notify socket
(a datagram socket of the test's) when the source is declared failed and when it recovers, and
the feeder switches what it writes only once told.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest
import trio

from rngd.health import FAIL_COUNT, WINDOW, Cutoffs, HealthMode
from rngd.source import EntropySource
from rngd.testing import Frontend, daemon_in_process, daemon_process

STEP = 10.0
RCT = Cutoffs().rct
MiB = 1 << 20


class Notes:
    """systemd's notify socket, played by a datagram socket of ours."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.seen: list[dict[str, str]] = []

    async def next(self) -> dict[str, str]:
        with trio.fail_after(STEP):
            data = await self.sock.recv(4096)
        message = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.seen.append(message)
        return message

    async def status(self, failed: bool) -> str:
        """The next STATUS= that says the source is failed (or is not)."""
        while True:
            status = (await self.next()).get("STATUS")
            if status is not None and ("FAILED" in status) == failed:
                return status


@contextlib.asynccontextmanager
async def notify_socket(workdir: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Notes]:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sock:
        address = os.path.join(workdir, "notify")
        await sock.bind(address)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        yield Notes(sock)


class Feeder:
    """Writes a FIFO from this process until cancelled: random bytes (kept, to compare), or
    `bad` bytes while it is set; with `good_limit`, no more good bytes than that."""

    def __init__(self, fifo: str) -> None:
        # The daemon has the FIFO open for reading: this open does not wait.
        self.fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self.good = bytearray()
        self.bad: bytes | None = None
        self.good_limit: int | None = None
        #: Set when `good_limit` good bytes have gone into the FIFO.
        self.limit_reached = trio.Event()

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            await trio.lowlevel.wait_writable(self.fd)
            with contextlib.suppress(BlockingIOError):
                view = view[os.write(self.fd, view) :]

    async def run(self) -> None:
        while True:
            if self.bad is not None:
                await self.write(self.bad)
                continue
            size = 1 << 16
            if self.good_limit is not None:
                size = min(size, self.good_limit - len(self.good))
                if size == 0:
                    self.limit_reached.set()
                    await trio.sleep(0.01)  # until told what comes next
                    continue
            chunk = os.urandom(size)
            self.good += chunk
            await self.write(chunk)

    def close(self) -> None:
        os.close(self.fd)


def lines(text: str, having: str) -> list[str]:
    return [line for line in text.splitlines() if having in line]


def fifo_in(workdir: str) -> str:
    path = os.path.join(workdir, "fifo")
    os.mkfifo(path)
    return path


def no_stuck_run(data: bytes, value: int = 0) -> bool:
    return bytes([value]) * RCT not in data


def common_length(a: bytes, i: int, b: bytes, j: int) -> int:
    """How many bytes `a` from `i` and `b` from `j` have in common before they differ."""
    n = 0
    step = 1 << 16
    while step:
        while i + n + step <= len(a) and a[i + n : i + n + step] == b[j + n : j + n + step]:
            n += step
        step //= 2
    return n


def in_order(data: bytes, stream: bytes) -> bool:
    """Whether `data` is pieces of `stream` taken in the stream's order (gaps allowed: what
    another reader took), each of at least 16 bytes or the last."""
    i = j = 0
    while i < len(data):
        n = common_length(data, i, stream, j)
        if n:
            i += n
            j += n
            continue
        found = stream.find(data[i : i + 16], j)
        if found < 0:
            return False
        j = found
    return True


# -- which sources are tested, and what that costs the read path ---------------------------


def test_which_sources_are_tested(workdir: str) -> None:
    """auto: every source but the kernel's CSPRNG. A source not tested is read by the vrings
    themselves, as before (no pump, no pipe, nothing added to the read path); a tested one
    through the pump's pipe."""
    path = os.path.join(workdir, "file")
    with open(path, "wb") as f:
        f.write(os.urandom(4096))
    cases = [
        ("/dev/urandom", HealthMode.AUTO, False),
        ("/dev/random", HealthMode.AUTO, False),
        ("/dev/urandom", HealthMode.ON, True),
        ("/dev/zero", HealthMode.AUTO, True),
        (path, HealthMode.AUTO, True),
        (path, HealthMode.OFF, False),
    ]
    for name, mode, tested in cases:
        source = EntropySource(name, health=mode)
        try:
            assert (source.monitor is not None) == tested, (name, mode)
            through_pipe = stat.S_ISFIFO(os.fstat(source.fd).st_mode)
            assert through_pipe == tested, (name, mode)
            assert source.health_failures == 0
            assert ("health tests on" in source.health_summary()) == tested
        finally:
            source.close()


# -- failing sources, with guests ----------------------------------------------------------


async def test_constant_stream_fails_at_startup_then_recovers(
    workdir: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A source that gives one value from its first byte fails the start-up test: nothing is
    served (the guest's request waits), systemd's STATUS says so, one error line is logged.
    Once good bytes come, the start-up test passes again and the waiting request is filled
    with them."""
    fifo = fifo_in(workdir)
    async with (
        notify_socket(workdir, monkeypatch) as notes,
        daemon_in_process(os.path.join(workdir, "rng.sock"), filename=fifo) as paths,
        await Frontend.connect(paths[0]) as vmm,
        trio.open_nursery() as nursery,
    ):
        feeder = Feeder(fifo)
        feeder.bad = b"\x5a" * 4096
        nursery.start_soon(feeder.run)
        queue = await vmm.start_qemu72(4)
        queue.post(64)
        queue.kick()
        status = await notes.status(failed=True)
        assert status.endswith("entropy source FAILED its health tests, serving nothing")
        # The protocol goes on; the request waits.
        await vmm.get_features()
        assert queue.in_flight == 1
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1, errors
        assert "failed its start-up test (repetition count test: byte 0x5a" in errors[0]
        assert "declared failed" in errors[0]
        # Good bytes: the start-up test passes again and the request gets them.
        feeder.bad = None
        await notes.status(failed=False)
        with trio.fail_after(STEP):
            (used,) = await queue.wait_used()
        assert len(used.data) == 64 and used.data in bytes(feeder.good)
        assert any("passed its start-up test again" in r.getMessage() for r in caplog.records)
        nursery.cancel_scope.cancel()
    feeder.close()


async def test_biased_stream_is_caught_by_the_apt(
    workdir: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One value in 40% of the bytes, the rest uniform: the adaptive proportion test fails the
    windows that start with it, the source is declared failed, and the guest gets none of it."""
    rng = random.Random(40)
    biased = bytes(0xC3 if rng.random() < 0.4 else rng.randrange(256) for _ in range(MiB))
    fifo = fifo_in(workdir)
    async with (
        notify_socket(workdir, monkeypatch) as notes,
        daemon_in_process(os.path.join(workdir, "rng.sock"), filename=fifo) as paths,
        await Frontend.connect(paths[0]) as vmm,
        trio.open_nursery() as nursery,
    ):
        feeder = Feeder(fifo)
        feeder.bad = biased
        nursery.start_soon(feeder.run)
        queue = await vmm.start_qemu72(4)
        queue.post(64)
        queue.kick()
        await notes.status(failed=True)
        await vmm.get_features()
        assert queue.in_flight == 1
        nursery.cancel_scope.cancel()
    feeder.close()
    messages = [r.getMessage() for r in caplog.records]
    failures = [m for m in messages if "health test:" in m or "start-up test (" in m]
    assert failures and all("repetition count" not in m for m in failures), failures
    assert any("adaptive proportion test: byte 0xc3" in m for m in failures), failures


async def test_stuck_after_10_mib_split_rate(workdir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A split-rate daemon (two guests, 12 MiB each per period) on a FIFO whose good stream
    turns stuck after 10 MiB. Guest 0 reads its 12 MiB: it gets the good stream up to the
    failure, waits while the source is failed (STATUS says so; the SIGUSR1 dump and the
    disconnect lines count the failures; the log names each one), and after the recovery gets
    the rest from fresh bytes. Not one stuck run reaches it, and discarded windows cost no
    budget: both guests get their whole 12 MiB within the one period."""
    share = 12 * MiB
    fifo = fifo_in(workdir)
    got: list[bytes] = []
    async with (
        notify_socket(workdir, monkeypatch) as notes,
        daemon_process(
            os.path.join(workdir, "rng.sock"),
            socket_count=2,
            filename=fifo,
            max_bytes=2 * share,
            period_ms=65536,
            log_level="info",
        ) as daemon,
    ):
        async with (
            await Frontend.connect(daemon.socket_paths[0]) as first,
            await Frontend.connect(daemon.socket_paths[1]) as second,
            trio.open_nursery() as nursery,
        ):
            feeder = Feeder(fifo)
            feeder.good_limit = 10 * MiB
            nursery.start_soon(feeder.run)
            await first.start_qemu72(16)
            await second.start_qemu72(16)
            first_done = trio.Event()

            async def read_first() -> None:
                got.append(await first.read_random(share, chunk=32768, in_flight=None))
                first_done.set()

            nursery.start_soon(read_first)
            with trio.fail_after(60):
                await feeder.limit_reached.wait()
            feeder.bad = bytes(1 << 16)  # stuck at zero
            await notes.status(failed=True)
            daemon.process.send_signal(signal.SIGUSR1)
            with trio.fail_after(STEP):
                while "rng.sock1: serving:" not in daemon.log():
                    await trio.sleep(0.01)
            log = daemon.log()
            dump = [line for line in log.splitlines() if ": serving:" in line]
            counts = [int(line.rsplit("health_failures=", 1)[1].split()[0]) for line in dump]
            assert len(counts) == 2 and all(c >= FAIL_COUNT for c in counts), dump
            assert "health tests on" in log and "state=failed" in log
            failure_lines = [line for line in log.splitlines() if "failed a health test" in line]
            assert len(failure_lines) == FAIL_COUNT, failure_lines
            assert all("repetition count test: byte 0x00" in line for line in failure_lines)
            assert "declared failed" in log
            assert not got
            # The source comes back.
            good_before = len(feeder.good)
            feeder.good_limit = None
            feeder.bad = None
            await notes.status(failed=False)
            with trio.fail_after(120):
                await first_done.wait()
                other = await second.read_random(share, chunk=32768, in_flight=None)
            nursery.cancel_scope.cancel()
        feeder.close()
        # Each socket's disconnect lines: daemon_process's probe's, then our guest's.
        with trio.fail_after(STEP):
            while len(disconnects := lines(daemon.log(), "VMM disconnected")) < 4:
                await trio.sleep(0.01)
    (data,) = got
    good = bytes(feeder.good)
    assert len(data) == share and len(other) == share
    assert no_stuck_run(data) and no_stuck_run(other)
    # Guest 0's bytes are the good stream's, in its order: up to the failure (less what was
    # thrown away when the source was declared failed), then from after the recovery.
    assert common_length(data, 0, good, 0) >= 8 * MiB
    assert in_order(data, good)
    assert other in good[good_before:]
    ours = [line for line in disconnects if "health_failures=0" not in line]
    assert len(ours) == 2, disconnects


# -- a good stream, flat out ---------------------------------------------------------------

_WRITER = r"""
import hashlib, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
total = int(sys.argv[2])
digest = hashlib.sha256()
written = 0
while written < total:
    chunk = os.urandom(min(1 << 20, total - written))
    digest.update(chunk)
    view = memoryview(chunk)
    while view:
        view = view[os.write(fd, view):]
    written += len(chunk)
print(digest.hexdigest())
"""


async def test_good_stream_of_1_gib_raises_no_alarm(workdir: str) -> None:
    """1 GiB of good bytes through a FIFO fed by another process, read from the source as fast
    as it goes: every byte comes out, in order (the hashes agree), and not one alarm."""
    total = 1 << 30
    fifo = fifo_in(workdir)
    source = EntropySource(fifo, health=HealthMode.ON)
    try:
        writer = await trio.lowlevel.open_process(
            [sys.executable, "-c", _WRITER, fifo, str(total)], stdout=subprocess.PIPE
        )

        def consume() -> str:
            digest = hashlib.sha256()
            got = 0
            deadline = time.monotonic() + 120
            while got < total:
                assert time.monotonic() < deadline, f"only {got} bytes"
                try:
                    data = os.read(source.fd, 1 << 20)
                except BlockingIOError:
                    select.select([source.fd], [], [], 1.0)
                    continue
                digest.update(data)
                got += len(data)
            return digest.hexdigest()

        started = time.monotonic()
        with trio.fail_after(150):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(source.run)
                ours = await trio.to_thread.run_sync(consume)
                seconds = time.monotonic() - started
                assert writer.stdout is not None
                theirs = (await writer.stdout.receive_some(4096)).decode().strip()
                await writer.wait()
                nursery.cancel_scope.cancel()
        print(
            f"1 GiB through the health tests in {seconds:.1f} s ({total / seconds / 1e6:.0f} MB/s)"
        )
        assert ours == theirs
        monitor = source.monitor
        assert monitor is not None
        assert monitor.failures == 0 and monitor.windows == total // WINDOW
        assert not source.failed()
    finally:
        source.close()


async def test_one_stream_for_guests_reading_at_once(
    workdir: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two guests read a tested file at the same time, in requests of 4 KiB kept in flight: the
    source is one stream to the tests whatever reads it. The file holds runs of 19 zero bytes
    (one every 40 windows, so never 3 in 64: isolated failures), some across window
    boundaries: exactly the windows holding each run's 19th byte are discarded, each failure is
    one log line (and counted in both guests' disconnect lines: the runs lie past what the pump
    can read ahead before the guests read), and the two guests together get every other byte,
    each in the file's order, neither a run of 19."""
    caplog.set_level(logging.INFO, logger="rngd")
    rng = random.Random(19)
    data = bytearray(rng.randbytes(4 << 20).replace(b"\x00", b"\x01"))
    runs = []
    for n, window in enumerate(range((2 << 20) // WINDOW, len(data) // WINDOW, 40)):
        start = window * WINDOW + (-9 if n % 2 else 100)  # every other one straddles
        data[start : start + RCT] = bytes(RCT)
        runs.append((start + RCT - 1) // WINDOW)  # the window of its 19th byte
    path = os.path.join(workdir, "source")
    with open(path, "wb") as f:
        f.write(data)
    kept = b"".join(
        bytes(data[w * WINDOW : (w + 1) * WINDOW])
        for w in range(len(data) // WINDOW)
        if w not in runs
    )
    half = len(kept) // 2
    got: list[bytes] = []
    async with (
        daemon_in_process(
            os.path.join(workdir, "rng.sock"), filename=path, socket_count=2
        ) as paths,
        await Frontend.connect(paths[0]) as first,
        await Frontend.connect(paths[1]) as second,
    ):
        await first.start_qemu72(16)
        await second.start_qemu72(16)

        async def read(vmm: Frontend, nbytes: int) -> None:
            got.append(await vmm.read_random(nbytes, chunk=4096, in_flight=None))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, first, half)
                nursery.start_soon(read, second, len(kept) - half)
    assert sorted(len(g) for g in got) == sorted([half, len(kept) - half])
    for part in got:
        assert no_stuck_run(part)
        assert in_order(part, kept)
    failures = [r.getMessage() for r in caplog.records if "failed a health test" in r.getMessage()]
    assert len(failures) == len(runs), failures
    offsets = [int(m.split("in the window at byte ")[1].split(";")[0]) for m in failures]
    assert offsets == [w * WINDOW for w in runs]
    assert not any("declared failed" in r.getMessage() for r in caplog.records)
    disconnects = [r.getMessage() for r in caplog.records if "VMM disconnected" in r.getMessage()]
    assert len(disconnects) == 2, disconnects
    assert all(f"health_failures={len(runs)}" in line for line in disconnects), disconnects
