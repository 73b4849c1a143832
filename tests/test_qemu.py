"""End to end with real QEMU: an unmodified Linux guest reads /dev/hwrng through rngd.

Each test starts `python -m rngd` and boots the test guest (rngd/testing/guest.py: Debian's
kernel, busybox, the virtio modules) under QEMU, KVM if a probe boot shows it works, else TCG.
The guest prints what it read as `RNGTEST` lines on its serial console.

Two QEMUs: the system's (Debian 12: 7.2) runs every test; Debian 12 backports' (10.x), unpacked
beside it by scripts/fetch-qemu-backports, runs the tests marked `both_qemus` (ids `[system]`
and `[backports]`). QEMU 10 differs on the wire: it waits for a reply to SET_VRING_ENABLE
(REPLY_ACK), and it would send GET_STATUS right after SET_FEATURES if rngd offered STATUS.

The arm64 tests boot the same guest built for arm64 (Debian's arm64 kernel and busybox) under
the system's qemu-system-aarch64 (`-M virt -cpu cortex-a57`, TCG), its RAM a memory-backend-file
on /dev/shm, exactly as vhost-device-rng's README shows.

Without QEMU these tests skip, except under CI (CI=true), where they fail: CI must run them.
The same goes for the backports' QEMU: found through $RNGD_QEMU_BACKPORTS (scripts/test sets
it) or in this checkout's .cache/qemu-backports.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import NoReturn

import pytest

from rngd.testing.guest import (
    GuestBuildError,
    Report,
    TestGuest,
    build_test_guest,
    match_stream,
)
from rngd.testing.qemu import (
    BACKPORTS_ROOT_ENV,
    QemuBuild,
    QemuError,
    QemuGuest,
    Rngd,
    RngdOptions,
    choose_accel,
    find_qemu,
    qemu_command,
)
from rngd.testing.qemu_cli import main

pytestmark = pytest.mark.qemu

#: Under TCG on two busy cores a boot takes about 5 s; these leave room without hiding a hang.
BOOT_TIMEOUT = 60.0
READ_BYTES = 256 * 1024


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _unavailable(message: str) -> NoReturn:
    if _in_ci():
        pytest.fail(f"CI must run the QEMU tests: {message}")
    pytest.skip(message)


def _backports_root() -> Path | None:
    """Where scripts/fetch-qemu-backports unpacked QEMU: as scripts/test says, else the newest
    version cached in this checkout."""
    env = os.environ.get(BACKPORTS_ROOT_ENV)
    if env:
        return Path(env)
    cache = Path(__file__).resolve().parents[1] / ".cache" / "qemu-backports"
    done = sorted(cache.glob("*/ok"), key=lambda ok: ok.stat().st_mtime)
    return done[-1].parent / "root" if done else None


def _backports_qemu() -> QemuBuild:
    root = _backports_root()
    if root is None:
        _unavailable(
            "Debian backports' QEMU is not unpacked: run scripts/fetch-qemu-backports as root "
            f"(or set ${BACKPORTS_ROOT_ENV})"
        )
    try:
        build = QemuBuild.unpacked(root)
    except QemuError as exc:
        pytest.fail(f"${BACKPORTS_ROOT_ENV} or the cache is wrong: {exc}")
    # What this variant is for: a QEMU that talks vhost-user the newer way.
    assert build.major() >= 10, f"backports' QEMU is {build.version()}, not 10 or later"
    return build


#: Runs a test against the system's QEMU and against the backports' (10.x) QEMU.
both_qemus = pytest.mark.parametrize("qemu", ["system", "backports"], indirect=True)


@pytest.fixture(scope="module")
def qemu(request: pytest.FixtureRequest) -> QemuBuild:
    """The system's QEMU, or with `both_qemus` the backports' one too."""
    which = getattr(request, "param", "system")
    if which == "backports":
        build = _backports_qemu()
    else:
        try:
            build = QemuBuild(find_qemu())
        except QemuError as exc:
            _unavailable(str(exc))
    print(f"{which} QEMU: {build.version()}")
    return build


@pytest.fixture(scope="module")
def guest() -> TestGuest:
    try:
        return build_test_guest()
    except GuestBuildError as exc:
        pytest.fail(f"cannot build the test guest: {exc}")


@pytest.fixture(scope="module")
def accel(qemu: QemuBuild, guest: TestGuest) -> str:
    mode = os.environ.get("RNGD_QEMU_ACCEL", "auto")
    return choose_accel(mode, qemu.binary, guest, extra=qemu.args, env=qemu.env)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Not tmp_path: socket paths must fit in sun_path's 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="rngd-qemu-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


StartRngd = Callable[..., Rngd]
Boot = Callable[..., QemuGuest]


@pytest.fixture
def start_rngd(workdir: Path) -> Iterator[StartRngd]:
    """Starts rngd; at the end checks that it is still up, then that SIGTERM stops it cleanly."""
    started: list[Rngd] = []

    def start(**options: object) -> Rngd:
        opts = RngdOptions(workdir / "rng.sock", **options)  # type: ignore[arg-type]
        rngd = Rngd(opts, log_path=workdir / f"rngd{len(started)}.log")
        started.append(rngd)
        rngd.wait_listening()
        return rngd

    yield start
    for rngd in started:
        alive = rngd.proc.poll() is None
        code = rngd.stop()
        log = rngd.log()
        assert alive, f"rngd died during the test:\n{log[-3000:]}"
        assert code == 0, f"rngd exited with {code} on SIGTERM:\n{log[-3000:]}"
        assert "Traceback" not in log, log[-3000:]


def _booter(stack: ExitStack, qemu: QemuBuild, guest: TestGuest, accel: str, workdir: Path) -> Boot:
    """Boots `guest` on the given sockets; every QEMU is stopped when `stack` closes."""
    count = 0

    def start(
        sockets: Sequence[Path],
        *,
        bytes_to_read: int = READ_BYTES,
        boots: int = 1,
        drives: Sequence[str] = (),
        dump: str | None = None,
        dimms: int = 0,
        pause: int = 0,
    ) -> QemuGuest:
        nonlocal count
        count += 1
        name = f"{guest.arch}-guest{count}"
        cmd = qemu_command(
            qemu.binary,
            accel=accel,
            kernel=guest.kernel,
            initrd=guest.initrd,
            append=guest.append(bytes_to_read=bytes_to_read, boots=boots, dump=dump, pause=pause),
            drives=drives,
            sockets=sockets,
            name=name,
            dimms=dimms,
            arch=guest.arch,
            extra=qemu.args,
        )
        vm = QemuGuest(cmd, name=name, log_path=workdir / f"{name}.log", env=qemu.env)
        return stack.enter_context(vm)

    return start


@pytest.fixture
def boot(qemu: QemuBuild, guest: TestGuest, accel: str, workdir: Path) -> Iterator[Boot]:
    """Boots the (amd64) test guest on the given sockets; every QEMU is stopped at the end."""
    with ExitStack() as stack:
        yield _booter(stack, qemu, guest, accel, workdir)


@pytest.fixture(scope="module")
def arm64_guest() -> TestGuest:
    try:
        return build_test_guest(arch="arm64")
    except GuestBuildError as exc:
        pytest.fail(f"cannot build the arm64 test guest: {exc}")


@pytest.fixture
def boot_arm64(arm64_guest: TestGuest, workdir: Path) -> Iterator[Boot]:
    """Boots the arm64 test guest under the system's qemu-system-aarch64 (TCG on an x86 host,
    KVM only if the host is arm64 and it works)."""
    try:
        build = QemuBuild(find_qemu(arch="arm64"))
    except QemuError as exc:
        _unavailable(str(exc))
    accel = choose_accel(os.environ.get("RNGD_QEMU_ACCEL", "auto"), build.binary, arm64_guest)
    print(f"arm64: {build.version()}, {accel}")
    with ExitStack() as stack:
        yield _booter(stack, build, arm64_guest, accel, workdir)


def _report(vm: QemuGuest, *, timeout: float = BOOT_TIMEOUT) -> Report:
    report = vm.wait_report(timeout=timeout)
    assert report is not None, f"QEMU exited without a report:\n{vm.output[-3000:]}"
    assert report.ok, f"guest reported a failure: {report}\n{vm.output[-3000:]}"
    assert report.current.startswith("virtio_rng"), report
    return report


def _powered_off(vm: QemuGuest) -> None:
    code = vm.wait(timeout=30)
    assert code == 0, f"QEMU exited with {code}:\n{vm.output[-3000:]}"


def _requests(log: str) -> list[tuple[str, int]]:
    """The vhost-user requests in rngd's debug log, in order, with their header flags."""
    found = re.finditer(r" rngd\.connection: \S+: ([A-Z_]+) flags=(0x[0-9a-f]+) ", log)
    return [(m.group(1), int(m.group(2), 16)) for m in found]


