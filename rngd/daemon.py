"""The daemon: one listening socket per guest, each serving one VMM connection at a time.

Structure (the design card): a root nursery owns one task per socket (`SocketServer.run`),
which accepts all the time; the connection it serves runs in a child nursery
(`Connection.run`) holding its protocol task and kick-handler tasks. A connection that arrives
while the socket's VMM is still there is closed at once. Cancelling the root nursery
(SIGINT/SIGTERM) unwinds everything; the socket files are removed on the way out (not those
of sockets inherited from systemd, which we did not create).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import grp
import logging
import os
import select
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import trio

from rngd.bandwidth import BandwidthScheduler, Budget
from rngd.config import ConfigError, DaemonConfig
from rngd.connection import Connection
from rngd.incidents import IncidentLog
from rngd.observe import Peer, describe, peer_of
from rngd.ring import BusyPoll
from rngd.source import EntropySource, SourceError
from rngd.systemd import Notifier, check_listening, socket_address

log = logging.getLogger(__name__)

#: Connections the kernel holds until we accept them (we accept all the time; QEMU connects
#: once, so this only absorbs a burst, or connections made while accept() is failing).
_BACKLOG = 16

#: accept() errors that say the process or the system is out of a resource (trio's
#: ACCEPT_CAPACITY_ERRNOS): they pass when fds or memory are freed, so the socket waits a
#: little and tries again, as trio's `serve_listeners` does.
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: accept() errors about one connection that went away before it was accepted (the ones
#: trio's `SocketListener.accept` ignores): the next accept() is tried at once.
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM",
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "ENOSR",
        "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT",
        "ETIMEDOUT",
        "ECONNRESET",
    )
    if hasattr(errno, name)
)
#: Seconds between accept() attempts while it fails with any other error, capacity or not
#: (trio's SLEEP_TIME): an error we do not know is retried too, never fatal.
ACCEPT_RETRY = 0.1


@dataclass(eq=False)
class Listener:
    path: str
    sock: socket.socket
    #: Identity of the socket file we created, so we never unlink someone else's; None for
    #: a socket inherited from systemd, whose file is never ours to remove.
    inode: tuple[int, int] | None

    def remove(self) -> None:
        self.sock.close()
        if self.inode is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.inode:
                os.unlink(self.path)


def _in_use(path: str) -> bool:
    """True if something accepts connections on the socket file at `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def bind_listeners(config: DaemonConfig) -> list[Listener]:
    """Create every listening socket, or none: raises ConfigError naming the problem.
    (`config` is validated: `Daemon` does that first.)"""
    gid = None
    if config.socket_group is not None:
        try:
            gid = grp.getgrnam(config.socket_group).gr_gid
        except KeyError:
            raise ConfigError(f"--socket-group {config.socket_group}: no such group") from None
    paths = config.socket_paths()
    for path in paths:
        if os.path.lexists(path) and _in_use(path):
            raise ConfigError(f"{path} is in use by another process (is a daemon running?)")
    listeners: list[Listener] = []
    try:
        for path in paths:
            if os.path.lexists(path):
                os.unlink(path)  # a stale socket of a daemon that died; validate() checked kind
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                # Created with the final permissions: no window where others may connect.
                with _umask(0o777 & ~config.socket_mode):
                    sock.bind(path)
                if gid is not None:
                    os.chown(path, -1, gid)
                sock.listen(_BACKLOG)
            except OSError as exc:
                sock.close()
                raise ConfigError(f"cannot listen on {path}: {exc.strerror}") from exc
            st = os.lstat(path)
            listeners.append(Listener(path, sock, (st.st_dev, st.st_ino)))
    except BaseException:
        for listener in listeners:
            listener.remove()
        raise
    return listeners


def adopt_listeners(config: DaemonConfig) -> list[Listener]:
    """The sockets systemd passed us (`config.listen_fds`), each checked to be a listening
    Unix stream socket: raises ConfigError naming the first that is not."""
    config.validate()
    for fd in config.listen_fds:
        check_listening(fd)
    listeners = []
    for fd in config.listen_fds:
        os.set_inheritable(fd, False)  # as sd_listen_fds: not passed on to any child
        sock = socket.socket(fileno=fd)
        listeners.append(Listener(socket_address(sock), sock, None))
    return listeners


class Daemon:
    """The daemon's resources: created synchronously, so that every configuration error is
    reported (and the process can exit) before the event loop starts or a guest connects."""

    def __init__(self, config: DaemonConfig, *, poll: BusyPoll | None = None) -> None:
        """`poll` replaces the one `config.poll_us` makes (tests use one that outlasts them,
        so that what they check does not hang on how soon they look)."""
        config.validate()
        self.config = config
        try:
            self.source = EntropySource(config.filename, health=config.health_tests)
        except SourceError as exc:
            raise ConfigError(str(exc)) from exc
        self.listeners: list[Listener] = []
        self.connected: socket.socket | None = None
        #: Tells systemd (Type=notify) when we are ready, how many guests are connected and
        #: when we stop; a no-op without $NOTIFY_SOCKET.
        self.notifier = Notifier.from_environment()
        self.guests = 0
        self.source.on_health_change = self._health_changed
        try:
            if config.listen_fds:
                self.listeners = adopt_listeners(config)
            elif config.connected_fd is not None:
                self.connected = socket.socket(fileno=config.connected_fd)
                peer = peer_of(self.connected)
                if not config.allows(None if peer is None else peer.uid):
                    self.connected.detach()  # the caller's fd: theirs to close
                    self.connected = None
                    raise ConfigError(
                        f"--fd {config.connected_fd}: the peer ({describe(peer)}) is not "
                        "allowed by --allow-uid"
                    )
            else:
                self.listeners = bind_listeners(config)
        except BaseException:
            self.source.close()
            raise
        #: The connections being served, for the SIGUSR1 report.
        self.connections: set[Connection] = set()
        self.scheduler = BandwidthScheduler(
            config.max_bytes, config.period_ms / 1000, config.socket_count, config.share
        )
        #: Shared by every ring: how long each polls, and how many may at once.
        if poll is None and config.poll_us:
            poll = BusyPoll(config.poll_us)
        self.poll = poll

    @property
    def paths(self) -> list[str]:
        return [listener.path for listener in self.listeners]

    async def serve(
        self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve every socket until cancelled; reports the socket paths once running.

        With a connected fd (`--fd`) there is one connection to serve, and this returns when
        it ends.
        """
        config = self.config
        async with trio.open_nursery() as root:
            # A device source's pump (a no-op for other sources) lives as long as the sockets.
            root.start_soon(self.source.run)
            if self.connected is not None:
                task_status.started([])
                self.notifier.notify(f"READY=1\nSTATUS={self._status()}")
                name = f"fd{config.connected_fd}"
                peer = peer_of(self.connected)
                log.info("%s: serving the connected socket (%s)", name, describe(peer))
                sock = trio.socket.from_stdlib_socket(self.connected)
                connection = Connection(
                    sock, name, self.source, self.scheduler.guest(0), peer=peer, poll=self.poll
                )
                await serve_connection(connection, self.connections)
                root.cancel_scope.cancel()
                return
            for index, listener in enumerate(self.listeners):
                server = SocketServer(
                    os.path.basename(listener.path),
                    functools.partial(_accept, trio.socket.from_stdlib_socket(listener.sock)),
                    self.source,
                    self.scheduler.guest(index),
                    connections=self.connections,
                    allows=config.allows,
                    on_guests=self._guest_count,
                    poll=self.poll,
                )
                root.start_soon(server.run)
            log.info(
                "listening on %s%s (source %s, health tests %s, %s, %s)",
                ", ".join(self.paths),
                " (inherited from systemd)" if config.listen_fds else "",
                config.filename,
                "off" if self.source.monitor is None else "on",
                "unlimited"
                if config.max_bytes is None
                else f"{config.max_bytes} bytes per {config.period_ms} ms, {config.share} share",
                f"--poll-us {config.poll_us}",
            )
            task_status.started(self.paths)
            self.notifier.notify(f"READY=1\nSTATUS={self._status()}")

    def _status(self) -> str:
        if self.connected is not None:
            status = "serving the connected socket"
        else:
            status = f"{self.guests} of {len(self.listeners)} guests connected"
        if self.source.failed():
            status += "; entropy source FAILED its health tests, serving nothing"
        return status

    def _health_changed(self) -> None:
        self.notifier.notify(f"STATUS={self._status()}")

    def _guest_count(self, change: int) -> None:
        self.guests += change
        self.notifier.notify(f"STATUS={self._status()}")

    def report(self) -> None:
        """Log every connection's counters, one line each (SIGUSR1)."""
        connections = sorted(self.connections, key=lambda c: c.name)
        log.info("statistics: %d VMM(s) connected", len(connections))
        log.info("source %s: %s", self.config.filename, self.source.health_summary())
        for connection in connections:
            log.info("%sserving: %s", connection.prefix, connection.summary())

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the socket files and close the source (leaving a `with` block does)."""
        for listener in self.listeners:
            listener.remove()
        if self.connected is not None:
            self.connected.close()
        self.source.close()
        self.notifier.close()


async def serve(
    config: DaemonConfig,
    *,
    poll: BusyPoll | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a daemon for `config` (with `poll`, if given, for its rings) until cancelled (the
    in-process entry point tests use)."""
    with Daemon(config, poll=poll) as daemon:
        await daemon.serve(task_status=task_status)


async def serve_connection(
    connection: Connection,
    connections: set[Connection],
    on_guests: Callable[[int], None] | None = None,
) -> None:
    """Serve `connection` until it ends (a socket's VMM, or the one of `--fd`), registered
    in `connections` meanwhile (for SIGUSR1); `on_guests` is told +1, then -1 at the end."""
    connections.add(connection)
    if on_guests is not None:
        on_guests(1)
    try:
        await connection.run()
    finally:
        connections.discard(connection)
        if on_guests is not None:
            on_guests(-1)


Accept = Callable[[], Awaitable[trio.socket.SocketType]]


async def _accept(sock: trio.socket.SocketType) -> trio.socket.SocketType:
    # Only once a connection is waiting: accept(2) fails with EMFILE when no fd is free even
    # with nothing to accept, and every idle socket would report a shortage no VMM suffers.
    await trio.lowlevel.wait_readable(sock)
    conn, _ = await sock.accept()
    return conn


@dataclass(eq=False)
class _Served:
    """A connection the socket has taken on: served now, or as soon as `after` is done."""

    sock: trio.socket.SocketType
    peer: Peer | None
    after: _Served | None
    done: trio.Event = field(default_factory=trio.Event)

    def leaving(self) -> bool:
        """True once the VMM has hung up (the connection is ending, or has ended)."""
        fd = self.sock.fileno()
        if fd < 0:
            return True
        poller = select.poll()  # poll(2), not epoll: it takes no fd, even when none are left
        # POLLRDHUP: the peer shut down or closed its end; POLLHUP, POLLERR come unasked.
        poller.register(fd, select.POLLRDHUP)
        return bool(poller.poll(0))


class SocketServer:
    """One listening socket: accepts all the time, serves one VMM at a time.

    A connection that arrives while the socket's VMM is connected is closed at once (logged
    one line each, rate-limited). One that arrives after that VMM hung up is taken on at once
    and served as soon as the old connection's cleanup is over, even when the hang-up is not
    processed yet: a new VMM right after the old one is never refused.

    accept() never ends the task: errors about one vanished connection are skipped, any
    other (EMFILE when the daemon is out of fds, ...) is logged once and retried every
    `ACCEPT_RETRY` seconds until accept() works again. Guests already connected go on.
    """

    def __init__(
        self,
        name: str,
        accept: Accept,
        source: EntropySource,
        budget: Budget,
        connections: set[Connection] | None = None,
        allows: Callable[[int | None], bool] = lambda uid: True,
        on_guests: Callable[[int], None] | None = None,
        poll: BusyPoll | None = None,
    ) -> None:
        self.name = name
        self.accept = accept
        self.source = source
        self.budget = budget
        #: Where the connection being served is registered (the daemon's, for SIGUSR1).
        self.connections: set[Connection] = set() if connections is None else connections
        #: Whether a peer of a uid may connect (`--allow-uid`; None: the uid is unknown).
        self.allows = allows
        #: Told +1 when a VMM's connection is served, -1 when it ends.
        self.on_guests = on_guests
        #: How its connections' rings poll before they sleep (None: never).
        self.poll = poll
        #: The connection served, or the last one queued behind it.
        self.current: _Served | None = None
        self.refusals = IncidentLog(log, f"{name}: ")

    async def run(self) -> None:
        """Accept and serve until cancelled."""
        failing: int | None = None  # errno of the failure streak, logged once
        failures = 0
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    conn = await self.accept()
                except OSError as exc:
                    if exc.errno in TRANSIENT_ERRNOS:
                        log.debug("%s: accept: %s (skipped)", self.name, exc)
                        await trio.lowlevel.checkpoint()  # a flood of them cannot starve others
                        continue
                    failures += 1
                    if exc.errno != failing:
                        failing = exc.errno
                        log.error(
                            "%s: cannot accept connections%s: %s; retrying every %g s "
                            "(connected VMMs are still served)",
                            self.name,
                            ", out of resources" if exc.errno in CAPACITY_ERRNOS else "",
                            _describe(exc),
                            ACCEPT_RETRY,
                        )
                    else:
                        log.debug("%s: accept still failing (%d attempts)", self.name, failures)
                    await trio.sleep(ACCEPT_RETRY)
                    continue
                if failing is not None:
                    log.info(
                        "%s: accepting connections again (after %d failed attempts)",
                        self.name,
                        failures,
                    )
                    failing, failures = None, 0
                self._take(conn, nursery)

    def _take(self, conn: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        peer = peer_of(conn)
        if not self.allows(None if peer is None else peer.uid):
            self.refusals("connection refused (%s): uid not allowed by --allow-uid", describe(peer))
            conn.close()
            return
        previous = self.current
        if previous is not None and not previous.leaving():
            conn.close()
            self.refusals(
                "connection refused (%s): this socket already serves a VMM (%s)",
                describe(peer),
                describe(previous.peer),
            )
            return
        served = self.current = _Served(conn, peer, previous)
        nursery.start_soon(self._serve, served)

    async def _serve(self, served: _Served) -> None:
        with served.sock:
            try:
                if served.after is not None:
                    # The previous VMM hung up; its memory and fds are released first.
                    await served.after.done.wait()
                    served.after = None  # or every connection would keep its predecessors
                # The connect line, with the negotiated features, is the connection's.
                log.debug("%s: serving a VMM (%s)", self.name, describe(served.peer))
                connection = Connection(
                    served.sock,
                    self.name,
                    self.source,
                    self.budget,
                    peer=served.peer,
                    poll=self.poll,
                )
                try:
                    await serve_connection(connection, self.connections, self.on_guests)
                except Exception:
                    # A bug must cost one connection, never the daemon and its other guests.
                    log.exception("%s: connection failed; accepting the next VMM", self.name)
            finally:
                if self.current is served:
                    self.current = None
                served.done.set()
                self.refusals.flush()


def _describe(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else "?"
    return f"{code} ({exc.strerror})"


#: Signals that stop the daemon. The CLI blocks them before creating the sockets (see
#: `block_stop_signals`) so that one arriving before the event loop listens for it is held,
#: not fatal: the default action would kill us and leave the socket files behind.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
#: Asks for every connection's counters (`Daemon.report`). Held like the stop signals until
#: its receiver is installed: its default action would kill the daemon too.
REPORT_SIGNAL = signal.SIGUSR1
#: What `block_stop_signals` holds until `run` listens.
HELD_SIGNALS = STOP_SIGNALS | {REPORT_SIGNAL}


def block_stop_signals() -> None:
    """Hold the stop signals and SIGUSR1 until `run` has its receivers for them."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)


async def _report_on(reports: AsyncIterator[int], daemon: Daemon) -> None:
    # Only reads counters and logs: nothing a guest waits on is touched.
    async for _ in reports:
        daemon.report()


async def run(daemon: Daemon) -> None:
    """Serve until SIGINT or SIGTERM; log the counters on SIGUSR1. (The caller closes
    `daemon`: see `rngd.cli`.)"""
    with (
        trio.open_signal_receiver(*STOP_SIGNALS) as signals,
        trio.open_signal_receiver(REPORT_SIGNAL) as reports,
    ):
        # Any signal held since the sockets were created is delivered now, to a receiver.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
        async with trio.open_nursery() as nursery:

            async def serve_then_stop() -> None:
                await daemon.serve()  # returns only when a --fd connection ends
                daemon.notifier.notify("STOPPING=1")
                nursery.cancel_scope.cancel()

            nursery.start_soon(serve_then_stop)
            nursery.start_soon(_report_on, reports, daemon)
            async for signum in signals:
                log.info("%s received, shutting down", signal.Signals(signum).name)
                daemon.notifier.notify("STOPPING=1")
                nursery.cancel_scope.cancel()
                break
