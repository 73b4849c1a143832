"""Run real QEMU guests against rngd: the logic behind `scripts/rngd-qemu` and the QEMU tests.

Plain `subprocess` and threads rather than trio: this drives other programs and reads their
consoles, and the same code serves a command-line helper and synchronous pytest tests.

Pieces:
- `find_qemu` and `choose_accel`: which QEMU, and KVM only if a guest actually boots with it
  (a nested host can have a /dev/kvm that runs firmware and then hangs in the guest kernel).
- `QemuBuild`: a QEMU unpacked outside the system (scripts/fetch-qemu-backports), with the
  arguments and environment that make it use its own firmware and modules.
- `qemu_command`: the command line that wires a guest to a vhost-user socket.
- `QemuGuest`: one running QEMU with its console captured line by line.
- `Rngd`: one running daemon (`python -m rngd`) with its sockets.
- `boot`: the `rngd-qemu` helper's guests (rngd/testing/qemu_cli.py runs it; `rngd-qemu
  compare` is in rngd/testing/guest_bench.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO

from rngd.testing.guest import (
    ARCHES,
    GuestBuildError,
    Report,
    TestGuest,
    build_test_guest,
    default_cache_dir,
    guest_arch,
    parse_report,
)

QEMU_BINARY = ARCHES["amd64"].qemu_binary
QEMU_INSTALL_HINT = "install it with `apt-get install qemu-system-x86` (Debian, Ubuntu)"
DEFAULT_MEMORY = "256M"

#: How long a KVM probe boot may take before KVM counts as unusable. A working KVM boots the
#: test guest to its report in well under a second; a broken nested one spins forever.
KVM_PROBE_TIMEOUT = 10.0


class QemuError(Exception):
    """QEMU is missing, failed to start, or a guest did not do what was expected."""


def find_qemu(binary: str | None = None, *, arch: str = "amd64") -> str:
    """The path of the QEMU system emulator for guests of `arch` (`$RNGD_QEMU` for amd64), or
    QemuError with how to install it."""
    spec = guest_arch(arch)
    env = os.environ.get("RNGD_QEMU") if arch == "amd64" else None
    name = binary or env or spec.qemu_binary
    path = shutil.which(name)
    if path is None:
        hint = f"install it with `apt-get install {spec.qemu_package}` (Debian, Ubuntu)"
        raise QemuError(f"{name} not found: {hint}")
    return path


def host_arch() -> str:
    """Debian's name of the host's architecture (as guests' `arch`), from the kernel's."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)


def qemu_version(qemu: str, env: Mapping[str, str] | None = None) -> str:
    run_env = None if env is None else {**os.environ, **env}
    out = subprocess.run(
        [qemu, "--version"], capture_output=True, text=True, check=False, env=run_env
    ).stdout
    return out.splitlines()[0] if out else "unknown"


#: Where scripts/test says scripts/fetch-qemu-backports unpacked Debian backports' QEMU.
BACKPORTS_ROOT_ENV = "RNGD_QEMU_BACKPORTS"


@dataclasses.dataclass(frozen=True)
class QemuBuild:
    """A QEMU to run: its binary, plus the arguments and environment it needs on top.

    The system's QEMU needs nothing more. One unpacked from Debian packages beside it (`dpkg
    -x`, see scripts/fetch-qemu-backports) must load its modules from its own build
    (`QEMU_MODULE_DIR`; modules of another build are refused) and find its own firmware
    (`-L`, searched before the built-in firmware path, which points at the system's copy).
    """

    binary: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def unpacked(cls, root: Path) -> QemuBuild:
        """The qemu-system-x86_64 under `root`, a `dpkg -x` of Debian's QEMU packages."""
        binary = root / "usr" / "bin" / QEMU_BINARY
        if not binary.is_file():
            raise QemuError(f"no {QEMU_BINARY} under {root}")
        firmware = ("-L", str(root / "usr/share/qemu"), "-L", str(root / "usr/share/seabios"))
        modules = root / "usr/lib/x86_64-linux-gnu/qemu"
        return cls(str(binary), firmware, {"QEMU_MODULE_DIR": str(modules)})

    def version(self) -> str:
        return qemu_version(self.binary, self.env)

    def major(self) -> int:
        """The major version (10 for `QEMU emulator version 10.0.2 ...`), 0 if unknown."""
        words = self.version().split()
        number = words[3] if len(words) > 3 and words[:3] == ["QEMU", "emulator", "version"] else ""
        head = number.split(".")[0]
        return int(head) if head.isdigit() else 0


def qemu_command(
    qemu: str,
    *,
    accel: str,
    kernel: Path | None = None,
    initrd: Path | None = None,
    append: str | None = None,
    drives: Sequence[str] = (),
    sockets: Sequence[Path] = (),
    builtin_rng: str | None = None,
    memory: str = DEFAULT_MEMORY,
    smp: int = 1,
    serial: str = "stdio",
    name: str | None = None,
    dimms: int = 0,
    arch: str = "amd64",
    extra: Sequence[str] = (),
) -> list[str]:
    """The QEMU command line for one guest of `arch` with one vhost-user-rng device per socket.

    vhost-user needs the guest's RAM in a file descriptor it can pass to the backend, hence a
    shared memory backend: a memfd on amd64; on arm64 (`-M virt`) a file on /dev/shm with
    `-numa node,memdev=`, exactly as vhost-device-rng's README shows. `drives` are raw image
    files, or full `-drive` option strings when they contain `=`. `builtin_rng` adds QEMU's own
    virtio-rng-pci device reading that file (`rng-random`), without a rate limit (the same
    memory backend, so that only the device differs from a vhost-user guest).
    """
    cmd = [qemu, "-nodefaults", "-no-user-config", "-display", "none"]
    if name:
        cmd += ["-name", name]
    ram = f"{memory},slots={max(dimms, 1)},maxmem=4G" if dimms else memory
    cmd += ["-accel", accel, "-m", ram, "-smp", str(smp)]
    machine = guest_arch(arch)
    if accel == "kvm":
        cmd += ["-cpu", "host"]
    elif machine.tcg_cpu is not None:
        cmd += ["-cpu", machine.tcg_cpu]
    if machine.ram == "memfd":
        cmd += [
            "-object",
            f"memory-backend-memfd,id=mem,size={memory},share=on",
            "-machine",
            f"{machine.machine},memory-backend=mem",
        ]
    else:
        cmd += [
            "-machine",
            machine.machine,
            "-object",
            f"memory-backend-file,id=mem,size={memory},mem-path=/dev/shm,share=on",
            "-numa",
            "node,memdev=mem",
        ]
    if dimms and arch != "amd64":
        raise QemuError("DIMMs are only wired up for amd64 guests")
    for index in range(dimms):
        cmd += [
            "-object",
            f"memory-backend-memfd,id=dimm-mem{index},size=64M,share=on",
            "-device",
            f"pc-dimm,id=dimm{index},memdev=dimm-mem{index}",
        ]
    for index, path in enumerate(sockets):
        cmd += [
            "-chardev",
            f"socket,id=rng{index},path={path}",
            "-device",
            f"vhost-user-rng-pci,chardev=rng{index}",
        ]
    if builtin_rng is not None:
        # max-bytes defaults to INT64_MAX per 65536 ms already; spelled out so that the command
        # line shows there is no limit.
        cmd += [
            "-object",
            f"rng-random,id=builtin-rng,filename={builtin_rng}",
            "-device",
            f"virtio-rng-pci,rng=builtin-rng,max-bytes={2**63 - 1},period=65536",
        ]
    for drive in drives:
        spec = drive if "=" in drive else f"file={drive},format=raw,if=virtio"
        cmd += ["-drive", spec]
    if kernel is not None:
        cmd += ["-kernel", str(kernel)]
    if initrd is not None:
        cmd += ["-initrd", str(initrd)]
    if append is not None:
        cmd += ["-append", append]
    cmd += ["-serial", serial]
    cmd += list(extra)
    return cmd


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def probe_kvm(
    qemu: str,
    guest: TestGuest,
    *,
    timeout: float = KVM_PROBE_TIMEOUT,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> str | None:
    """None if the test guest boots to its report under KVM, else why not.

    `extra` and `env` are what the QEMU needs on top (see `QemuBuild`). The answer is cached
    per host boot, QEMU and kernel, next to the test guest builds.
    """
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible (add yourself to the kvm group)"
    key = hashlib.sha256(
        f"{_boot_id()} {qemu} {qemu_version(qemu, env)} {guest.kernel}".encode()
    ).hexdigest()[:16]
    cache = default_cache_dir() / "kvm-probe.json"
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(cache.read_text())
        if known.get("key") == key:
            cached = known.get("reason")
            return cached if isinstance(cached, str) else None
    cmd = qemu_command(
        qemu,
        accel="kvm",
        kernel=guest.kernel,
        initrd=guest.initrd,
        append=guest.append(bytes_to_read=0, wait=0),
        memory="128M",
        arch=guest.arch,
        extra=["-no-reboot", *extra],
    )
    reason: str | None
    try:
        with QemuGuest(cmd, name="kvm-probe", env=env) as probe:
            report = probe.wait_report(timeout=timeout)
            reason = None if report is not None else "QEMU exited: " + probe.output[-300:]
    except QemuError:
        reason = f"the test guest did not boot under KVM within {timeout:.0f} s"
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "reason": reason}) + "\n")
    return reason