NEED_REPLY = 1 << 3


@both_qemus
def test_guest_reads_256k_from_hwrng(qemu: QemuBuild, start_rngd: StartRngd, boot: Boot) -> None:
    rngd = start_rngd(extra=["--log-level", "debug"])
    started = time.monotonic()
    vm = boot(rngd.sockets)
    report = _report(vm)
    booted = time.monotonic() - started
    _powered_off(vm)
    assert report.nbytes == READ_BYTES
    print(
        f"boot to report {booted:.1f} s; guest read {report.nbytes} B in {report.seconds:.3f} s "
        f"({report.nbytes / report.seconds:,.0f} B/s)"
    )
    # Which start-up path this QEMU took: QEMU 10 waits for rngd's reply to SET_VRING_ENABLE
    # (REPLY_ACK), 7.2 does not; and a GET_STATUS right after SET_FEATURES, once rngd offers
    # STATUS. The guest above read its bytes either way.
    requests = _requests(rngd.log())
    names = [name for name, _ in requests]
    assert "SET_FEATURES" in names and "SET_VRING_ENABLE" in names, rngd.log()[-3000:]
    enables = [flags for name, flags in requests if name == "SET_VRING_ENABLE"]
    print(f"{qemu.version()}: SET_VRING_ENABLE flags {[hex(f) for f in enables]}")
    if qemu.major() >= 10:
        assert all(flags & NEED_REPLY for flags in enables), requests
        if "GET_STATUS" in names:  # rngd offered STATUS
            assert names[names.index("SET_FEATURES") + 1] == "GET_STATUS", names
    print(f"STATUS path taken: {'GET_STATUS' in names}")


