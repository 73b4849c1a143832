"""Worker threads owned by trio tasks.

A vring's requests and a device source's reads are served in threads of their own, blocked in
poll() rather than woken by trio's run loop (a trio wake-up costs several times the work of a
whole request). Each such thread belongs to one trio task: the task starts it, tells it to stop
when the task is cancelled, and returns only once the thread has returned, so that nothing the
thread uses (guest memory, fds) is freed under it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import outcome
import trio

T = TypeVar("T")


class ThreadStartError(Exception):
    """The host is out of what a worker thread needs (fds, at its limit)."""


async def run_owned_thread(
    fn: Callable[[int], T],
    *,
    name: str,
    on_stop: Callable[[], None] | None = None,
    ready: Callable[[], None] | None = None,
) -> T:
    """Run ``fn(stop_fd)`` in a new worker thread and return (or raise) what it does.

    When the calling task is cancelled, `on_stop` is called and the eventfd `stop_fd` becomes
    readable: `fn` must keep it in its poll set and return soon after. The thread may call
    back into this task with `trio.from_thread.run` (e.g. to park on the bandwidth budget);
    cancellation reaches such a call as `trio.Cancelled`.

    `ready` is called once every fd the thread needs is open, just before it starts: a
    caller that reports the start (a reply to the VMM) reports it complete.
    """
    try:
        stop = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    except OSError as exc:  # EMFILE: the daemon is at its fd limit
        raise ThreadStartError(f"cannot make a stop eventfd: {exc.strerror}") from exc
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_when_cancelled, stop, on_stop)
            if ready is not None:
                ready()

            async def in_thread() -> T:
                return await trio.to_thread.run_sync(
                    fn,
                    stop,
                    thread_name=name,
                    # Long-lived threads must not take tokens from trio's default limiter.
                    limiter=trio.CapacityLimiter(1),
                )

            # Captured rather than raised here: a nursery would wrap it in an ExceptionGroup.
            result = await outcome.acapture(in_thread)
            nursery.cancel_scope.cancel()
        return result.unwrap()
    finally:
        os.close(stop)


async def _stop_when_cancelled(stop: int, on_stop: Callable[[], None] | None) -> None:
    try:
        await trio.sleep_forever()
    finally:
        if on_stop is not None:
            on_stop()
        os.eventfd_write(stop, 1)
