"""The eventfds a VMM gives a vring: checking one is safe to use, and signalling the call and
err fds from the ring's thread while the protocol task may swap them."""

from __future__ import annotations

import io
import os
from collections.abc import Callable

#: What a signal writes: an eventfd counter is 8 bytes, and each signal adds 1.
SIGNAL = (1).to_bytes(8, "little")


class EventfdError(Exception):
    """An eventfd the VMM gave us failed (closed under us, hung up, not an eventfd)."""


class VringSignal:
    """A vring's call (or err) eventfd, signalled by the worker thread and replaced by the
    protocol task (QEMU sends SET_VRING_CALL several times while a ring runs).

    The thread writes to one fd number for the signal's whole life, `_fd`, and a replacement
    is `os.dup2` onto that number, which the kernel does atomically: a signal goes to the old
    eventfd or the new one, never to a number that was closed and handed to something else.
    So the signal path takes no lock, and a VMM that makes its eventfd blocking can stall at
    most the thread, never the protocol task that swaps it.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        #: The number the thread writes to (None until the VMM gives one).
        self._fd: int | None = None
        #: `write` of a file object on `_fd` (None with it), read by the thread on every
        #: signal: it only ever changes from None to a function while a ring runs. It costs
        #: less than `os.write` and answers EAGAIN (a saturated counter) with None, where
        #: `os.write` raises.
        self.write: Callable[[bytes], int | None] | None = None

    def replace(self, fd: int | None) -> None:
        """Signal `fd` from now on (None: nothing). Takes ownership of `fd`: it is closed here,
        its description kept at `self._fd`, which the previous one's number goes on naming."""
        if self._fd is None:
            if fd is not None:
                self._fd = fd
                self.write = io.FileIO(fd, "w", closefd=False).write
            return
        if fd is None:
            # Signal nothing: a fresh eventfd of our own takes the number; nobody reads it,
            # and once its counter saturates a write just fails with EAGAIN. (Out of fds, the
            # old eventfd goes on being signalled: a spurious interrupt is allowed, a write
            # to a recycled number is not.)
            try:
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            except OSError:
                return
        try:
            os.dup2(fd, self._fd, inheritable=False)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the fd (once no thread can signal it: every ring stopped)."""
        if self._fd is not None:
            self.write = None
            os.close(self._fd)
            self._fd = None

    def signal(self) -> None:
        write = self.write
        if write is None:
            return
        try:
            write(SIGNAL)  # None if the counter is saturated: a wake-up is pending anyway
        except OSError as exc:
            raise self.failed(exc) from exc

    def failed(self, exc: OSError) -> EventfdError:
        """What a failed write of a signal means (for the ring path, which inlines `signal`)."""
        return EventfdError(f"signalling the {self.what} fd failed: {exc.strerror}")


def check_eventfd(fd: int, what: str) -> None:
    """Refuse (EventfdError) a kick/call/err fd that is not a plain eventfd, and make an
    accepted one non-blocking.

    Nothing else is safe to poll, read and write from the ring path: a pipe or a file can
    block, stay readable for ever (a pipe at end of file) or fail later; a directory cannot be
    written at all. fstat cannot tell an eventfd from other anonymous inodes; its /proc link
    can. A semaphore-mode eventfd gives back one count per read, so a large count would keep
    the ring's thread waking for nothing. O_NONBLOCK is set on the file description we share
    with the VMM (QEMU's are non-blocking already): a saturated counter then costs EAGAIN, not
    a thread or the event loop stuck in write().
    """
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise EventfdError(f"{what} fd: cannot tell what it is: {exc.strerror}") from exc
    if kind != "anon_inode:[eventfd]":
        raise EventfdError(f"{what} fd is not an eventfd ({kind})")
    try:
        with open(f"/proc/self/fdinfo/{fd}") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key == "eventfd-semaphore" and value.strip() == "1":
                    raise EventfdError(f"{what} fd is a semaphore-mode eventfd")
        os.set_blocking(fd, False)
    except OSError as exc:
        raise EventfdError(f"{what} fd: {exc.strerror}") from exc
