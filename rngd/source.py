"""The entropy source: the file named by --filename, read by the vrings' worker threads.

Bytes enter guest memory only through `os.readv` straight from a file descriptor into the
guest's buffers, so memory a VMM took away after mapping it costs EFAULT (an incident of that
guest), never SIGBUS (the whole daemon). How that fd behaves depends on what the file is:

* regular files and the kernel's memory devices (/dev/urandom, /dev/random, /dev/zero): reads
  never wait.
* FIFOs and sockets: opened non-blocking; an empty pipe makes the reader poll it.
* other character devices (/dev/hwrng and friends) may not support poll(), so a non-blocking
  read would spin and a blocking one could not be stopped. A pump thread of the source's own
  reads the device and writes into a pipe, and the vrings read that pipe like a FIFO.

At end of file (a regular file read to its end, a FIFO whose writer went away) requests wait and
the source is retried every `eof_retry` seconds: data appended later is served, and the guest is
not made to spin on empty completions.

Concurrent readers need no lock: the kernel reads a pipe, or a regular file at the shared
offset, atomically per call, so each read is a contiguous run of the source's bytes.

A source under health tests (`rngd.health`, `--health-tests`) is always read by the pump, of
whatever kind: the pump is the one reader of the source, so the tests see the stream as one,
in order, whatever number of guests read it. It tests whole windows before any of their bytes
enter the pipe, and writes only what passed; when the source is declared failed it empties the
pipe and writes nothing until the start-up test passes again, so the vrings simply wait on an
empty pipe as on a slow device. The vrings' read path is the same `read` either way, and a
source that is not tested is read exactly as before.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import stat
from collections.abc import Callable, Sequence

import trio

from rngd.health import (
    FAIL_COUNT,
    FAIL_SPAN,
    WINDOW,
    Cutoffs,
    HealthMode,
    HealthMonitor,
    State,
    Verdict,
    wants_tests,
)
from rngd.threads import run_owned_thread

log = logging.getLogger(__name__)

#: Major number of the kernel's memory character devices (mem, null, zero, random, urandom...).
_MEM_MAJOR = 1
#: What `read` answers when nothing can be read without waiting.
WOULD_BLOCK = -1
#: Bytes the device pump reads at a time.
_PUMP_CHUNK = 4096
#: Bytes the pump reads at a time from a tested source that is not a device (a file, a FIFO)
#: while it passes: tested whole and written into the pipe with one call, so a fast source
#: wakes the rings once per 256 KiB, and the tests' fixed cost per call is spread over as
#: much. A quarter of the pipe: reads of a whole pipe (1 MiB) left the pump waiting for the
#: rings to empty it before it could write again.
_TESTED_CHUNK = 1 << 18
#: Bytes read at a time from a tested source that is not passing (its start-up test, its
#: retries while failed): what a failing source is read at most per retry.
_RETRY_CHUNK = 1 << 16


class SourceError(Exception):
    """The source cannot be opened or read."""


class GuestMemoryFault(Exception):
    """A read into guest memory failed with EFAULT: the VMM unmapped or shrank it under us."""


class EntropySource:
    def __init__(
        self,
        path: str,
        *,
        eof_retry: float = 1.0,
        health: HealthMode = HealthMode.OFF,
        cutoffs: Cutoffs | None = None,
    ) -> None:
        self.path = path
        self.eof_retry = eof_retry
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"cannot open entropy source {path}: {exc.strerror}") from exc
        st = os.fstat(fd)
        mode = st.st_mode
        character = stat.S_ISCHR(mode)
        memory_device = character and os.major(st.st_rdev) == _MEM_MAJOR
        device_id = (os.major(st.st_rdev), os.minor(st.st_rdev)) if character else None
        #: The health tests' state; None when the source is not tested.
        self.monitor = HealthMonitor(cutoffs) if wants_tests(health, device_id) else None
        #: Told (in trio) when the health state changes.
        self.on_health_change: Callable[[], None] | None = None
        #: What the pump reads (None: no pump), and whether it is a device read blocking.
        self._input: int | None = None
        self._device = False
        self._pipe_in: int | None = None
        if stat.S_ISREG(mode) or memory_device or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            # Read as it is (never waits, or waits in poll() on the fd), unless tested.
            if self.monitor is not None:
                self._input = fd
        elif character:
            # The pump polls before it reads (stoppable where the device can poll) and then
            # blocks in read(), not spin on EAGAIN where it cannot.
            os.set_blocking(fd, True)
            self._input = fd
            self._device = True
        else:
            os.close(fd)
            raise SourceError(f"entropy source {path} is not a file, FIFO or character device")
        if self._input is not None:
            fd, self._pipe_in = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        #: What the vrings read (and poll, while it is empty).
        self.fd = fd
        #: The fd the ring path may `os.readv` itself, skipping `read` (errors, end of file
        #: and WOULD_BLOCK then go through `read`); None if every read must go through it.
        self.direct_fd: int | None = fd
        self.eof_logged = False
        self._closed = False

    @property
    def health_failures(self) -> int:
        """Health failures so far (0 when the source is not tested)."""
        return 0 if self.monitor is None else self.monitor.failures

    def health_summary(self) -> str:
        """The health tests' state, as the SIGUSR1 report gives it."""
        monitor = self.monitor
        if monitor is None:
            return "health tests off"
        cutoffs = monitor.tests.cutoffs
        return (
            f"health tests on (RCT cutoff {cutoffs.rct}, APT cutoff {cutoffs.apt}/{WINDOW}): "
            f"state={monitor.state.name.lower()} windows={monitor.windows} "
            f"health_failures={monitor.failures} declared_failed={monitor.failed_count}"
        )

    def failed(self) -> bool:
        """True while the source is declared failed (or has not passed its start-up test
        after a failure): nothing of it is served."""
        monitor = self.monitor
        return monitor is not None and monitor.failed_count > 0 and monitor.state is not State.OK

    def read(self, buffers: Sequence[memoryview]) -> int:
        """One non-blocking read into `buffers`: the count, 0 at end of file, or WOULD_BLOCK.

        Safe to call from any thread. Raises GuestMemoryFault when a buffer is not there any
        more, SourceError when the source itself fails.
        """
        try:
            count = os.readv(self.fd, buffers)
        except (BlockingIOError, InterruptedError):
            return WOULD_BLOCK
        except OSError as exc:
            if exc.errno == errno.EFAULT:
                raise GuestMemoryFault("guest memory vanished under a request") from exc
            raise SourceError(f"reading {self.path}: {exc.strerror}") from exc
        if count:
            self.eof_logged = False
        elif not self.eof_logged:
            self.eof_logged = True
            log.warning(
                "entropy source %s is at end of file; requests wait for more data", self.path
            )
        return count

    async def run(self) -> None:
        """Feed the pipe from the source until cancelled (the pump task of a device source or
        of a tested one; other kinds return at once). The thread is joined before this
        returns."""
        if self._input is None:
            return
        await run_owned_thread(self._pump, name=f"rngd source {self.path}")

    def _pump(self, stop: int) -> None:
        source, pipe_in = self._input, self._pipe_in
        assert source is not None and pipe_in is not None
        readable, writable = select.poll(), select.poll()
        readable.register(source, select.POLLIN)
        readable.register(stop, select.POLLIN)
        writable.register(pipe_in, select.POLLOUT)
        writable.register(stop, select.POLLIN)
        # A big pipe lets the device run ahead of bursts of requests.
        # (Capped by /proc/sys/fs/pipe-max-size; the default size works too.)
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe_in, fcntl.F_SETPIPE_SZ, 1 << 20)
        idle = self.eof_retry * 1000
        monitor = self.monitor
        chunk = _PUMP_CHUNK if self._device else _TESTED_CHUNK
        #: The start of a window not read whole yet (tested sources).
        partial = b""
        while True:
            if any(fd == stop for fd, _ in readable.poll()):
                return
            size = chunk
            if monitor is not None and monitor.state is not State.OK:
                size = min(chunk, _RETRY_CHUNK)
            try:
                data = os.read(source, size)
            except BlockingIOError:
                continue  # a FIFO another reader emptied first
            except OSError as exc:
                log.error("reading %s: %s", self.path, exc.strerror)
                data = b""
            if not data:
                if not self._device and not self.eof_logged:
                    self.eof_logged = True
                    log.warning(
                        "entropy source %s is at end of file; requests wait for more data",
                        self.path,
                    )
                # End of file or an error: wait, stoppably, rather than spin on it.
                if wait_readable(stop, idle):
                    return
                continue
            self.eof_logged = False
            out: list[bytes | memoryview] = [data]
            back_off = False
            if monitor is not None:
                if partial:
                    data = partial + data
                whole = len(data) - len(data) % WINDOW
                partial = data[whole:]
                if not whole:
                    continue
                verdict = monitor.feed(data if whole == len(data) else data[:whole])
                self._tell(verdict)
                out = verdict.release
                if verdict.back_off:
                    # Failed: what is in the pipe goes too, and the rest of what was read.
                    self._drain()
                    partial = b""
                    back_off = True
            if _write_all(pipe_in, out, writable, stop):
                return
            if back_off and wait_readable(stop, idle):
                return

    def _tell(self, verdict: Verdict) -> None:
        """Log what the health tests found, and tell the daemon when the state changed."""
        monitor = self.monitor
        assert monitor is not None
        retrying = verdict.startup_failed and not verdict.declared_failed
        for failure in verdict.failures:
            if retrying:
                log.debug("entropy source %s: start-up test retry failed: %s", self.path, failure)
            elif not verdict.startup_failed:
                log.warning(
                    "entropy source %s failed a health test: %s; its %d bytes are discarded",
                    self.path,
                    failure,
                    WINDOW,
                )
        if verdict.declared_failed:
            if verdict.startup_failed:
                why = f"failed its start-up test ({verdict.failures[-1]})"
            else:
                why = f"had {FAIL_COUNT} health failures within {FAIL_SPAN} windows"
            log.error(
                "entropy source %s %s: declared failed, serving nothing from it until it "
                "passes the start-up test again (retried every %g s)",
                self.path,
                why,
                self.eof_retry,
            )
        elif verdict.passed_startup:
            if monitor.failed_count:
                log.warning(
                    "entropy source %s passed its start-up test again: serving it", self.path
                )
            else:
                log.info("entropy source %s passed its start-up health test", self.path)
        recovered = verdict.passed_startup and monitor.failed_count
        if (verdict.declared_failed or recovered) and self.on_health_change:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self.on_health_change)

    def _drain(self) -> None:
        """Discard what the pipe holds (the vrings may be reading it too)."""
        while True:
            try:
                if not os.read(self.fd, 1 << 20):
                    return
            except BlockingIOError:
                return

    def close(self) -> None:
        """Close the source (after every reader and the pump task have stopped)."""
        if not self._closed:
            self._closed = True
            for fd in (self.fd, self._input, self._pipe_in):
                if fd is not None:
                    os.close(fd)


def _write_all(
    pipe: int, pieces: list[bytes | memoryview], writable: select.poll, stop: int
) -> bool:
    """Write `pieces` into the non-blocking `pipe`, in order, in as few calls as its room
    allows (one `writev` when it has room for them all). True if `stop` became readable
    first."""
    while pieces:
        if any(fd == stop for fd, _ in writable.poll()):
            return True
        try:
            written = os.writev(pipe, pieces)
        except BlockingIOError:
            continue
        while pieces and len(pieces[0]) <= written:
            written -= len(pieces[0])
            del pieces[0]
        if written:
            pieces[0] = memoryview(pieces[0])[written:]
    return False


def wait_readable(fd: int, timeout_ms: float) -> bool:
    """Block (in a worker thread) up to `timeout_ms` for `fd` to become readable."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout_ms))
