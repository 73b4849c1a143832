"""Start a daemon for a test: in this process (fast) or as a real subprocess (signals, fds)."""

from __future__ import annotations

import errno
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

import rngd
from rngd.config import DaemonConfig

if TYPE_CHECKING:
    from rngd.ring import BusyPoll


class DaemonFailed(AssertionError):
    """The daemon process did not start, did not stop in time, or exited with an error."""


def open_fd_count(pid: int | None = None) -> int:
    """Entries of /proc/PID/fd (this process when ``pid`` is None)."""
    return len(os.listdir(f"/proc/{'self' if pid is None else pid}/fd"))


async def _accepts(path: str) -> bool:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        try:
            await sock.connect(path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                return False
            raise
    return True


@dataclass
class DaemonProcess:
    """A running ``python -m rngd``; see `daemon_process`."""

    process: trio.Process
    socket_paths: list[str]
    log_path: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def fd_count(self) -> int:
        return open_fd_count(self.pid)

    def log(self) -> str:
        """What the daemon wrote to stdout and stderr so far."""
        with open(self.log_path, errors="replace") as f:
            return f.read()

    async def terminate(self, timeout: float = 1.0, signum: int = signal.SIGTERM) -> int:
        """Send ``signum`` and wait for the exit, at most ``timeout`` seconds; return the code."""
        if self.process.returncode is None:
            self.process.send_signal(signum)
        try:
            with trio.fail_after(timeout):
                return await self.process.wait()
        except trio.TooSlowError:
            self.process.kill()
            await self.process.wait()
            raise DaemonFailed(
                f"daemon did not exit within {timeout} s of {signal.Signals(signum).name}\n"
                + self.log()
            ) from None


#: Environment variable: a factor (at least 1) for the tests' hang guards, a daemon's start-up
#: and the deadlines that catch a hang: a Python under user-mode emulation (scripts/test-arm64)
#: is several times slower. It never makes a test accept more than it does without.
TIME_SCALE_ENV = "RNGD_TEST_TIME_SCALE"


def time_scale() -> float:
    """`TIME_SCALE_ENV`'s factor, 1 if unset."""
    return max(1.0, float(os.environ.get(TIME_SCALE_ENV) or "1"))


@asynccontextmanager
async def daemon_process(
    socket_path: str,
    *,
    socket_count: int = 1,
    filename: str | None = None,
    max_bytes: int | None = None,
    period_ms: int | None = None,
    log_level: str | None = "debug",
    extra_args: Sequence[str] = (),
    startup_timeout: float | None = None,
    stop_timeout: float = 1.0,
    check_exit: bool = True,
) -> AsyncIterator[DaemonProcess]:
    """Run ``python -m rngd`` until the block ends, then SIGTERM it.

    Entering returns once every socket ``socket_path0..`` accepts connections (each is probed
    with one connect). Leaving sends SIGTERM unless the process has already exited, and with
    ``check_exit`` fails unless it exits with 0 within ``stop_timeout`` seconds.
    ``startup_timeout`` defaults to 10 s times `time_scale()`.
    """
    if startup_timeout is None:
        startup_timeout = 10.0 * time_scale()
    args = [
        sys.executable,
        "-P",
        "-m",
        "rngd",
        "--socket-path",
        socket_path,
        "-c",
        str(socket_count),
    ]
    if filename is not None:
        args += ["-f", filename]
    if max_bytes is not None:
        args += ["-m", str(max_bytes)]
    if period_ms is not None:
        args += ["-p", str(period_ms)]
    if log_level is not None:
        args += ["--log-level", log_level]
    args += list(extra_args)
    env = dict(os.environ)
    # Run the rngd this process imported, even when it is not the installed one; -P keeps the
    # working directory from shadowing it.
    source_root = os.path.dirname(os.path.dirname(os.path.abspath(rngd.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
    paths = [f"{socket_path}{i}" for i in range(socket_count)]
    # A file, not a pipe: nobody drains a pipe while the test runs, and a full pipe would
    # block the daemon's logging (and with it the whole daemon).
    log_fd, log_path = tempfile.mkstemp(prefix="rngd-daemon-", suffix=".log")
    try:
        process = await trio.lowlevel.open_process(
            args, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, env=env
        )
        os.close(log_fd)
        log_fd = -1
        daemon = DaemonProcess(process, paths, log_path)
        try:
            with trio.fail_after(startup_timeout):
                for path in paths:
                    while not await _accepts(path):
                        if process.poll() is not None:
                            raise DaemonFailed(
                                f"daemon exited with {process.returncode} before listening on "
                                f"{path}\n{daemon.log()}"
                            )
                        await trio.sleep(0.005)
        except trio.TooSlowError:
            raise DaemonFailed(f"daemon not listening after {startup_timeout} s") from None
        try:
            yield daemon
        finally:
            with trio.CancelScope(shield=True):
                code = (
                    process.returncode
                    if process.returncode is not None
                    else await daemon.terminate(stop_timeout)
                )
        if check_exit and code != 0:
            raise DaemonFailed(f"daemon exited with {code}\n{daemon.log()}")
    finally:
        if log_fd >= 0:
            os.close(log_fd)
        os.unlink(log_path)


@asynccontextmanager
async def daemon_in_process(
    socket_path: str | None = None, *, poll: BusyPoll | None = None, **settings: object
) -> AsyncIterator[list[str]]:
    """Serve `rngd.daemon.serve` in this trio run until the block ends; yield socket paths.

    ``settings`` are `DaemonConfig` fields; ``poll``, if given, is the rings' instead of the
    one ``poll_us`` makes. Without ``socket_path`` the sockets go in a fresh temporary
    directory, removed afterwards.
    """
    from rngd.daemon import serve

    with tempfile.TemporaryDirectory(prefix="rngd-test-") as tmp:
        path = os.path.join(tmp, "rng.sock") if socket_path is None else socket_path
        config = DaemonConfig(path, **settings)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            paths: list[str] = await nursery.start(functools.partial(serve, config, poll=poll))
            try:
                yield paths
            finally:
                nursery.cancel_scope.cancel()
