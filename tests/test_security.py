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
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
import trio

from rngd.config import ConfigError, DaemonConfig
from rngd.daemon import Daemon
from rngd.testing import Frontend, daemon_in_process

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
    caplog.set_level(logging.INFO, logger="rngd.backend")
    async with daemon_in_process(os.path.join(workdir, "rng.sock")) as (path,):
        vmm = await Frontend.connect(path)
        async with vmm:
            await vmm.start_qemu72(4)
    expected = (
        f"rng.sock0: VMM connected: pid={os.getpid()} uid={os.getuid()} gid={os.getgid()} features="
    )
    lines = [r.getMessage() for r in caplog.records if r.name == "rngd.backend"]
    assert sum(line.startswith(expected) for line in lines) == 1, lines
