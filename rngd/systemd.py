"""systemd integration without libsystemd: socket activation and `Type=notify` readiness.

`inherited_sockets` reads what systemd passes a socket-activated service (`LISTEN_PID`,
`LISTEN_FDS`, `LISTEN_FDNAMES`, the sockets from fd 3 on), as `sd_listen_fds(1)` does: the
variables count only when `LISTEN_PID` is this process, and are unset either way so that no
child inherits them. `Notifier` sends `sd_notify` datagrams (`READY=1`, `STATUS=...`,
`STOPPING=1`) to `$NOTIFY_SOCKET`, a path or an abstract name (`@name`); it never fails the
daemon, and says once when the manager cannot be told.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass

from rngd.config import ConfigError, require_socket

log = logging.getLogger(__name__)

#: The first inherited fd (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


@dataclass(frozen=True)
class InheritedSocket:
    fd: int
    #: Its LISTEN_FDNAMES entry ("" when none was given).
    name: str


def inherited_sockets(
    environ: MutableMapping[str, str] | None = None,
) -> list[InheritedSocket]:
    """The listening sockets systemd passed us, in order (empty when not socket-activated).

    Unsets the LISTEN_* variables. Raises ConfigError when the variables are meant for us
    but malformed. The fds are only counted here; `check_listening` checks each one.
    """
    env = os.environ if environ is None else environ
    values = {name: env.pop(name, None) for name in LISTEN_VARIABLES}
    pid, count, names = values["LISTEN_PID"], values["LISTEN_FDS"], values["LISTEN_FDNAMES"]
    if pid is None or count is None:
        return []
    try:
        listen_pid = int(pid)
    except ValueError:
        raise ConfigError(f"LISTEN_PID={pid!r} is not a process id") from None
    if listen_pid != os.getpid():
        # Meant for another process (the variables leaked to us): ignored, as sd_listen_fds.
        log.debug("LISTEN_PID=%d is not us (%d): LISTEN_FDS ignored", listen_pid, os.getpid())
        return []
    try:
        n = int(count)
    except ValueError:
        n = -1
    if n < 0:
        raise ConfigError(f"LISTEN_FDS={count!r} is not a number of file descriptors")
    fd_names = names.split(":") if names is not None else []
    if len(fd_names) != n:
        if names is not None:
            log.warning("LISTEN_FDNAMES has %d names for %d fds: ignored", len(fd_names), n)
        fd_names = [""] * n
    inherited = [
        InheritedSocket(fd, name)
        for fd, name in zip(range(LISTEN_FDS_START, LISTEN_FDS_START + n), fd_names, strict=True)
    ]
    log.debug(
        "socket activation: %s",
        ", ".join(f"fd {s.fd}" + (f" ({s.name})" if s.name else "") for s in inherited) or "no fds",
    )
    return inherited


def check_listening(fd: int) -> None:
    """Raise ConfigError unless `fd` is a listening AF_UNIX SOCK_STREAM socket."""
    what = f"inherited fd {fd} (LISTEN_FDS)"
    require_socket(fd, what)
    # fromfd duplicates: the original stays ours to adopt, this copy is closed at once.
    with socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        family = probe.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        kind = probe.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if family != socket.AF_UNIX:
        raise ConfigError(f"{what} is not a Unix socket (vhost-user needs ListenStream=PATH)")
    if kind != socket.SOCK_STREAM:
        raise ConfigError(f"{what} is not a stream socket (vhost-user needs ListenStream=PATH)")
    if not listening:
        raise ConfigError(f"{what} is not listening (the socket unit needs Accept=no)")


def socket_address(sock: socket.socket) -> str:
    """A printable address of a Unix socket: its path, or @name for an abstract one."""
    name = sock.getsockname()
    if isinstance(name, bytes):
        return "@" + name[1:].decode(errors="replace") if name[:1] == b"\0" else name.decode()
    return str(name)


class Notifier:
    """Sends service state to the service manager; a no-op without `$NOTIFY_SOCKET`."""

    def __init__(self, address: str | None) -> None:
        self.address: str | bytes | None = None
        self.label = address or ""
        self.sock: socket.socket | None = None
        self.failed = False
        if not address:
            return
        if address.startswith("@"):
            self.address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self.address = address
        else:
            log.warning("NOTIFY_SOCKET=%s is not a path or an @abstract name: ignored", address)

    @classmethod
    def from_environment(cls) -> Notifier:
        return cls(os.environ.get("NOTIFY_SOCKET"))

    def notify(self, state: str) -> None:
        """Send `state` (newline-separated VAR=value lines) in one datagram, never raising."""
        if self.address is None:
            return
        try:
            if self.sock is None:
                self.sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self.sock.sendto(state.encode(), self.address)
        except OSError as exc:
            code = errno.errorcode.get(exc.errno or 0, "?")
            if not self.failed:
                self.failed = True
                log.warning(
                    "cannot notify the service manager at NOTIFY_SOCKET=%s: %s (%s); "
                    "further failures are not logged",
                    self.label,
                    code,
                    exc.strerror,
                )
            else:
                log.debug("notify %r: %s", state, code)
        else:
            log.debug("notified %s", state.replace("\n", " "))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
