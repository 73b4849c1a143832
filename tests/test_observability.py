"""What the daemon tells an operator: one line per connection (who, what was negotiated), one at
disconnect with the connection's counters, and every connection's counters on SIGUSR1.

Real daemon processes, real guests (`Frontend`); the counters are checked against what the guest
actually did.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator

import pytest
import trio

from rngd.testing import DaemonProcess, Frontend, daemon_process

STEP = 10.0


@pytest.fixture
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="rngd-obs-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def fields(line: str) -> dict[str, str]:
    """The ``key=value`` fields of a log line."""
    return dict(token.split("=", 1) for token in line.split() if "=" in token)


def counters(line: str) -> dict[str, float]:
    f = fields(line)
    out = {key: float(f[key]) for key in ("requests", "bytes", "held_back", "malformed")}
    out |= {key: float(f[key]) for key in ("kicks", "interrupts", "polled")}
    out["parked"] = float(f["parked"].removesuffix("s"))
    out["uptime"] = float(f["uptime"].removesuffix("s"))
    return out


def lines_with(daemon: DaemonProcess, text: str) -> list[str]:
    return [line for line in daemon.log().splitlines() if text in line]


async def wait_for_lines(daemon: DaemonProcess, text: str, count: int = 1) -> list[str]:
    with trio.fail_after(STEP):
        while len(lines := lines_with(daemon, text)) < count:
            await trio.sleep(0.01)
    return lines


async def last_disconnect(daemon: DaemonProcess, socket: str = "rng.sock0") -> str:
    """The disconnect line of the test's connection (`daemon_process` made one before it, to
    see that the socket listens)."""
    return (await wait_for_lines(daemon, f"{socket}: VMM disconnected", 2))[-1]


def me() -> str:
    return f"pid={os.getpid()} uid={os.getuid()} gid={os.getgid()}"


@pytest.mark.parametrize("poll_us", [0, 50])
async def test_one_line_at_connect_one_with_the_counters_at_disconnect(
    workdir: str, poll_us: int
) -> None:
    """N requests of 64 B one at a time, a reboot on the same connection, M more: one connect
    line (peer, features) for the connection, and one disconnect line counting N + M requests
    and 64 (N + M) bytes, nothing held back or malformed, kicks and interrupts as the guest
    made and waited for them; with --poll-us, every request it posted without a kick found
    by a poll."""
    n, m = 40, 25
    async with daemon_process(
        os.path.join(workdir, "rng.sock"),
        log_level="info",
        extra_args=("--poll-us", str(poll_us)),
    ) as daemon:
        async with await Frontend.connect(daemon.socket_paths[0]) as vmm:
            queue = await vmm.start_qemu72(4)
            assert len(await vmm.read_random(64 * n)) == 64 * n
            kicks = queue.kicks
            _, queue = await vmm.reboot()
            assert len(await vmm.read_random(64 * m)) == 64 * m
            kicks += queue.kicks
        line = await last_disconnect(daemon)
        (connected,) = lines_with(daemon, "VMM connected")
        (listening,) = lines_with(daemon, "listening on")
    assert f"--poll-us {poll_us})" in listening
    assert f"rng.sock0: VMM connected: {me()} features=" in connected
    features = fields(connected)
    assert int(features["features"], 16) & (1 << 32)  # VERSION_1
    assert "VERSION_1" in connected and "REPLY_ACK" in connected
    assert f"rng.sock0: VMM disconnected (hung up): {me()} uptime=" in line
    c = counters(line)
    assert (c["requests"], c["bytes"]) == (n + m, 64 * (n + m))
    assert (c["held_back"], c["parked"], c["malformed"]) == (0, 0, 0)
    # Each start's kick fd comes signalled (as QEMU's), which may wake the ring once more.
    assert 1 <= c["kicks"] <= kicks + 2
    assert 2 <= c["interrupts"] <= n + m
    # A request the guest posted without a kick was one the ring polled for (--poll-us).
    assert c["polled"] <= n + m <= kicks + c["polled"]


async def test_rate_limit_shows_as_bytes_held_back_and_time_parked(workdir: str) -> None:
    """--max-bytes 256 per 20 ms and a guest reading 1024 B: it waits for at least three
    refills, and the disconnect line says so."""
    async with daemon_process(
        os.path.join(workdir, "rng.sock"), max_bytes=256, period_ms=20, log_level="info"
    ) as daemon:
        async with await Frontend.connect(daemon.socket_paths[0]) as vmm:
            await vmm.start_qemu72(8)
            assert len(await vmm.read_random(1024, in_flight=None)) == 1024
        line = await last_disconnect(daemon)
    c = counters(line)
    assert c["bytes"] == 1024
    assert 0 < c["held_back"] <= c["bytes"]
    assert c["parked"] > 0
    assert c["malformed"] == 0


async def test_malformed_requests_and_messages_are_counted(workdir: str) -> None:
    """A descriptor chain outside guest memory (completed empty) and a message the back-end
    refuses: malformed 2; the refused chain is one of the requests, with no bytes."""
    async with daemon_process(os.path.join(workdir, "rng.sock"), log_level="info") as daemon:
        async with await Frontend.connect(daemon.socket_paths[0]) as vmm:
            queue = await vmm.start_qemu72(4)
            assert len(await vmm.read_random(64 * 3)) == 64 * 3
            queue.raw_post_buffer(3, 0x8000_0000, 64)
            queue.kick(force=True)
            (bad,) = await queue.wait_used()
            assert bad.len == 0
            await vmm.set_vring_num(7, 4)  # there is one vring: refused
            assert len(await vmm.read_random(64)) == 64
        line = await last_disconnect(daemon)
    c = counters(line)
    assert (c["requests"], c["bytes"], c["malformed"]) == (5, 64 * 4, 2)


async def test_sigusr1_logs_every_connection_and_service_goes_on(workdir: str) -> None:
    """Two sockets, one guest reading, one idle: SIGUSR1 logs one line per connected guest
    with its live counters; sent again and again while the guest reads, its reads go on and
    its bytes are the source's, in order; the daemon stays up and exits 0 on SIGTERM."""
    source = os.path.join(workdir, "source")
    content = os.urandom(1 << 20)
    with open(source, "wb") as f:
        f.write(content)
    async with daemon_process(
        os.path.join(workdir, "rng.sock"), socket_count=2, filename=source, log_level="info"
    ) as daemon:
        await wait_for_lines(daemon, "VMM disconnected", 2)  # daemon_process's probes
        daemon.process.send_signal(signal.SIGUSR1)
        (header,) = await wait_for_lines(daemon, "statistics:")
        assert "statistics: 0 VMM(s) connected" in header
        async with (
            await Frontend.connect(daemon.socket_paths[0]) as busy,
            await Frontend.connect(daemon.socket_paths[1]) as idle,
        ):
            await busy.start_qemu72(4)
            await idle.start_qemu72(4)
            got = await busy.read_random(64 * 10)
            daemon.process.send_signal(signal.SIGUSR1)
            await wait_for_lines(daemon, "statistics: 2 VMM(s) connected")
            (busy_line,) = await wait_for_lines(daemon, "rng.sock0: serving:")
            (idle_line,) = await wait_for_lines(daemon, "rng.sock1: serving:")
            assert f"rng.sock0: serving: {me()} uptime=" in busy_line
            assert (counters(busy_line)["requests"], counters(busy_line)["bytes"]) == (10, 640)
            assert (counters(idle_line)["requests"], counters(idle_line)["bytes"]) == (0, 0)
            reports = 2
            for _ in range(20):
                daemon.process.send_signal(signal.SIGUSR1)
                got += await busy.read_random(4096, 256, in_flight=None)
            # Every SIGUSR1 may not have its own report (signals coalesce), but one came in.
            assert len(await wait_for_lines(daemon, "statistics:", reports + 1)) > reports
            got += await busy.read_random(4096)
        assert got == content[: len(got)]
        line = await last_disconnect(daemon)
        assert counters(line)["bytes"] == len(got)
        assert daemon.process.returncode is None


