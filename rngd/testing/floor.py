"""The least Python can do to serve one 64-byte virtio-rng request: a floor to count against.

`scripts/bench --instructions` runs this under callgrind as it runs the daemons, at two
lengths, and reports the difference per iteration beside theirs. Each iteration makes the
request path's system calls and little else:

- an epoll wait (with a timeout of 0, so that only the loop itself is measured),
- two avail-ring reads and two used-ring stores through memoryviews on a shared mapping,
- ``os.readv`` of 64 bytes from the source into guest memory,
- an eventfd write (the interrupt).

Run it by path, ``python -P rngd/testing/floor.py N [SOURCE]``, not with ``-m``: the package's
imports (trio among them) would only slow the runs under valgrind. It imports nothing of
rngd's.
"""

from __future__ import annotations

import mmap
import os
import select
import sys


def serve(iterations: int, source: str = "/dev/urandom") -> int:
    """Serve ``iterations`` requests of a pretend ring; return the bytes read."""
    memory = mmap.mmap(-1, 1 << 16)
    view = memoryview(memory)
    avail = view[0:4096].cast("H")
    buffer = view[4096 : 4096 + 64]
    used = view[8192 : 8192 + 4096].cast("I")
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    epoll = select.epoll()
    one = (1).to_bytes(8, "little")
    total = last = 0
    try:
        epoll.register(kick, select.EPOLLIN | select.EPOLLET)
        for _ in range(iterations):
            for _fd, _events in epoll.poll(0):
                pass
            idx = avail[1]
            head = avail[2 + (last & 3)]
            n = os.readv(fd, [buffer])
            used[2] = head
            used[3] = n
            avail[1] = (idx + 1) & 0xFFFF
            os.write(call, one)
            total += n
            last += 1
    finally:
        epoll.close()
        for descriptor in (fd, kick, call):
            os.close(descriptor)
        for v in (avail, buffer, used):
            v.release()
        view.release()
        memory.close()
    return total


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print("usage: floor.py ITERATIONS [SOURCE]", file=sys.stderr)
        return 2
    iterations = int(argv[0])
    got = serve(iterations, *argv[1:])
    if got != 64 * iterations:
        print(f"floor.py: read {got} bytes in {iterations} iterations", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
