"""Socket-file hygiene and who may connect. (tests/test_cli.py checks the same options from
the command line: 0600 by default, --socket-mode 0660, exit 1 on a non-socket or a path in
use.)"""

from __future__ import annotations

import grp
import logging
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
import trio

from rngd.config import ConfigError, DaemonConfig
from rngd.daemon import Daemon
from rngd.testing import (
    BackendDisconnected,
    DaemonProcess,
    Frontend,
    daemon_in_process,
    daemon_process,
)

PROG = [sys.executable, "-m", "rngd"]


@pytest.fixture
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="rngd-sec-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def mode(path: str) -> int:
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode)
    return stat.S_IMODE(st.st_mode)


async def test_sockets_are_0600_whatever_the_umask(workdir: str) -> None:
    old = os.umask(0)
    try:
        async with daemon_in_process(os.path.join(workdir, "rng.sock"), socket_count=2) as paths:
            assert [mode(p) for p in paths] == [0o600, 0o600]
    finally:
        os.umask(old)


async def test_socket_mode_and_group(workdir: str) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    async with daemon_in_process(
        os.path.join(workdir, "rng.sock"), socket_mode=0o660, socket_group=group
    ) as (path,):
        assert mode(path) == 0o660
        assert os.lstat(path).st_gid == os.getgid()


def test_unknown_group_refused_before_any_socket(workdir: str) -> None:
    base = os.path.join(workdir, "rng.sock")
    with pytest.raises(ConfigError, match="no such group"):
        Daemon(DaemonConfig(base, socket_group="no-such-group-rngd"))
    assert os.listdir(workdir) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
@pytest.mark.parametrize("socket_mode", [0o600, 0o666], ids=["0600", "0666"])
async def test_other_users_cannot_connect_to_a_0600_socket(workdir: str, socket_mode: int) -> None:
    """The mode is what keeps another user's process away from our guests: user nobody is
    refused by a 0600 socket and let in by a 0666 one."""
    os.chmod(workdir, 0o755)
    async with daemon_in_process(os.path.join(workdir, "rng.sock"), socket_mode=socket_mode) as (
        path,
    ):
        probe = (
            "import socket,sys\n"
            "s=socket.socket(socket.AF_UNIX)\n"
            "try:\n s.connect(sys.argv[1]); print('connected')\n"
            "except PermissionError: print('refused')\n"
        )
        # The system interpreter: the venv's may sit where user nobody cannot reach.
        python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
        result = await trio.run_process(
            [python, "-c", probe, path], user=65534, capture_stdout=True
        )
        expected = "refused" if socket_mode == 0o600 else "connected"
        assert result.stdout.decode().strip() == expected


@pytest.mark.parametrize("kind", ["regular_file", "directory", "symlink_to_socket", "fifo"])
def test_never_unlinks_what_is_not_a_socket(workdir: str, kind: str) -> None:
    """Whatever sits at the second path is left alone; the first socket is not created
    either (all or nothing), and the CLI exits 1 with one line."""
    base = os.path.join(workdir, "rng.sock")
    victim = f"{base}1"
    if kind == "regular_file":
        with open(victim, "w") as f:
            f.write("precious")
    elif kind == "directory":
        os.mkdir(victim)
    elif kind == "fifo":
        os.mkfifo(victim)
    else:
        target = os.path.join(workdir, "real.sock")
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(target)
        os.symlink(target, victim)
    before = os.lstat(victim)
    with pytest.raises(ConfigError, match="not a socket"):
        Daemon(DaemonConfig(base, socket_count=2))
    result = subprocess.run(
        [*PROG, "-s", base, "-c", "2"], capture_output=True, text=True, timeout=20, check=False
    )
    assert result.returncode == 1
    assert "not a socket" in result.stderr and len(result.stderr.splitlines()) == 1
    after = os.lstat(victim)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert not os.path.lexists(f"{base}0")


async def test_refuses_a_path_another_daemon_listens_on(workdir: str) -> None:
    """Refused (ConfigError in-process, exit 1 from the CLI), and the running daemon keeps
    its socket and keeps serving."""
    base = os.path.join(workdir, "rng.sock")
    async with daemon_in_process(base) as (path,):
        inode = os.lstat(path).st_ino
        with pytest.raises(ConfigError, match="in use"):
            Daemon(DaemonConfig(base))
        result = await trio.run_process([*PROG, "-s", base], capture_stderr=True, check=False)
        assert result.returncode == 1 and b"in use" in result.stderr
        assert os.lstat(path).st_ino == inode
        async with await Frontend.connect(path) as vmm:
            await vmm.start_qemu72(4)
            assert len(await vmm.read_random(64)) == 64


async def test_exit_leaves_a_replaced_socket_path_alone(workdir: str) -> None:
    """If someone replaces our socket file while we run, leaving does not unlink theirs."""
    base = os.path.join(workdir, "rng.sock")
    async with daemon_in_process(base) as (path,):
        os.unlink(path)
        with open(path, "w") as f:
            f.write("someone else's")
    with open(path) as f:
        assert f.read() == "someone else's"


