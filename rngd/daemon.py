"""The daemon: one listening socket per guest, each serving one VMM connection at a time.

Structure (the design card): a root nursery owns one task per socket; each accepted connection
runs in a child nursery (`Connection.run`) holding its protocol task and kick-handler tasks.
Cancelling the root nursery (SIGINT/SIGTERM) unwinds everything; the socket files are removed
on the way out.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import signal
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import trio

from rngd.backend import Connection
from rngd.bandwidth import BandwidthScheduler, ShareMode
from rngd.config import ConfigError, DaemonConfig
from rngd.source import EntropySource, SourceError

log = logging.getLogger(__name__)

_PEERCRED = struct.Struct("3i")
#: Connections that may queue while the socket's current VMM is served (QEMU connects once).
_BACKLOG = 16


@dataclass(eq=False)
class Listener:
    path: str
    sock: socket.socket
    #: Identity of the socket file we created, so we never unlink someone else's.
    inode: tuple[int, int]

    def remove(self) -> None:
        self.sock.close()
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
    """Create every listening socket, or none: raises ConfigError naming the problem."""
    config.validate()
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


class Daemon:
    """The daemon's resources: created synchronously, so that every configuration error is
    reported (and the process can exit) before the event loop starts or a guest connects."""

    def __init__(self, config: DaemonConfig) -> None:
        config.validate()
        self.config = config
        try:
            self.source = EntropySource(config.filename)
        except SourceError as exc:
            raise ConfigError(str(exc)) from exc
        self.listeners: list[Listener] = []
        self.connected: socket.socket | None = None
        try:
            if config.connected_fd is not None:
                self.connected = socket.socket(fileno=config.connected_fd)
            else:
                self.listeners = bind_listeners(config)
        except BaseException:
            self.source.close()
            raise
        self.scheduler = BandwidthScheduler(
            config.max_bytes, config.period_ms / 1000, config.socket_count, ShareMode(config.share)
        )

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
                name = f"fd{config.connected_fd}"
                log.info("%s: serving the connected socket (%s)", name, _peer(self.connected))
                sock = trio.socket.from_stdlib_socket(self.connected)
                await Connection(sock, name, self.source, self.scheduler.guest(0)).run()
                root.cancel_scope.cancel()
                return
            for index, listener in enumerate(self.listeners):
                root.start_soon(_serve_socket, index, listener, self.source, self.scheduler)
            log.info(
                "listening on %s (source %s, %s)",
                ", ".join(self.paths),
                config.filename,
                "unlimited"
                if config.max_bytes is None
                else f"{config.max_bytes} bytes per {config.period_ms} ms, {config.share} share",
            )
            task_status.started(self.paths)

    def close(self) -> None:
        """Remove the socket files and close the source."""
        for listener in self.listeners:
            listener.remove()
        if self.connected is not None:
            self.connected.close()
        self.source.close()


async def serve(
    config: DaemonConfig,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a daemon for `config` until cancelled (the in-process entry point tests use)."""
    daemon = Daemon(config)
    try:
        await daemon.serve(task_status=task_status)
    finally:
        daemon.close()


async def _serve_socket(
    index: int, listener: Listener, source: EntropySource, scheduler: BandwidthScheduler
) -> None:
    """Accept VMMs on one socket, one at a time, for the daemon's whole life."""
    sock = trio.socket.from_stdlib_socket(listener.sock)
    budget = scheduler.guest(index)
    name = f"{os.path.basename(listener.path)}"
    while True:
        conn_sock, _ = await sock.accept()
        with conn_sock:
            peer = _peer(conn_sock)
            log.info("%s: VMM connected (%s)", name, peer)
            try:
                await Connection(conn_sock, name, source, budget).run()
            except Exception:
                # A bug must cost one connection, never the daemon and its other guests.
                log.exception("%s: connection failed; accepting the next VMM", name)


def _peer(sock: trio.socket.SocketType | socket.socket) -> str:
    try:
        pid, uid, gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
    except OSError:
        return "peer unknown"
    return f"pid {pid}, uid {uid}, gid {gid}"


#: Signals that stop the daemon. The CLI blocks them before creating the sockets (see
#: `block_stop_signals`) so that one arriving before the event loop listens for it is held,
#: not fatal: the default action would kill us and leave the socket files behind.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


def block_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


async def run(daemon: Daemon) -> None:
    """Serve until SIGINT or SIGTERM, then clean up."""
    try:
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            # Any signal held since the sockets were created is delivered now, to the receiver.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            async with trio.open_nursery() as nursery:

                async def serve_then_stop() -> None:
                    await daemon.serve()  # returns only when a --fd connection ends
                    nursery.cancel_scope.cancel()

                nursery.start_soon(serve_then_stop)
                async for signum in signals:
                    log.info("%s received, shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        daemon.close()
