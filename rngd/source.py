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
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import stat
from collections.abc import Sequence

from rngd.threads import run_owned_thread

log = logging.getLogger(__name__)

#: Major number of the kernel's memory character devices (mem, null, zero, random, urandom...).
_MEM_MAJOR = 1
#: What `read` answers when nothing can be read without waiting.
WOULD_BLOCK = -1
#: Bytes the device pump reads at a time.
_PUMP_CHUNK = 4096


class SourceError(Exception):
    """The source cannot be opened or read."""


class GuestMemoryFault(Exception):
    """A read into guest memory failed with EFAULT: the VMM unmapped or shrank it under us."""


class EntropySource:
    def __init__(self, path: str, *, eof_retry: float = 1.0) -> None:
        self.path = path
        self.eof_retry = eof_retry
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"cannot open entropy source {path}: {exc.strerror}") from exc
        st = os.fstat(fd)
        mode = st.st_mode
        memory_device = stat.S_ISCHR(mode) and os.major(st.st_rdev) == _MEM_MAJOR
        self._device: int | None = None
        self._pipe_in: int | None = None
        if stat.S_ISREG(mode) or memory_device or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            pass  # read as it is: never waits, or waits in poll() on the fd
        elif stat.S_ISCHR(mode):
            # The pump polls before it reads (stoppable where the device can poll) and then
            # blocks in read(), not spin on EAGAIN where it cannot.
            os.set_blocking(fd, True)
            self._device = fd
            fd, self._pipe_in = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        else:
            os.close(fd)
            raise SourceError(f"entropy source {path} is not a file, FIFO or character device")
        #: What the vrings read (and poll, while it is empty).
        self.fd = fd
        #: The fd the ring path may `os.readv` itself, skipping `read` (errors, end of file
        #: and WOULD_BLOCK then go through `read`); None if every read must go through it.
        self.direct_fd: int | None = fd
        self.eof_logged = False
        self._closed = False

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
        """Feed the pipe from the device until cancelled (a device source's pump task; other
        kinds return at once). The thread is joined before this returns."""
        if self._device is None:
            return
        await run_owned_thread(self._pump, name=f"rngd source {self.path}")

    def _pump(self, stop: int) -> None:
        device, pipe_in = self._device, self._pipe_in
        assert device is not None and pipe_in is not None
        readable, writable = select.poll(), select.poll()
        readable.register(device, select.POLLIN)
        readable.register(stop, select.POLLIN)
        writable.register(pipe_in, select.POLLOUT)
        writable.register(stop, select.POLLIN)
        # A big pipe lets the device run ahead of bursts of requests.
        # (Capped by /proc/sys/fs/pipe-max-size; the default size works too.)
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe_in, fcntl.F_SETPIPE_SZ, 1 << 20)
        idle = self.eof_retry * 1000
        while True:
            if any(fd == stop for fd, _ in readable.poll()):
                return
            try:
                data = os.read(device, _PUMP_CHUNK)
            except OSError as exc:
                log.error("reading %s: %s", self.path, exc.strerror)
                data = b""
            if not data:
                # End of file or an error: wait, stoppably, rather than spin on it.
                if wait_readable(stop, idle):
                    return
                continue
            while data:
                if any(fd == stop for fd, _ in writable.poll()):
                    return
                try:
                    data = data[os.write(pipe_in, data) :]
                except BlockingIOError:
                    continue

    def close(self) -> None:
        """Close the source (after every reader and the pump task have stopped)."""
        if not self._closed:
            self._closed = True
            for fd in (self.fd, self._device, self._pipe_in):
                if fd is not None:
                    os.close(fd)


def wait_readable(fd: int, timeout_ms: float) -> bool:
    """Block (in a worker thread) up to `timeout_ms` for `fd` to become readable."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout_ms))
