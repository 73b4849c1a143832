"""The daemon's settings, checked before any socket is created."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from rngd.bandwidth import ShareMode
from rngd.health import HealthMode

#: The original's default and maximum period: 2^16 ms.
MAX_PERIOD_MS = 65536
#: How long a ring's thread looks for the guest's next request after serving one, before it
#: sleeps (`--poll-us`). Off: a poll buys a real guest throughput with CPU time, a trade for
#: the operator to make (docs/performance.md has the measurements).
DEFAULT_POLL_US = 0
#: Longer polls only burn a core: a guest that takes this long to post again is not waiting.
MAX_POLL_US = 10_000


class ConfigError(Exception):
    """A setting that makes starting impossible; the message names it for the operator."""


@dataclass(frozen=True)
class DaemonConfig:
    """Every setting, as the command line parsed it. `validate` checks each rule on them
    (once, here; `Daemon` calls it before it creates anything)."""

    socket_path: str
    socket_count: int = 1
    filename: str = "/dev/urandom"
    period_ms: int = MAX_PERIOD_MS
    max_bytes: int | None = None
    #: SPLIT (as the original: max_bytes // socket_count per socket) or FAIR.
    share: ShareMode = ShareMode.SPLIT
    #: Permissions of the socket files; 0600 keeps other users' processes off our guests.
    socket_mode: int = 0o600
    socket_group: str | None = None
    #: Peer uids (SO_PEERCRED) allowed to connect; empty: any the socket file's mode lets in.
    allow_uids: tuple[int, ...] = ()
    #: Serve this already-connected socket (`--fd`, the vhost-user back-end convention)
    #: instead of listening on `socket_path`; the daemon exits when it disconnects.
    connected_fd: int | None = None
    #: Listening sockets systemd passed us (socket activation, `LISTEN_FDS`), served as
    #: guests 0..n-1 instead of sockets created at `socket_path`.
    listen_fds: tuple[int, ...] = ()
    #: Health tests on the source (`--health-tests`): AUTO tests all but the kernel's CSPRNG.
    health_tests: HealthMode = HealthMode.AUTO
    #: Microseconds a ring polls for the next request before it sleeps (`--poll-us`); 0: never.
    poll_us: int = DEFAULT_POLL_US

    def allows(self, uid: int | None) -> bool:
        """May a peer of user id `uid` (None: unknown) connect (`--allow-uid`)?"""
        return not self.allow_uids or uid in self.allow_uids

    def socket_paths(self) -> list[str]:
        return [f"{self.socket_path}{i}" for i in range(self.socket_count)]

    def validate(self) -> None:
        if self.socket_count < 1:
            raise ConfigError(f"--socket-count must be at least 1, not {self.socket_count}")
        if not 1 <= self.period_ms <= MAX_PERIOD_MS:
            raise ConfigError(f"--period must be in 1..{MAX_PERIOD_MS} ms, not {self.period_ms}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ConfigError(f"--max-bytes must be at least 1, not {self.max_bytes}")
        if (
            self.max_bytes is not None
            and self.share is ShareMode.SPLIT
            and self.max_bytes < self.socket_count
        ):
            raise ConfigError(
                f"--max-bytes {self.max_bytes} split over {self.socket_count} sockets leaves "
                "each nothing; raise it or use --share fair"
            )
        if not 0 <= self.poll_us <= MAX_POLL_US:
            raise ConfigError(f"--poll-us must be in 0..{MAX_POLL_US}, not {self.poll_us}")
        if not 0 <= self.socket_mode <= 0o777:
            raise ConfigError(f"--socket-mode {self.socket_mode:o} is not a permission mode")
        for uid in self.allow_uids:
            if not 0 <= uid < 2**32 - 1:
                raise ConfigError(f"--allow-uid must be a user id, not {uid}")
        if self.listen_fds:
            self._validate_listen_fds()
            return
        if self.connected_fd is not None:
            self._validate_connected_fd()
            return
        if not self.socket_path:
            raise ConfigError("one of --socket-path or --fd is required")
        directory = os.path.dirname(os.path.abspath(self.socket_path))
        if not os.path.isdir(directory):
            raise ConfigError(f"socket directory {directory} does not exist")
        for path in self.socket_paths():
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            if not stat.S_ISSOCK(mode):
                raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")

    def _validate_connected_fd(self) -> None:
        fd = self.connected_fd
        assert fd is not None
        if self.socket_path:
            raise ConfigError("--fd and --socket-path exclude each other")
        if self.socket_count != 1:
            raise ConfigError("--fd serves one connection: --socket-count must be 1")
        require_socket(fd, f"--fd {fd}")

    def _validate_listen_fds(self) -> None:
        n = len(self.listen_fds)
        if self.socket_path:
            raise ConfigError(
                f"--socket-path and the {n} sockets inherited from systemd (LISTEN_FDS) "
                "exclude each other; drop --socket-path"
            )
        if self.connected_fd is not None:
            raise ConfigError(
                f"--fd and the {n} sockets inherited from systemd (LISTEN_FDS) exclude each other"
            )
        if self.socket_count != n:
            raise ConfigError(
                f"--socket-count {self.socket_count} does not match the {n} sockets inherited "
                "from systemd (LISTEN_FDS); omit it or make it match"
            )


def require_socket(fd: int, what: str) -> None:
    """Raise ConfigError (naming the fd as `what`) unless `fd` is an open socket."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        raise ConfigError(f"{what} is not an open file descriptor") from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{what} is not a socket")