def choose_accel(
    mode: str,
    qemu: str,
    guest: TestGuest | None = None,
    *,
    log: Callable[[str], None] | None = None,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    arch: str = "amd64",
) -> str:
    """`kvm` or `tcg` for `mode` in auto/kvm/tcg; auto tries KVM by booting the test guest.

    A /dev/kvm that opens proves nothing (on a nested host it may run firmware and then spin
    in the guest kernel), so without a test guest to try (given, or built here) auto means TCG.
    A guest of another architecture than the host's (`arch`, or the given guest's: arm64 on
    amd64) is TCG without asking.
    """
    if mode in ("kvm", "tcg"):
        return mode
    if mode != "auto":
        raise QemuError(f"unknown accelerator {mode!r} (auto, kvm or tcg)")
    if (guest.arch if guest is not None else arch) != host_arch():
        return "tcg"
    reason: str | None
    if guest is None:
        try:
            guest = build_test_guest(arch=arch, log=False)
        except GuestBuildError as exc:
            reason = f"no test guest to try it with: {exc}"
        else:
            reason = probe_kvm(qemu, guest, extra=extra, env=env)
    else:
        reason = probe_kvm(qemu, guest, extra=extra, env=env)
    if reason is None:
        return "kvm"
    if log is not None:
        log(f"KVM not usable ({reason}); using TCG")
    return "tcg"