def test_guest_gets_the_source_file_in_order(
    start_rngd: StartRngd, boot: Boot, workdir: Path
) -> None:
    source = os.urandom(4 * READ_BYTES)
    (workdir / "source.bin").write_bytes(source)
    dump = workdir / "dump.img"
    dump.write_bytes(bytes(2 * READ_BYTES))
    rngd = start_rngd(filename=str(workdir / "source.bin"))

    vm = boot(rngd.sockets, drives=[str(dump)], dump="/dev/vda")
    report = _report(vm)
    _powered_off(vm)

    got = dump.read_bytes()[: report.nbytes]
    assert report.nbytes == READ_BYTES
    assert hashlib.sha256(got).hexdigest() == report.sha256
    # Userspace gets the device's bytes in order. The kernel's hwrng core itself reads a few
    # 64-byte buffers first (early randomness) and, now and then, one more for the entropy
    # pool (its fill thread), which userspace then doesn't see: so the read starts a little
    # way into the file and may skip whole buffers, but nothing else.
    offset, skipped = match_stream(source, got)
    print(f"guest's bytes start at file offset {offset}; {skipped} bytes skipped after that")
    assert offset < 4096, offset
    assert skipped <= 16 * 64, skipped
    if skipped == 0:
        assert hashlib.sha256(source[offset : offset + READ_BYTES]).hexdigest() == report.sha256


