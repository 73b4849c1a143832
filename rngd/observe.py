"""What the daemon tells an operator about its connections: who the peer is, and counters.

The log lines are plain text, one per event, with ``key=value`` fields (journald keeps them
as they are, and ``grep``/``awk`` can take them apart)::

    rng.sock0: VMM connected: pid=4242 uid=107 gid=107 features=0x170000000 (...) ...
    rng.sock0: VMM disconnected (hung up): pid=4242 uid=107 gid=107 uptime=12.3s requests=...
    rng.sock0: serving: pid=4242 uid=107 gid=107 uptime=5.0s requests=...     (on SIGUSR1)

Counting costs the request path a few integer additions per batch: each vring's worker thread
counts into its own `RingCounters` (plain ints, no lock, it is their only writer), the
connection's trio side reads them when asked and adds a ring's into the connection's totals
when the ring stops (`ConnectionCounters`).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import NamedTuple

import trio

_PEERCRED = struct.Struct("3i")


class Peer(NamedTuple):
    """A connected socket's peer, as the kernel saw it at connect time (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"pid={self.pid} uid={self.uid} gid={self.gid}"


def peer_of(sock: socket.socket | trio.socket.SocketType) -> Peer | None:
    """The peer credentials of a Unix socket (stdlib or trio), None if the kernel has none."""
    try:
        data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        return Peer(*_PEERCRED.unpack(data))
    except (OSError, struct.error):
        return None


def describe(peer: Peer | None) -> str:
    return "peer unknown" if peer is None else str(peer)


class RingCounters:
    """What serving a vring came to.

    - ``requests``: requests completed (descriptor chains returned on the used ring);
    - ``bytes``: bytes written into them;
    - ``held_back``: bytes the rate limit made wait: granted only after the ring parked for
      a refill;
    - ``parked``: seconds the ring spent parked waiting for the budget;
    - ``malformed``: requests refused as malformed (descriptor chains completed empty, and,
      for a connection, vhost-user messages refused and rings the guest broke);
    - ``kicks``: wake-ups of the ring's thread by its kick eventfd (the eventfd is watched
      edge-triggered and never read, so kicks between two wake-ups count once);
    - ``interrupts``: signals of the call eventfd;
    - ``polled``: times the ring found the guest's next request while it polled after the
      last (`--poll-us`): posted with no kick, served with no sleep.
    """

    __slots__ = (
        "bytes",
        "held_back",
        "interrupts",
        "kicks",
        "malformed",
        "parked",
        "polled",
        "requests",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.held_back = 0
        self.parked = 0.0
        self.malformed = 0
        self.kicks = 0
        self.interrupts = 0
        self.polled = 0

    def add(self, other: RingCounters) -> None:
        self.requests += other.requests
        self.bytes += other.bytes
        self.held_back += other.held_back
        self.parked += other.parked
        self.malformed += other.malformed
        self.kicks += other.kicks
        self.interrupts += other.interrupts
        self.polled += other.polled

    def __str__(self) -> str:
        return (
            f"requests={self.requests} bytes={self.bytes} held_back={self.held_back} "
            f"parked={self.parked:.3f}s malformed={self.malformed} kicks={self.kicks} "
            f"interrupts={self.interrupts} polled={self.polled}"
        )


class ConnectionCounters(RingCounters):
    """A connection's counters: its stopped rings' added up, its own (malformed messages), and
    its running rings' read live (`total`). Only trio code touches it.

    `health_failures` are the source's (shared by every guest): how many of its windows failed
    a health test since the connection began, read from `source_failures`.
    """

    __slots__ = ("_failures_before", "running", "source_failures")

    def __init__(self, source_failures: Callable[[], int] | None = None) -> None:
        super().__init__()
        self.running: set[RingCounters] = set()
        self.source_failures = source_failures
        self._failures_before = 0 if source_failures is None else source_failures()

    def health_failures(self) -> int:
        if self.source_failures is None:
            return 0
        return self.source_failures() - self._failures_before

    def ring_started(self, ring: RingCounters) -> None:
        self.running.add(ring)

    def ring_stopped(self, ring: RingCounters) -> None:
        """The ring's thread has ended: its counters are final and become the connection's."""
        self.running.discard(ring)
        self.add(ring)

    def total(self) -> RingCounters:
        total = RingCounters()
        total.add(self)
        for ring in list(self.running):
            total.add(ring)
        return total