class QemuGuest:
    """One QEMU process with its serial console (stdout) read line by line in a thread, and
    its serial input (stdin) a pipe that `send` writes to.

    QEMU runs in its own process group so that it can be stopped as a whole, and so that a
    Ctrl-C at the terminal reaches the helper, which then stops things in order.
    """

    def __init__(
        self,
        cmd: Sequence[str],
        *,
        name: str = "guest",
        log_path: Path | None = None,
        echo: Callable[[str], None] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """`env`: variables set for QEMU on top of this process's environment."""
        self.cmd = list(cmd)
        self.name = name
        self.lines: list[str] = []
        #: time.monotonic() when each line of `lines` arrived.
        self.times: list[float] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._log: IO[str] | None = open(log_path, "w") if log_path else None  # noqa: SIM115
        self._echo = echo
        self.started = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=None if env is None else {**os.environ, **env},
            )
        except FileNotFoundError as exc:
            raise QemuError(f"{self.cmd[0]} not found: {QEMU_INSTALL_HINT}") from exc
        self._reader = threading.Thread(target=self._read, name=f"console-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            self.times.append(time.monotonic())
            self.lines.append(line)
            if self._log is not None:
                self._log.write(line + "\n")
                self._log.flush()
            if self._echo is not None:
                self._echo(line)
            self._queue.put(line)
        self._queue.put(None)

    def __enter__(self) -> QemuGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def expect(self, predicate: Callable[[str], bool], *, timeout: float) -> str | None:
        """The next console line for which `predicate` holds; None if QEMU exited first.

        Raises QemuError on timeout (with the tail of the console, which says why).
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QemuError(
                    f"{self.name}: timed out after {timeout:.0f} s; console tail:\n"
                    + "\n".join(self.lines[-25:])
                )
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self._queue.put(None)  # later calls see the end too
                return None
            if predicate(line):
                return line

    def wait_report(self, kind: str = "RNGTEST", *, timeout: float) -> Report | None:
        """The next report of this kind (see rngd.testing.guest), None if QEMU exited first."""

        def wanted(line: str) -> bool:
            report = parse_report(line)
            return report is not None and report.kind == kind

        line = self.expect(wanted, timeout=timeout)
        return None if line is None else parse_report(line)

    def send(self, line: str) -> None:
        """Type one line on the guest's serial console (e.g. to release `rngtest.pause`)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def first_time(self, marker: str) -> float:
        """When the first console line containing `marker` arrived (time.monotonic())."""
        for when, line in zip(self.times, list(self.lines), strict=False):
            if marker in line:
                return when
        raise QemuError(f"{self.name}: no console line contains {marker!r}")

    def reports(self, kind: str = "RNGTEST") -> list[Report]:
        found = (parse_report(line) for line in list(self.lines))
        return [r for r in found if r is not None and r.kind == kind]

    def wait(self, timeout: float) -> int:
        """QEMU's exit status; QemuError if it is still running after `timeout`."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise QemuError(f"{self.name}: QEMU still running after {timeout:.0f} s") from exc
        self._reader.join(5)
        return code

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, grace: float = 5.0) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL after `grace` seconds) and close the log."""
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.proc.wait()
        self._reader.join(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        if self._log is not None:
            self._log.close()
            self._log = None


def socket_paths(socket_path: Path, count: int) -> list[Path]:
    """The sockets rngd (like vhost-device-rng) listens on: PATH0 .. PATH{count-1}."""
    return [Path(f"{socket_path}{index}") for index in range(count)]


@dataclasses.dataclass
class RngdOptions:
    socket_path: Path
    socket_count: int = 1
    filename: str | None = None
    max_bytes: int | None = None
    period: int | None = None
    extra: Sequence[str] = ()

    def args(self) -> list[str]:
        args = ["--socket-path", str(self.socket_path), "--socket-count", str(self.socket_count)]
        if self.filename is not None:
            args += ["--filename", self.filename]
        if self.max_bytes is not None:
            args += ["--max-bytes", str(self.max_bytes)]
        if self.period is not None:
            args += ["--period", str(self.period)]
        return args + list(self.extra)


class Rngd:
    """A running `python -m rngd`, in its own process group, its log in a file.

    `program` runs another back-end with the same command line instead (vhost-device-rng:
    give `options` no filename and `-f FILE` in `extra`, as it has no `--filename`).
    """

    def __init__(
        self,
        options: RngdOptions,
        *,
        python: str = sys.executable,
        program: Sequence[str] | None = None,
        log_path: Path | None = None,
        announce: Callable[[str], None] | None = None,
    ) -> None:
        self.options = options
        self.sockets = socket_paths(options.socket_path, options.socket_count)
        prefix = list(program) if program is not None else [python, "-m", "rngd"]
        self.cmd = [*prefix, *options.args()]
        #: What error messages call it.
        self.label = Path(program[0]).name if program else "rngd"
        if announce is not None:
            announce(shlex.join(self.cmd))
        if log_path is None:
            self._log_file: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        else:
            self._log_file = open(log_path, "w+b")  # noqa: SIM115
        env = dict(os.environ)
        if program is None:
            # Run this very rngd (a checkout need not be installed into `python`); another
            # program, perhaps another checkout's `python -m rngd`, runs as it is.
            package_root = str(Path(__file__).resolve().parents[2])
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            self.cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        self._log_file.flush()
        self._log_file.seek(0)
        return self._log_file.read().decode(errors="replace")

    def wait_listening(self, timeout: float = 15.0) -> None:
        """Return once every socket accepts connections; QemuError if rngd died or timed out."""
        deadline = time.monotonic() + timeout
        while not all(path.is_socket() for path in self.sockets):
            if self.proc.poll() is not None:
                raise QemuError(
                    f"{self.label} exited with {self.proc.returncode}:\n{self.log()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise QemuError(f"{self.label} did not create {self.sockets} in {timeout:.0f} s")
            time.sleep(0.05)

    def __enter__(self) -> Rngd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, grace: float = 5.0) -> int:
        """SIGTERM (the daemon's clean exit), SIGKILL after `grace` s; the exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


# --- the rngd-qemu helper --------------------------------------------------------------------


class _Stop(Exception):
    pass


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rngd-qemu",
        description="Boot real QEMU guests wired to rngd over vhost-user. Starts rngd (or uses "
        "one already running with --socket), then one QEMU per guest, each with a "
        "vhost-user-rng-pci device on its own socket. By default the guest is the built-in test "
        "guest, which reads /dev/hwrng, prints an RNGTEST line and powers off.",
        epilog="`rngd-qemu compare --help`: a real guest's throughput through rngd, QEMU's "
        "built-in virtio-rng and other back-ends, interleaved over rounds.",
    )
    daemon = parser.add_argument_group("rngd (ignored with --socket)")
    daemon.add_argument("-s", "--socket-path", type=Path, help="default: in a temporary folder")
    daemon.add_argument("-f", "--filename", help="entropy source for rngd (default: its own)")
    daemon.add_argument("-m", "--max-bytes", type=int, help="rngd --max-bytes")
    daemon.add_argument("-p", "--period", type=int, help="rngd --period (ms)")
    daemon.add_argument(
        "--rngd-arg", action="append", default=[], help="extra argument for rngd (repeatable)"
    )
    daemon.add_argument("--python", default=sys.executable, help="Python that runs rngd")
    guests = parser.add_argument_group("guests")
    guests.add_argument("-n", "--guests", type=int, default=1, help="how many guests (default 1)")
    guests.add_argument(
        "--socket",
        type=Path,
        action="append",
        default=[],
        help="use this socket of an already running backend (repeat once per guest)",
    )
    guests.add_argument(
        "--arch",
        choices=sorted(ARCHES),
        default="amd64",
        help="the guests' architecture (default amd64; arm64 is QEMU's -M virt under TCG)",
    )
    guests.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    guests.add_argument("--qemu", help=f"QEMU binary (default {QEMU_BINARY} or $RNGD_QEMU)")
    guests.add_argument(
        "--qemu-root",
        type=Path,
        help="run the QEMU unpacked here (by scripts/fetch-qemu-backports) with its own "
        "modules and firmware",
    )
    guests.add_argument("--memory", default=DEFAULT_MEMORY, help="guest RAM (default 256M)")
    guests.add_argument("--kernel", type=Path, help="boot your own kernel")
    guests.add_argument("--initrd", type=Path, help="... with this initramfs")
    guests.add_argument(
        "--append", help="kernel command line (own kernel: default console=ttyS0, arm64 ttyAMA0)"
    )
    guests.add_argument("--drive", action="append", default=[], help="raw image or -drive spec")
    guests.add_argument("--qemu-arg", action="append", default=[], help="extra QEMU argument")
    test = parser.add_argument_group("built-in test guest")
    test.add_argument("--bytes", type=int, default=262144, help="bytes to read (default 262144)")
    test.add_argument("--boots", type=int, default=1, help="boots per guest (reboots in between)")
    test.add_argument(
        "--shell", action="store_true", help="a shell on the console after the test (one guest)"
    )
    parser.add_argument("--log-dir", type=Path, help="write each console and rngd's log here")
    parser.add_argument(
        "--timeout", type=float, default=0, help="stop everything after this many seconds"
    )
    return parser


def boot(argv: Sequence[str]) -> int:
    """`rngd-qemu` without `compare`: boot the guests `argv` asks for; the exit status."""
    args = _parser().parse_args(argv)

    def say(message: str) -> None:
        print(f"rngd-qemu: {message}", file=sys.stderr, flush=True)

    if args.guests < 1:
        say("error: --guests must be at least 1")
        return 2
    if args.socket and len(args.socket) != args.guests:
        if args.guests != 1:
            say("error: give one --socket per guest")
            return 2
        args.guests = len(args.socket)
    if args.shell and args.guests != 1:
        say("error: --shell needs exactly one guest")
        return 2
    if args.boots != 1 and not ARCHES[args.arch].has_cmos:
        say(f"error: --boots is for amd64 guests only ({args.arch} has no CMOS to count in)")
        return 2
    if args.qemu_root and args.arch != "amd64":
        say("error: --qemu-root is an unpacked qemu-system-x86: amd64 guests only")
        return 2
    try:
        build = (
            QemuBuild.unpacked(args.qemu_root)
            if args.qemu_root
            else QemuBuild(find_qemu(args.qemu, arch=args.arch))
        )
    except QemuError as exc:
        say(f"error: {exc}")
        return 127

    guest: TestGuest | None = None
    if args.kernel is None:
        try:
            guest = build_test_guest(arch=args.arch)
        except GuestBuildError as exc:
            say(f"error: cannot build the test guest: {exc}")
            return 1
    qemu = build.binary
    accel = choose_accel(
        args.accel, qemu, guest, log=say, extra=build.args, env=build.env, arch=args.arch
    )
    say(f"{build.version()}, accelerator {accel}")

    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    started: list[QemuGuest] = []
    rngd: Rngd | None = None
    status = 0
    with contextlib.ExitStack() as stack:
        try:
            if args.socket:
                sockets: list[Path] = list(args.socket)
                for path in sockets:
                    if not path.is_socket():
                        say(f"error: {path} is not a socket (is the backend running?)")
                        return 1
            else:
                base = args.socket_path
                if base is None:
                    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rngd-")))
                    base = tmp / "rng.sock"
                options = RngdOptions(
                    base,
                    args.guests,
                    args.filename,
                    args.max_bytes,
                    args.period,
                    args.rngd_arg,
                )
                log_path = args.log_dir / "rngd.log" if args.log_dir else None
                rngd = Rngd(
                    options, python=args.python, log_path=log_path, announce=lambda c: say(f"+ {c}")
                )
                rngd.wait_listening()
                sockets = rngd.sockets
            for index in range(args.guests):
                name = f"guest{index}"
                if guest is not None:
                    kernel, initrd = guest.kernel, guest.initrd
                    append = guest.append(
                        bytes_to_read=args.bytes, boots=args.boots, shell=args.shell
                    )
                    if args.append:
                        append += " " + args.append
                else:
                    kernel, initrd = args.kernel, args.initrd
                    console = f"console={ARCHES[args.arch].console}"
                    append = args.append if args.append is not None else console
                cmd = qemu_command(
                    qemu,
                    accel=accel,
                    kernel=kernel,
                    initrd=initrd,
                    append=append,
                    drives=args.drive,
                    sockets=[sockets[index]],
                    memory=args.memory,
                    name=name,
                    arch=args.arch,
                    serial="mon:stdio" if args.shell else "stdio",
                    extra=[*build.args, *args.qemu_arg],
                )
                say(f"+ {shlex.join(cmd)}")
                if args.shell:
                    # Interactive: QEMU owns the terminal (Ctrl-A X quits it); we just wait.
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    env = {**os.environ, **build.env}
                    return subprocess.run(cmd, check=False, env=env).returncode
                prefix = f"[{name}] " if args.guests > 1 else ""

                def echo(line: str, prefix: str = prefix) -> None:
                    print(prefix + line, flush=True)

                log_path = args.log_dir / f"{name}.log" if args.log_dir else None
                started.append(
                    QemuGuest(
                        cmd,
                        name=name,
                        log_path=log_path,
                        echo=echo,
                        env=build.env,
                    )
                )
            deadline = time.monotonic() + args.timeout if args.timeout > 0 else None
            while any(g.proc.poll() is None for g in started):
                if rngd is not None and rngd.proc.poll() is not None:
                    say(f"rngd exited with {rngd.proc.returncode}; stopping the guests")
                    status = 1
                    break
                if deadline is not None and time.monotonic() > deadline:
                    say(f"timed out after {args.timeout:.0f} s; stopping")
                    status = 1
                    break
                time.sleep(0.1)
        except _Stop as stop:
            say(f"{stop}: stopping")
            status = 130
        except QemuError as exc:
            say(f"error: {exc}")
            status = 1
        finally:
            # Stop QEMU before rngd: the daemon should see guests go, not the other way round.
            for g in started:
                g.stop()
            if rngd is not None:
                code = rngd.stop()
                if code not in (0, -signal.SIGTERM) and status == 0:
                    say(f"rngd exited with {code}:\n{rngd.log()[-2000:]}")
                    status = 1
            for s, handler in previous.items():
                signal.signal(s, handler)
    for g in started:
        code = g.proc.returncode
        if status == 0 and code != 0:
            say(f"{g.name}: QEMU exited with {code}")
            status = 1
        if guest is not None and status == 0:
            reports = g.reports()
            good = [r for r in reports if r.ok]
            if len(good) < args.boots:
                say(f"{g.name}: expected {args.boots} good RNGTEST report(s), got {reports}")
                status = 1
            for r in good:
                rate = r.nbytes / r.seconds if r.seconds > 0 else float("nan")
                say(f"{g.name}: boot {r.boot}: {r.nbytes} B in {r.seconds:.3f} s, {rate:,.0f} B/s")
    return status