@both_qemus
def test_rate_limit_is_what_the_guest_sees(start_rngd: StartRngd, boot: Boot) -> None:
    """The guest reads at the configured rate. The rate is set well below what a guest can
    read even on a loaded host (64-byte requests, one in flight: 0.6 MB/s alone under TCG, and
    30-36 KB/s with a CPU hog beside the whole test suite, where 40 KB/s was asked for and
    missed; at 10 KB/s, 0.93 of it): at 5 KB/s it has 12.5 ms for each request, so the limit,
    not the guest, sets the pace, as rngd's `parked` counter shows."""
    max_bytes, period_ms = 512, 100
    rate = max_bytes * 1000 / period_ms  # 5 KiB/s
    rngd = start_rngd(max_bytes=max_bytes, period=period_ms)
    nbytes = 20 * 1024  # about 4 s: one period's burst is then under 3 % of the total

    vm = boot(rngd.sockets, bytes_to_read=nbytes)
    report = _report(vm, timeout=BOOT_TIMEOUT + nbytes / rate)
    _powered_off(vm)

    measured = report.nbytes / report.seconds
    parked = re.findall(r"VMM disconnected .* parked=([0-9.]+)s", rngd.log())
    print(f"configured {rate:,.0f} B/s, guest measured {measured:,.0f} B/s; parked {parked} s")
    assert abs(measured - rate) <= 0.10 * rate, (measured, rate, f"parked {parked} s")