async def test_sigusr1_held_until_the_daemon_listens_for_it(workdir: str) -> None:
    """A SIGUSR1 that arrives once the command line has set up its signals but before the
    event loop runs (here: sent by the process to itself at that point) is held, then logged
    as a report; it does not kill the daemon (its default action would)."""
    log_path = os.path.join(workdir, "log")
    base = os.path.join(workdir, "rng.sock")
    script = (
        "import os, signal, sys\n"
        "from rngd.daemon import block_stop_signals\n"
        "from rngd.cli import main\n"
        "block_stop_signals()\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with open(log_path, "wb") as log:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-P", "-c", script, "-s", base], stderr=log, env=env
        )
    try:
        with trio.fail_after(STEP):
            while True:
                with open(log_path) as f:
                    text = f.read()
                if "statistics: 0 VMM(s) connected" in text:
                    break
                assert process.poll() is None, text
                await trio.sleep(0.01)
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(STEP):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert not os.path.exists(f"{base}0")


def test_counter_line_format() -> None:
    from rngd.observe import ConnectionCounters, Peer, RingCounters

    ring = RingCounters()
    ring.requests, ring.bytes, ring.kicks, ring.interrupts, ring.parked = 3, 192, 2, 3, 0.25
    ring.polled = 1
    total = ConnectionCounters()
    total.ring_started(ring)
    total.malformed = 1
    assert str(total.total()) == (
        "requests=3 bytes=192 held_back=0 parked=0.250s malformed=1 kicks=2 interrupts=3 polled=1"
    )
    total.ring_stopped(ring)
    assert not total.running and str(total) == str(total.total())
    assert str(Peer(1, 2, 3)) == "pid=1 uid=2 gid=3"
    assert re.fullmatch(r"(\w+=\S+ ?)+", str(total))
