"""A real guest's /dev/hwrng throughput through rngd, QEMU's built-in virtio-rng and others.

`rngd-qemu compare` boots the test guest (rngd/testing/guest.py) once per back-end per round:
QEMU's own `virtio-rng-pci` on an `rng-random` object (the baseline), `vhost-user-rng-pci` to
rngd, and `vhost-user-rng-pci` to each `--against` program (any back-end with vhost-device-rng's
command line, such as the Rust original). Every boot is the same kernel, initramfs, memory
backend and source file; only the RNG device differs. Each boot gets a fresh back-end process.
Rounds interleave the back-ends, and the order rotates from one round to the next, so that
neither a drift in the host's load nor a fixed position favours one back-end.

What is measured, per boot:

- the guest's read of N bytes of /dev/hwrng (`head -c N /dev/hwrng | wc -c`, no hashing),
  timed by the guest's monotonic clock around the read (the `seconds` of its report). That is
  more robust than timing console lines on the host: it brackets the read alone, while a line's
  arrival on the host also carries the emulated UART, QEMU's chardev and our reader thread.
  Under TCG the guest's clocksource follows the host's real time (there is no instruction
  counting here), and the console-line interval is recorded next to it as a cross-check
  (`host_seconds`).
- the back-end's CPU time, utime + stime of all its threads (`cpu_seconds`), from QEMU's start
  to its exit (boot + read) and between the console lines that open and close the read (the
  lines reach the host a few ms late, the same for every back-end); QEMU's own CPU time over
  the read likewise.

Each guest checks that its hwrng is the virtio one (`rng_current`) and that it read N bytes.

`--max-bytes`/`--period` run every vhost-user back-end (rngd and each `--against`) with that
rate limit; QEMU's built-in device, the baseline, stays unlimited.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rngd.config import MAX_PERIOD_MS
from rngd.testing.guest import GuestBuildError, TestGuest, build_test_guest, parse_report
from rngd.testing.qemu import (
    DEFAULT_MEMORY,
    QEMU_BINARY,
    QemuError,
    QemuGuest,
    Rngd,
    RngdOptions,
    _on_signal,
    _Stop,
    choose_accel,
    find_qemu,
    qemu_command,
    qemu_version,
)

BUILTIN = "built-in"
RNGD = "rngd"
DEFAULT_BYTES = 256 * 1024
DEFAULT_ROUNDS = 3
DEFAULT_SOURCE = "/dev/urandom"

#: A boot under TCG takes about 5 s; the read itself is allowed at least 20 KB/s on top.
BOOT_TIMEOUT = 120.0
MIN_RATE = 20_000


@dataclasses.dataclass(frozen=True)
class Backend:
    """One way to give the guest its RNG: QEMU's built-in device, or a vhost-user program."""

    name: str
    #: The program and its first arguments, before `--socket-path P --socket-count 1 -f FILE`;
    #: None for QEMU's built-in device.
    program: tuple[str, ...] | None
    #: `program` is `python -m rngd` of this checkout (run with it on PYTHONPATH).
    this_rngd: bool = False

    @property
    def builtin(self) -> bool:
        return self.program is None


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of all threads of a running process, dead threads included.

    Read from the process's CPU-time clock (`clock_gettime` on the clock id that
    `clock_getcpuclockid(3)` would give), which counts nanoseconds; /proc/PID/stat holds the same
    utime + stime but in clock ticks (10 ms), too coarse for a back-end that spends 20 ms on a
    read. Falls back to /proc/PID/stat where that clock is not available.
    """
    # Linux's process CPU clock ids: ~pid << 3 | CPUCLOCK_SCHED (2), per process (bit 2 clear).
    try:
        return time.clock_gettime((~pid << 3) | 2)
    except OSError:
        pass
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class Run:
    """One boot: one back-end reading N bytes in one round."""

    round: int
    position: int  # 1-based place of this boot within its round
    backend: str
    nbytes: int
    #: The read, by the guest's clock.
    guest_seconds: float
    #: The same read from the host: console line RNGTEST-START to RNGTEST.
    host_seconds: float
    #: QEMU's start to the RNGTEST-START line.
    boot_seconds: float
    current: str
    #: The back-end's CPU time from QEMU's start to its exit, and during the read; None for
    #: the built-in device (its work is QEMU's).
    backend_cpu_seconds: float | None
    backend_cpu_read_seconds: float | None
    qemu_cpu_read_seconds: float

    @property
    def bytes_per_second(self) -> float:
        return self.nbytes / self.guest_seconds if self.guest_seconds > 0 else 0.0


@dataclasses.dataclass
class Summary:
    backend: str
    rates: list[float]  # bytes/s per round
    median_rate: float
    ratios: list[float]  # to the built-in device's rate in the same round
    median_ratio: float
    median_backend_cpu_ms: float | None
    median_backend_cpu_read_ms: float | None
    median_qemu_cpu_read_ms: float


def _median_or_none(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summarize(runs: Sequence[Run], backends: Sequence[Backend]) -> list[Summary]:
    """Per back-end: rates by round, their median, and ratios to the built-in device's rate of
    the same round (the median ratio is the median of those paired ratios)."""
    rounds = sorted({run.round for run in runs})
    by_key = {(run.round, run.backend): run for run in runs}
    summaries = []
    for backend in backends:
        mine = [by_key[r, backend.name] for r in rounds if (r, backend.name) in by_key]
        rates = [run.bytes_per_second for run in mine]
        ratios = []
        for run in mine:
            base = by_key.get((run.round, BUILTIN))
            if base is not None and base.bytes_per_second > 0:
                ratios.append(run.bytes_per_second / base.bytes_per_second)

        def ms(value: float | None) -> float | None:
            return None if value is None else value * 1000

        summaries.append(
            Summary(
                backend=backend.name,
                rates=rates,
                median_rate=statistics.median(rates) if rates else 0.0,
                ratios=ratios,
                median_ratio=statistics.median(ratios) if ratios else float("nan"),
                median_backend_cpu_ms=ms(_median_or_none([r.backend_cpu_seconds for r in mine])),
                median_backend_cpu_read_ms=ms(
                    _median_or_none([r.backend_cpu_read_seconds for r in mine])
                ),
                median_qemu_cpu_read_ms=1000
                * (statistics.median([r.qemu_cpu_read_seconds for r in mine]) if mine else 0.0),
            )
        )
    return summaries


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _ms_s(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:,.1f}"


def limit_note(max_bytes: int | None, period: int | None) -> str:
    """The line under the tables that says which rate limit the back-ends ran with."""
    if max_bytes is None and period is None:
        return "No rate limit."
    words = []
    if max_bytes is not None:
        words.append(f"--max-bytes {max_bytes}")
    if period is not None:
        words.append(f"--period {period}")
    return f"Every vhost-user back-end ran with {' '.join(words)}; the built-in device without."


def markdown(runs: Sequence[Run], summaries: Sequence[Summary]) -> str:
    """Two Markdown tables: one row per back-end, then one row per boot."""
    lines = [
        "| backend | median B/s | vs built-in, median | vs built-in, per round | B/s per round "
        "| daemon CPU ms, boot+read | daemon CPU ms, read | QEMU CPU ms, read |",
        "|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.backend} | {s.median_rate:,.0f} | {s.median_ratio:.2f} "
            f"| {', '.join(f'{r:.2f}' for r in s.ratios)} "
            f"| {', '.join(f'{r:,.0f}' for r in s.rates)} "
            f"| {_ms(s.median_backend_cpu_ms)} | {_ms(s.median_backend_cpu_read_ms)} "
            f"| {_ms(s.median_qemu_cpu_read_ms)} |"
        )
    lines += [
        "",
        "| round | order | backend | bytes | guest s | host s | B/s | vs built-in "
        "| daemon CPU ms, boot+read | daemon CPU ms, read | QEMU CPU ms, read | boot s |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {run.round: run for run in runs if run.backend == BUILTIN}
    for run in sorted(runs, key=lambda r: (r.round, r.position)):
        ref = base.get(run.round)
        ratio = (
            f"{run.bytes_per_second / ref.bytes_per_second:.2f}"
            if ref is not None and ref.bytes_per_second > 0
            else "-"
        )
        lines.append(
            f"| {run.round} | {run.position} | {run.backend} | {run.nbytes} "
            f"| {run.guest_seconds:.3f} | {run.host_seconds:.3f} | {run.bytes_per_second:,.0f} "
            f"| {ratio} | {_ms_s(run.backend_cpu_seconds)} "
            f"| {_ms_s(run.backend_cpu_read_seconds)} | {_ms_s(run.qemu_cpu_read_seconds)} "
            f"| {run.boot_seconds:.1f} |"
        )
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Bench:
    """Everything a boot needs; `boot` runs one."""

    qemu: str
    accel: str
    guest: TestGuest
    nbytes: int
    workdir: Path
    source: str = DEFAULT_SOURCE
    memory: str = DEFAULT_MEMORY
    python: str = sys.executable
    log_dir: Path | None = None
    timeout: float | None = None
    #: The rate limit of every vhost-user back-end (--max-bytes, --period), if any.
    max_bytes: int | None = None
    period: int | None = None
    say: Callable[[str], None] = lambda message: None

    def boot(self, backend: Backend, round_: int, position: int) -> Run:
        tag = f"r{round_}-{position}-{backend.name}".replace("/", "_")
        timeout = self.timeout or BOOT_TIMEOUT + self.nbytes / MIN_RATE
        with contextlib.ExitStack() as stack:
            daemon: Rngd | None = None
            if backend.program is not None:
                options = RngdOptions(
                    self.workdir / f"{tag}.sock",
                    1,
                    max_bytes=self.max_bytes,
                    period=self.period,
                    extra=["-f", self.source],
                )
                daemon = Rngd(
                    options,
                    python=self.python,
                    program=None if backend.this_rngd else backend.program,
                    log_path=self.log_dir / f"{tag}.log" if self.log_dir else None,
                    announce=lambda c: self.say(f"+ {c}"),
                )
                stack.callback(daemon.stop)
                daemon.wait_listening()
            cmd = qemu_command(
                self.qemu,
                accel=self.accel,
                kernel=self.guest.kernel,
                initrd=self.guest.initrd,
                append=self.guest.append(bytes_to_read=self.nbytes, hash_bytes=False),
                sockets=daemon.sockets if daemon is not None else (),
                builtin_rng=self.source if backend.builtin else None,
                memory=self.memory,
                name=tag,
                extra=["-no-reboot"],
            )
            self.say(f"+ {shlex.join(cmd)}")

            # CPU times when the read starts and ends, sampled in the console reader thread
            # as the marker lines arrive.
            marks: dict[str, tuple[float | None, float]] = {}
            holder: list[QemuGuest] = []

            def sample() -> tuple[float | None, float]:
                ours = cpu_seconds(daemon.proc.pid) if daemon is not None else None
                return ours, cpu_seconds(holder[0].proc.pid)

            def on_line(line: str) -> None:
                report = parse_report(line)
                if report is None or not holder:
                    return
                with contextlib.suppress(OSError):  # QEMU gone: no mark, reported below
                    if report.kind == "RNGTEST-START":
                        marks["start"] = sample()
                    elif report.kind == "RNGTEST":
                        marks["end"] = sample()

            started_cpu = cpu_seconds(daemon.proc.pid) if daemon is not None else None
            vm = QemuGuest(
                cmd,
                name=tag,
                log_path=self.log_dir / f"{tag}.console.log" if self.log_dir else None,
                echo=on_line,
            )
            holder.append(vm)
            stack.enter_context(vm)
            report = vm.wait_report(timeout=timeout)
            if report is None:
                raise QemuError(f"{tag}: QEMU exited without a report:\n{vm.output[-2000:]}")
            if not report.ok:
                raise QemuError(f"{tag}: the guest reported a failure: {dict(report.fields)}")
            if not report.current.startswith("virtio_rng"):
                raise QemuError(f"{tag}: the guest's hwrng is {report.current!r}, not virtio")
            if report.nbytes != self.nbytes:
                raise QemuError(f"{tag}: the guest read {report.nbytes} B, not {self.nbytes}")
            code = vm.wait(30)
            if code != 0:
                raise QemuError(f"{tag}: QEMU exited with {code}:\n{vm.output[-2000:]}")
            backend_cpu: float | None = None
            if daemon is not None:
                if daemon.proc.poll() is not None:
                    raise QemuError(f"{tag}: the back-end died:\n{daemon.log()[-2000:]}")
                assert started_cpu is not None
                backend_cpu = cpu_seconds(daemon.proc.pid) - started_cpu
                status = daemon.stop()
                if status not in (0, -signal.SIGTERM):
                    raise QemuError(
                        f"{tag}: the back-end exited with {status}:\n{daemon.log()[-2000:]}"
                    )
            if "start" not in marks or "end" not in marks:
                raise QemuError(f"{tag}: missed the read's console markers")
            (ours0, qemu0), (ours1, qemu1) = marks["start"], marks["end"]
            return Run(
                round=round_,
                position=position,
                backend=backend.name,
                nbytes=report.nbytes,
                guest_seconds=report.seconds,
                host_seconds=vm.first_time("RNGTEST ") - vm.first_time("RNGTEST-START"),
                boot_seconds=vm.first_time("RNGTEST-START") - vm.started,
                current=report.current,
                backend_cpu_seconds=backend_cpu,
                backend_cpu_read_seconds=(
                    ours1 - ours0 if ours0 is not None and ours1 is not None else None
                ),
                qemu_cpu_read_seconds=qemu1 - qemu0,
            )


def rotated(backends: Sequence[Backend], round_: int) -> list[Backend]:
    """The order of the boots in a round (1-based): shifted by one place each round."""
    shift = (round_ - 1) % len(backends)
    return [*backends[shift:], *backends[:shift]]


def run_rounds(
    bench: Bench, backends: Sequence[Backend], rounds: int
) -> tuple[list[Run], list[str]]:
    """Every boot of every round: the runs that read their bytes, and one line per boot that
    failed (a back-end that hung or died costs its boot, not the comparison)."""
    runs = []
    failures = []
    for round_ in range(1, rounds + 1):
        for position, backend in enumerate(rotated(backends, round_), start=1):
            try:
                run = bench.boot(backend, round_, position)
            except QemuError as exc:
                first_line = str(exc).splitlines()[0]
                failures.append(f"round {round_} {backend.name}: {first_line}")
                bench.say(f"round {round_}/{rounds} {backend.name}: failed: {exc}")
                continue
            runs.append(run)
            read_cpu = (
                f", daemon CPU {_ms_s(run.backend_cpu_seconds)} ms "
                f"({_ms_s(run.backend_cpu_read_seconds)} ms in the read)"
                if run.backend_cpu_seconds is not None
                else ""
            )
            bench.say(
                f"round {round_}/{rounds} {backend.name}: {run.bytes_per_second:,.0f} B/s "
                f"({run.nbytes} B in {run.guest_seconds:.3f} s){read_cpu}"
            )
    return runs, failures


def against_backend(spec: str, taken: set[str]) -> Backend:
    """A back-end from an `--against` value: a program and its first arguments."""
    words = shlex.split(spec)
    if not words:
        raise QemuError("--against needs a program")
    path = shutil.which(words[0])
    if path is None:
        raise QemuError(f"--against: {words[0]} not found or not executable")
    name = base = Path(words[0]).name
    count = 1
    while name in taken:
        count += 1
        name = f"{base}#{count}"
    taken.add(name)
    return Backend(name, (os.path.abspath(path), *words[1:]))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rngd-qemu compare",
        description="Compare a real guest's /dev/hwrng throughput through rngd, QEMU's built-in "
        "virtio-rng (rng-random on the same source) and, with --against, other vhost-user "
        "back-ends. Each round boots the test guest once per back-end, in an order that "
        "rotates each round; the guest times its read of --bytes bytes. Prints Markdown tables "
        "on stdout, progress on stderr.",
    )
    parser.add_argument(
        "--bytes", type=int, default=DEFAULT_BYTES, help=f"bytes to read (default {DEFAULT_BYTES})"
    )
    parser.add_argument(
        "--rounds", type=int, default=DEFAULT_ROUNDS, help=f"default {DEFAULT_ROUNDS}"
    )
    parser.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="PROGRAM",
        help="another back-end with vhost-device-rng's command line (--socket-path P "
        "--socket-count 1 -f FILE are appended), e.g. a vhost-device-rng binary; a string with "
        "arguments is split like a shell would; repeatable",
    )
    parser.add_argument(
        "--source",
        default=DEFAULT_SOURCE,
        help=f"entropy source of all (default {DEFAULT_SOURCE})",
    )
    parser.add_argument(
        "-m",
        "--max-bytes",
        type=int,
        metavar="N",
        help="run rngd and every --against back-end with this rate limit (bytes per period; "
        "vhost-device-rng's -m/--max-bytes); QEMU's built-in device stays unlimited",
    )
    parser.add_argument(
        "-p",
        "--period",
        type=int,
        metavar="MS",
        help=f"the rate limit's period in ms (1..{MAX_PERIOD_MS}), for the same back-ends",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    parser.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    parser.add_argument("--qemu", help=f"QEMU binary (default {QEMU_BINARY} or $RNGD_QEMU)")
    parser.add_argument("--memory", default=DEFAULT_MEMORY, help="guest RAM (default 256M)")
    parser.add_argument("--python", default=sys.executable, help="Python that runs rngd")
    parser.add_argument("--log-dir", type=Path, help="keep every console and back-end log here")
    parser.add_argument(
        "--timeout", type=float, help="seconds one boot may take (default: 120 + bytes / 20000)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def say(message: str) -> None:
        print(f"rngd-qemu compare: {message}", file=sys.stderr, flush=True)

    if args.bytes < 1 or args.rounds < 1:
        say("error: --bytes and --rounds must be at least 1")
        return 2
    if not os.access(args.source, os.R_OK):
        say(f"error: cannot read {args.source}")
        return 2
    if args.max_bytes is not None and args.max_bytes < 1:
        say("error: --max-bytes must be at least 1")
        return 2
    if args.period is not None and not 1 <= args.period <= MAX_PERIOD_MS:
        say(f"error: --period must be within 1..{MAX_PERIOD_MS} ms")
        return 2
    backends = [
        Backend(BUILTIN, None),
        Backend(RNGD, (args.python, "-m", "rngd"), this_rngd=True),
    ]
    try:
        taken = {b.name for b in backends}
        backends += [against_backend(spec, taken) for spec in args.against]
        qemu = find_qemu(args.qemu)
    except QemuError as exc:
        say(f"error: {exc}")
        return 2
    try:
        guest = build_test_guest()
    except GuestBuildError as exc:
        say(f"error: cannot build the test guest: {exc}")
        return 1
    accel = choose_accel(args.accel, qemu, guest, log=say)
    version = qemu_version(qemu)
    say(f"{version}, accelerator {accel}; {args.rounds} round(s) of {args.bytes} B each")
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    load_before = os.getloadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="rngd-cmp-") as tmp:
            bench = Bench(
                qemu=qemu,
                accel=accel,
                guest=guest,
                nbytes=args.bytes,
                workdir=Path(tmp),
                source=args.source,
                memory=args.memory,
                python=args.python,
                log_dir=args.log_dir,
                timeout=args.timeout,
                max_bytes=args.max_bytes,
                period=args.period,
                say=say,
            )
            started = time.monotonic()
            runs, failures = run_rounds(bench, backends, args.rounds)
            elapsed = time.monotonic() - started
    except _Stop as stop:
        say(f"{stop}: stopped")
        return 130
    except QemuError as exc:
        say(f"error: {exc}")
        return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

    summaries = summarize(runs, backends)
    sys.stdout.write(markdown(runs, summaries))
    sys.stdout.write(f"\n{limit_note(args.max_bytes, args.period)}\n")
    if failures:
        sys.stdout.write("\nBoots that failed (left out above):\n\n")
        sys.stdout.write("".join(f"- {line}\n" for line in failures))
    sys.stdout.flush()
    say(f"{len(runs)} boots in {elapsed:.0f} s")
    if args.json is not None:
        result = {
            "config": {
                "bytes": args.bytes,
                "rounds": args.rounds,
                "source": args.source,
                "qemu": version,
                "accel": accel,
                "memory": args.memory,
                "max_bytes": args.max_bytes,
                "period": args.period,
                "kernel_release": guest.kernel_release,
                "cpus": os.cpu_count(),
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
                "backends": {
                    b.name: list(b.program) if b.program is not None else None for b in backends
                },
            },
            "summary": [dataclasses.asdict(s) for s in summaries],
            "runs": [
                {**dataclasses.asdict(run), "bytes_per_second": run.bytes_per_second}
                for run in runs
            ],
            "failures": failures,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        say(f"wrote {args.json}")
    return 1 if failures else 0
