"""The entropy source: the file named by --filename, read without blocking the event loop.

How a read can wait depends on what the file is, so the source picks a strategy when opened:

* regular files and the kernel's memory devices (/dev/urandom, /dev/random, /dev/zero): reads
  never wait, so they go straight into guest memory with `os.readv`.
* FIFOs and sockets: opened non-blocking; an empty pipe parks the reading task on
  `wait_readable`.
* other character devices (/dev/hwrng and friends) may not support poll(), so a non-blocking
  read would spin. They are read in a worker thread into a bounce buffer that is then copied into
  guest memory; the thread never touches guest memory, so a stop or disconnect can unmap it
  while a slow read is still running.

At end of file (a regular file read to its end, a FIFO whose writer went away) requests wait and
the source is retried every `eof_retry` seconds: data appended later is served, and the guest is
not made to spin on empty completions.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence

import trio

log = logging.getLogger(__name__)

#: Major number of the kernel's memory character devices (mem, null, zero, random, urandom...).
_MEM_MAJOR = 1


class SourceError(Exception):
    """The source cannot be opened or read."""


class EntropySource:
    def __init__(self, path: str, *, eof_retry: float = 1.0) -> None:
        self.path = path
        self.eof_retry = eof_retry
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"cannot open entropy source {path}: {exc.strerror}") from exc
        self._fd = fd
        st = os.fstat(fd)
        mode = st.st_mode
        memory_device = stat.S_ISCHR(mode) and os.major(st.st_rdev) == _MEM_MAJOR
        self.kind: str
        if stat.S_ISREG(mode) or memory_device:
            self.kind = "file"
        elif stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            self.kind = "pipe"
        elif stat.S_ISCHR(mode):
            self.kind = "device"
            # The worker thread must block in read(), not spin on EAGAIN.
            os.set_blocking(fd, True)
        else:
            os.close(fd)
            raise SourceError(f"entropy source {path} is not a file, FIFO or character device")
        # One reader at a time: reads from a shared source must not interleave, or the bytes
        # one guest gets would not be the source's bytes in order.
        self._lock = trio.Lock()
        self._eof_logged = False
        self._closed = False

    def try_read(self, buffers: Sequence[memoryview]) -> int | None:
        """Read now, if that cannot wait: the count (>= 1), or None to await `read_into`.

        The fast path of the common case (/dev/urandom, a file with data left): no lock, no
        trip through the scheduler. A read that would wait (an empty FIFO, a device, end of
        file, another reader already waiting) is left to `read_into`, which keeps the order.
        """
        if self.kind == "device" or self._lock.locked():
            return None
        try:
            count = os.readv(self._fd, buffers)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise SourceError(f"reading {self.path}: {exc.strerror}") from exc
        if count == 0:
            return None
        self._eof_logged = False
        return count

    async def read_into(self, buffers: Sequence[memoryview]) -> int:
        """Fill `buffers` in order with up to their total length; return how many bytes.

        Returns at least one byte: it waits (parking only the calling task) while the source
        has nothing to give. Buffers of no length at all get 0 at once: a read of nothing
        returns 0, which must not be taken for end of file (that would wait forever).
        """
        if not any(len(b) for b in buffers):
            await trio.lowlevel.checkpoint()
            return 0
        async with self._lock:
            while True:
                count = await self._read_once(buffers)
                if count > 0:
                    self._eof_logged = False
                    return count
                if not self._eof_logged:
                    log.warning(
                        "entropy source %s is at end of file; requests wait for more data",
                        self.path,
                    )
                    self._eof_logged = True
                await trio.sleep(self.eof_retry)

    async def _read_once(self, buffers: Sequence[memoryview]) -> int:
        if self.kind == "device":
            return await self._read_in_thread(buffers)
        # Cancellation may strike only before the read: once bytes are in guest memory the
        # caller must get to complete the request, or they would be lost from the source.
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                count = os.readv(self._fd, buffers)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._fd)
                continue
            except InterruptedError:
                continue
            except OSError as exc:
                raise SourceError(f"reading {self.path}: {exc.strerror}") from exc
            await trio.lowlevel.cancel_shielded_checkpoint()
            return count

    async def _read_in_thread(self, buffers: Sequence[memoryview]) -> int:
        total = sum(len(b) for b in buffers)
        fd = self._fd
        try:
            data = await trio.to_thread.run_sync(os.read, fd, total, abandon_on_cancel=True)
        except OSError as exc:
            raise SourceError(f"reading {self.path}: {exc.strerror}") from exc
        offset = 0
        for buffer in buffers:
            if offset >= len(data):
                break
            chunk = data[offset : offset + len(buffer)]
            buffer[: len(chunk)] = chunk
            offset += len(chunk)
        return len(data)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)