async def test_peer_credentials_logged_on_connect(
    workdir: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One line per connection, once the features are negotiated: the peer's pid, uid and gid
    with them."""
    caplog.set_level(logging.INFO, logger="rngd.connection")
    async with daemon_in_process(os.path.join(workdir, "rng.sock")) as (path,):
        vmm = await Frontend.connect(path)
        async with vmm:
            await vmm.start_qemu72(4)
    expected = (
        f"rng.sock0: VMM connected: pid={os.getpid()} uid={os.getuid()} gid={os.getgid()} features="
    )
    lines = [r.getMessage() for r in caplog.records if r.name == "rngd.connection"]
    assert sum(line.startswith(expected) for line in lines) == 1, lines


# -- --allow-uid: who may connect, whatever the socket file's mode -------------------------

NOBODY = 65534

#: Connects, asks GET_FEATURES and says whether the back-end answered.
_PROBE = (
    "import socket, struct, sys\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    "s.connect(sys.argv[1])\n"
    "s.settimeout(10)\n"
    "try:\n"
    " s.sendall(struct.pack('<III', 1, 1, 0))\n"  # GET_FEATURES, version 1, no payload
    " data = s.recv(64)\n"
    "except (BrokenPipeError, ConnectionResetError):\n"  # hung up before, or after, it sent
    " data = b''\n"
    "print('served' if data else 'refused')\n"
)


async def probe_as(uid: int, path: str) -> str:
    """What a process of user `uid` gets from the socket at `path`: 'served' or 'refused'."""
    # The system interpreter: the venv's may sit where user nobody cannot reach.
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    result = await trio.run_process(
        [python, "-c", _PROBE, path], user=uid, group=uid, capture_stdout=True
    )
    return result.stdout.decode().strip()


async def served_as_root(path: str) -> bool:
    async with await Frontend.connect(path) as vmm:
        try:
            await vmm.get_features()
        except (BackendDisconnected, BrokenPipeError, ConnectionResetError):
            return False
    return True


def refusals(daemon: DaemonProcess) -> list[str]:
    return [line for line in daemon.log().splitlines() if "uid not allowed" in line]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
async def test_allow_uid_refuses_other_users_a_0666_socket_lets_in(workdir: str) -> None:
    """--allow-uid 0 on a socket everyone may open: user nobody's connection is hung up with
    one log line naming it; root's is served."""
    os.chmod(workdir, 0o755)
    async with daemon_process(
        os.path.join(workdir, "rng.sock"),
        log_level="info",
        extra_args=["--socket-mode", "0666", "--allow-uid", "0"],
    ) as daemon:
        (path,) = daemon.socket_paths
        assert await probe_as(NOBODY, path) == "refused"
        (line,) = refusals(daemon)
        assert "rng.sock0: connection refused (pid=" in line and f"uid={NOBODY} " in line
        assert await served_as_root(path)
        async with await Frontend.connect(path) as vmm:
            await vmm.start_qemu72(4)
            assert len(await vmm.read_random(256)) == 256
        assert len(refusals(daemon)) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
async def test_allow_uid_refuses_root_when_not_listed(workdir: str) -> None:
    """The list is the list: root is refused by --allow-uid 65534 (its refusals rate-limited
    like other incidents, 10 lines then a count), nobody is served, and so is root once
    listed too."""
    os.chmod(workdir, 0o755)
    base = os.path.join(workdir, "rng.sock")
    async with daemon_process(
        base,
        log_level="info",
        extra_args=["--socket-mode", "0666", "--allow-uid", str(NOBODY)],
    ) as daemon:
        (path,) = daemon.socket_paths
        for _ in range(12):
            assert not await served_as_root(path)
        assert await probe_as(NOBODY, path) == "served"
        lines = refusals(daemon)
        # daemon_process's own probe (root) was the first refusal.
        assert len(lines) == 10 and all(f"uid={os.getuid()} " in line for line in lines)
    async with daemon_process(
        base,
        log_level="info",
        extra_args=["--socket-mode", "0666", "--allow-uid", str(NOBODY), "--allow-uid", "0"],
    ) as daemon:
        (path,) = daemon.socket_paths
        assert await served_as_root(path)
        assert await probe_as(NOBODY, path) == "served"
        assert refusals(daemon) == []


def test_allow_uid_checks_the_peer_of_a_connected_fd() -> None:
    """--fd: a peer whose uid is not listed is refused before anything is served (exit 1, one
    line); a listed one is served until it hangs up."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        other = str(os.getuid() + 1)
        result = subprocess.run(
            [*PROG, "--fd", str(theirs.fileno()), "--allow-uid", other],
            pass_fds=[theirs.fileno()],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and "--allow-uid" in result.stderr
        process = subprocess.Popen(
            [*PROG, "--fd", str(theirs.fileno()), "--allow-uid", str(os.getuid())],
            pass_fds=[theirs.fileno()],
            stderr=subprocess.PIPE,
            text=True,
        )
        ours.sendall(struct.pack("<III", 1, 1, 0))  # GET_FEATURES
        ours.settimeout(20)
        assert len(ours.recv(64)) == 20
        ours.close()
        assert process.wait(timeout=20) == 0


def test_allow_uid_must_be_a_uid(workdir: str) -> None:
    result = subprocess.run(
        [*PROG, "-s", os.path.join(workdir, "rng.sock"), "--allow-uid", "-1"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "--allow-uid" in result.stderr
    assert os.listdir(workdir) == []