def test_two_guests_on_two_sockets_at_once(start_rngd: StartRngd, boot: Boot) -> None:
    """Both guests read at once, by arrangement rather than boot-time luck: each reads the
    first half, then waits at a barrier (`rngtest.pause`); only when both have reached it
    does the host release them, so each guest's read spans the other's pause and both
    second halves are read with the other guest mid-read."""
    rngd = start_rngd(socket_count=2)
    nbytes = READ_BYTES
    vms = [boot([socket], bytes_to_read=nbytes, pause=nbytes // 2) for socket in rngd.sockets]
    for vm in vms:
        paused = vm.wait_report("RNGTEST-PAUSE", timeout=BOOT_TIMEOUT)
        assert paused is not None, f"QEMU exited before the barrier:\n{vm.output[-3000:]}"
        assert paused.nbytes == nbytes // 2, paused
    released = time.monotonic()
    for vm in vms:
        vm.send("go")
    reports = [_report(vm) for vm in vms]
    for vm in vms:
        _powered_off(vm)
    assert all(r.nbytes == nbytes for r in reports)
    assert reports[0].sha256 != reports[1].sha256
    began = [vm.first_time("RNGTEST-START") for vm in vms]
    ended = [vm.first_time("RNGTEST ") for vm in vms]
    assert max(began) < released < min(ended), (began, released, ended)
    for vm, r in zip(vms, reports, strict=True):
        print(f"{vm.name}: {r.nbytes} B in {r.seconds:.2f} s, released from the barrier together")


@both_qemus
def test_guest_reboot_keeps_working(start_rngd: StartRngd, boot: Boot) -> None:
    rngd = start_rngd()
    vm = boot(rngd.sockets, boots=2)
    first = _report(vm)
    second = _report(vm)
    _powered_off(vm)
    assert (first.boot, second.boot) == (1, 2)
    assert second.nbytes == READ_BYTES
    assert first.sha256 != second.sha256


def test_guest_with_more_than_8_memory_regions(
    start_rngd: StartRngd, boot: Boot, workdir: Path
) -> None:
    """Ten pc-dimm devices on memfds of their own: eleven memory regions, more than one
    SET_MEM_TABLE carries. QEMU sees CONFIGURE_MEM_SLOTS offered, asks GET_MAX_MEM_SLOTS and
    sends the regions one by one (ADD_MEM_REG); the guest boots and reads /dev/hwrng.
    (Against vhost-device-rng, which has no CONFIGURE_MEM_SLOTS, QEMU refuses to start this
    guest: "a used vhost backend has no free memory slots left"; see docs/protocol.md.)"""
    rngd = start_rngd(extra=["--log-level", "debug"])
    vm = boot(rngd.sockets, bytes_to_read=64 * 1024, dimms=10)
    report = _report(vm)
    _powered_off(vm)
    assert report.nbytes == 64 * 1024
    log = rngd.log()
    assert "GET_MAX_MEM_SLOTS" in log, log[-3000:]
    assert log.count("ADD_MEM_REG") >= 11, log[-3000:]
    assert "SET_MEM_TABLE" not in log, log[-3000:]
    most = max(int(n) for n in re.findall(r"\((\d+) mapped\)", log))
    assert most > 8, log[-3000:]


def _wait_served(rngd: Rngd, nbytes: int, *, timeout: float = BOOT_TIMEOUT) -> None:
    """Until rngd's SIGUSR1 counters show a connection that has served more than `nbytes`."""
    deadline = time.monotonic() + timeout
    while True:
        os.kill(rngd.proc.pid, signal.SIGUSR1)
        time.sleep(0.1)  # a poll interval: the loop waits for the counters, not for time
        served = [int(n) for n in re.findall(r" serving: .* bytes=(\d+) ", rngd.log())]
        if served and max(served) > nbytes:
            return
        assert time.monotonic() < deadline, f"rngd never served {nbytes} B:\n{rngd.log()[-3000:]}"


def test_new_qemu_after_sigkill_mid_read(start_rngd: StartRngd, boot: Boot) -> None:
    rngd = start_rngd()
    doomed = boot(rngd.sockets, bytes_to_read=1 << 30)
    line = doomed.expect(lambda line: "RNGTEST-START" in line, timeout=BOOT_TIMEOUT)
    assert line is not None, doomed.output[-3000:]
    # Mid-read by what rngd has served, not by how long we waited: the read has begun (START)
    # and is far from done, and rngd's own counters (SIGUSR1) show it served 64 KiB of it.
    _wait_served(rngd, 64 * 1024)
    assert doomed.proc.poll() is None, "the guest finished a 1 GiB read?"
    doomed.kill()
    doomed.wait(timeout=10)

    vm = boot(rngd.sockets)
    report = _report(vm)
    _powered_off(vm)
    assert report.nbytes == READ_BYTES


def test_backports_qemu_uses_its_own_firmware_and_modules() -> None:
    """The unpacked QEMU 10 must not load the system's (7.2) modules, which it refuses ("Only
    modules from the same build can be loaded"), nor boot the system's firmware first."""
    build = _backports_qemu()
    search = subprocess.run(
        [build.binary, *build.args, "-L", "help"],
        env={**os.environ, **build.env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    root = Path(build.binary).parents[2]
    assert [Path(line) for line in search[:2]] == [
        root / "usr/share/qemu",
        root / "usr/share/seabios",
    ], search
    # `-device help` loads every module it can find.
    devices = subprocess.run(
        [build.binary, *build.args, "-device", "help"],
        env={**os.environ, **build.env},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "same build" not in devices.stderr, devices.stderr
    assert '"vhost-user-rng-pci"' in devices.stdout, devices.stdout


def test_compare_rngd_with_builtin(
    qemu: QemuBuild, accel: str, guest: TestGuest, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`rngd-qemu compare`, briefly: one round, rngd and QEMU's built-in device, plus an
    `--against` back-end that dies at once (`false`). Figures only have to exist and be
    positive; how they compare is for the benchmark, not a test. The dead back-end costs its
    own boot, listed as failed (exit status 1), not the comparison. rngd runs with a rate
    limit that never binds (`--max-bytes`/`--period` reach every vhost-user back-end)."""
    nbytes = 64 * 1024
    result = workdir / "compare.json"
    argv = ["compare", "--bytes", str(nbytes), "--rounds", "1", "--qemu", qemu.binary]
    argv += ["--accel", accel, "--against", "false", "--max-bytes", "1000000000", "-p", "1000"]
    status = main([*argv, "--json", str(result), "--log-dir", str(workdir / "logs")])
    out, err = capsys.readouterr()
    assert status == 1, err[-3000:]
    failures = json.loads(result.read_text())["failures"]
    assert len(failures) == 1 and failures[0].startswith("round 1 false: "), failures
    assert "Boots that failed" in out and "round 1 false: " in out, out

    runs = json.loads(result.read_text())["runs"]
    assert sorted(run["backend"] for run in runs) == ["built-in", "rngd"]
    for run in runs:
        assert run["nbytes"] == nbytes, run
        assert run["current"].startswith("virtio_rng"), run
        assert run["guest_seconds"] > 0 and run["bytes_per_second"] > 0, run
        assert run["qemu_cpu_read_seconds"] > 0, run
    rngd = next(run for run in runs if run["backend"] == "rngd")
    assert rngd["backend_cpu_seconds"] >= rngd["backend_cpu_read_seconds"] > 0, rngd
    builtin = next(run for run in runs if run["backend"] == "built-in")
    assert builtin["backend_cpu_seconds"] is None  # the built-in device's work is QEMU's
    assert "| built-in | " in out and "| rngd | " in out, out
    config = json.loads(result.read_text())["config"]
    assert (config["max_bytes"], config["period"]) == (1_000_000_000, 1000)
    assert "--max-bytes 1000000000 --period 1000" in out, out
    started = [line for line in err.splitlines() if "-m rngd " in line]
    assert started and all("--max-bytes 1000000000 --period 1000" in c for c in started), err
    for log in (workdir / "logs").glob("*-rngd.log"):
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    print(out)


def _wait_for_log(rngd: Rngd, text: str, *, timeout: float = BOOT_TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    while text not in (log := rngd.log()):
        assert rngd.proc.poll() is None, f"rngd exited:\n{log[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in rngd's log:\n{log[-3000:]}"
        time.sleep(0.05)
    return log


def test_failing_source_serves_the_guest_nothing(
    start_rngd: StartRngd, boot: Boot, workdir: Path
) -> None:
    """A source stuck at one value (a FIFO fed zeros by a thread of the test) fails its
    start-up test: the guest's read of /dev/hwrng waits, and rngd's SIGUSR1 dump shows its
    connection served nothing while the guest reads. Good bytes then come: the source passes
    its start-up test again, the guest's read completes, and what it got (dumped to a disk)
    holds no stuck run and is the good stream's bytes, in order."""
    fifo = workdir / "fifo"
    os.mkfifo(fifo)
    rngd = start_rngd(filename=str(fifo))
    good = bytearray()
    stuck = threading.Event()
    stuck.set()
    done = threading.Event()

    def feed() -> None:
        fd = os.open(fifo, os.O_WRONLY)
        try:
            while not done.is_set():
                if stuck.is_set():
                    chunk = bytes(4096)
                else:
                    chunk = os.urandom(4096)
                    good.extend(chunk)
                view = memoryview(chunk)
                while view and not done.is_set():
                    ready = select.select([], [fd], [], 0.1)[1]
                    if ready:
                        view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        _wait_for_log(rngd, "declared failed")
        nbytes = 64 * 1024
        dump = workdir / "dump.img"
        dump.write_bytes(bytes(2 * nbytes))
        vm = boot(rngd.sockets, bytes_to_read=nbytes, drives=[str(dump)], dump="/dev/vda")
        line = vm.expect(lambda line: "RNGTEST-START" in line, timeout=BOOT_TIMEOUT)
        assert line is not None, vm.output[-3000:]
        # The guest reads (its driver's request waits in the ring) and has got nothing.
        rngd.proc.send_signal(signal.SIGUSR1)
        log = _wait_for_log(rngd, "rng.sock0: serving:", timeout=10)
        (serving,) = [x for x in log.splitlines() if "rng.sock0: serving:" in x]
        assert " requests=0 bytes=0 " in serving, serving
        assert "RNGTEST " not in vm.output
        stuck.clear()
        report = _report(vm)
        _powered_off(vm)
    finally:
        done.set()
        feeder.join(timeout=10)
    got = dump.read_bytes()[: report.nbytes]
    assert report.nbytes == nbytes
    assert hashlib.sha256(got).hexdigest() == report.sha256
    assert bytes(19) not in got  # no run of the RCT's cutoff
    match_stream(bytes(good), got)
    log = rngd.log()
    assert "failed its start-up test" in log and "passed its start-up test again" in log, log


def test_arm64_guest_reads_the_source_file_through_rngd(
    start_rngd: StartRngd, boot_arm64: Boot, workdir: Path
) -> None:
    """An arm64 guest (`-M virt`, vhost-device-rng's README example) reads /dev/hwrng through
    rngd: the bytes it read are the source file's, in order (gaps allowed, see
    test_guest_gets_the_source_file_in_order)."""
    source = os.urandom(4 * READ_BYTES)
    (workdir / "source.bin").write_bytes(source)
    dump = workdir / "dump.img"
    dump.write_bytes(bytes(2 * READ_BYTES))
    rngd = start_rngd(filename=str(workdir / "source.bin"))

    started = time.monotonic()
    vm = boot_arm64(rngd.sockets, drives=[str(dump)], dump="/dev/vda")
    report = _report(vm)
    booted = time.monotonic() - started
    _powered_off(vm)

    assert "-numa node,memdev=mem" in " ".join(vm.cmd)  # the README's RAM, not a memfd
    assert report.nbytes == READ_BYTES
    got = dump.read_bytes()[: report.nbytes]
    assert hashlib.sha256(got).hexdigest() == report.sha256
    offset, skipped = match_stream(source, got)
    assert offset < 4096, offset
    assert skipped <= 16 * 64, skipped
    print(
        f"arm64: boot to report {booted:.1f} s; read {report.nbytes} B in "
        f"{report.seconds:.3f} s; file offset {offset}, {skipped} B skipped"
    )


def test_arm64_guest_with_the_readme_rate_limit(start_rngd: StartRngd, boot_arm64: Boot) -> None:
    """vhost-device-rng's README example limit, `-m 512 -p 1000`: an arm64 guest reads a few
    periods' worth. rngd charges every byte to the 1 s window it is granted in and never more
    than 512 B to one, so `s` seconds meet at most ceil(s) + 1 windows. The guest's read of
    2048 bytes (less the one 64-byte buffer the driver may hold from before) therefore takes
    more than 2 s however fast or slow the machine (asserted with room for the guest's clock),
    and all rngd served the connection (the kernel's fill thread takes its share too) fits its
    uptime's windows."""
    rngd = start_rngd(max_bytes=512, period=1000)
    nbytes = 4 * 512

    vm = boot_arm64(rngd.sockets, bytes_to_read=nbytes)
    report = _report(vm, timeout=BOOT_TIMEOUT + 4 * nbytes / 512)
    _powered_off(vm)

    assert report.nbytes == nbytes
    assert report.seconds > 1.5, report
    gone = re.search(r"VMM disconnected .* uptime=([\d.]+)s .* bytes=(\d+) ", rngd.log())
    assert gone is not None, rngd.log()[-3000:]
    uptime, served = float(gone.group(1)), int(gone.group(2))
    assert nbytes <= served <= 512 * (math.ceil(uptime + 0.1) + 1), (served, uptime)
    print(
        f"arm64: guest read {nbytes} B in {report.seconds:.2f} s; rngd served {served} B "
        f"in {uptime:.1f} s connected"
    )
