"""systemd: socket activation (LISTEN_FDS) and Type=notify readiness, against a real daemon.

Twice over: a launcher here hands the daemon its sockets exactly as systemd does (fds from 3 on,
LISTEN_PID set to the daemon's own pid by exec'ing in place), and Debian's real
`systemd-socket-activate` does the same with sockets of its own.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio

import rngd
from rngd.config import ConfigError
from rngd.systemd import InheritedSocket, inherited_sockets
from rngd.testing import Frontend, connect_when_listening

PROG = [sys.executable, "-P", "-m", "rngd"]
SOCKET_ACTIVATE = "/usr/bin/systemd-socket-activate"

#: What systemd does between fork and exec: the sockets moved to fds 3.., LISTEN_PID set to
#: the process that then execs the service (so it is the service's pid), LISTEN_FDS counted.
LAUNCHER = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",") if fd]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ.setdefault("LISTEN_PID", str(os.getpid()))
os.environ["LISTEN_FDS"] = str(len(fds))
os.execv(sys.argv[2], sys.argv[2:])
"""


def launch_args(fds: Sequence[int], args: Sequence[str]) -> list[str]:
    return [sys.executable, "-c", LAUNCHER, ",".join(map(str, fds)), *PROG, *args]


def daemon_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    source_root = os.path.dirname(os.path.dirname(os.path.abspath(rngd.__file__)))
    env["PYTHONPATH"] = source_root
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET"):
        env.pop(name, None)
    env.update(extra)
    return env


def listening(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    return sock


@asynccontextmanager
async def notify_socket(
    workdir: str, kind: str
) -> AsyncIterator[tuple[trio.socket.SocketType, str]]:
    """A datagram socket standing in for systemd's notify socket, and its $NOTIFY_SOCKET."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sock:
        if kind == "path":
            address = os.path.join(workdir, "notify")
            await sock.bind(address)
        else:
            name = f"rngd-test-notify-{os.getpid()}-{os.path.basename(workdir)}"
            address = "@" + name
            await sock.bind(b"\0" + name.encode())
        yield sock, address


class Notifications:
    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.seen: list[str] = []

    async def next(self) -> dict[str, str]:
        """The next datagram, as its VAR=value lines."""
        with trio.fail_after(10):
            data = await self.sock.recv(4096)
        text = data.decode()
        self.seen.append(text)
        return dict(line.split("=", 1) for line in text.splitlines())

    async def until(self, name: str, value: str | None = None) -> dict[str, str]:
        while True:
            message = await self.next()
            if name in message and (value is None or message[name] == value):
                return message


@dataclass
class Running:
    process: trio.Process
    log_path: str

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    async def stop(self) -> None:
        """SIGTERM; the daemon must exit with 0."""
        self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            code = await self.process.wait()
        assert code == 0, self.log()


@asynccontextmanager
async def running(
    args: list[str], env: dict[str, str], fds: Sequence[int], workdir: str
) -> AsyncIterator[Running]:
    # The log goes to a file: a pipe nobody drains while the test runs could block the daemon.
    log_path = os.path.join(workdir, "daemon.log")
    with open(log_path, "wb") as log:
        process = await trio.lowlevel.open_process(
            args, env=env, pass_fds=fds, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    try:
        yield Running(process, log_path)
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


async def serve_one_guest(path: str, data: bytes) -> None:
    async with await Frontend.connect(path) as vmm:
        await vmm.start_qemu72(queue_size=4)
        assert await vmm.read_random(256) in data


async def other_guest_then_stop(
    daemon: Running, notes: Notifications, path: str, data: bytes
) -> str:
    """Once the first guest has left (STATUS back to 0), one on the other inherited socket is
    served and counted, then SIGTERM says STOPPING=1. Returns the daemon's log."""
    assert await notes.next() == {"STATUS": "0 of 2 guests connected"}
    await serve_one_guest(path, data)
    assert await notes.next() == {"STATUS": "1 of 2 guests connected"}
    assert await notes.next() == {"STATUS": "0 of 2 guests connected"}
    await daemon.stop()
    assert await notes.next() == {"STOPPING": "1"}
    return daemon.log()


async def serve_one_guest_when_listening(path: str, data: bytes) -> None:
    async with await connect_when_listening(path) as vmm:
        await vmm.start_qemu72(queue_size=4)
        assert await vmm.read_random(64) in data


@pytest.mark.parametrize("kind", ["path", "abstract"])
async def test_inherited_sockets_serve_guests_and_notify(
    workdir: str, source: tuple[str, bytes], kind: str
) -> None:
    paths = [os.path.join(workdir, f"vm{i}.sock") for i in range(2)]
    socks = [listening(path) for path in paths]
    try:
        async with notify_socket(workdir, kind) as (notify, address):
            notes = Notifications(notify)
            env = daemon_env(NOTIFY_SOCKET=address, LISTEN_FDNAMES="vm0:vm1")
            fds = [s.fileno() for s in socks]
            args = launch_args(fds, ["-f", source[0], "--log-level", "debug"])
            async with running(args, env, fds, workdir) as daemon:
                ready = await notes.next()
                assert ready["READY"] == "1", notes.seen
                assert ready["STATUS"] == "0 of 2 guests connected"
                # Guest 1 is the second inherited fd: served through it, and counted.
                async with await Frontend.connect(paths[1]) as vmm:
                    await vmm.start_qemu72(queue_size=4)
                    assert await vmm.read_random(256) in source[1]
                    assert await notes.next() == {"STATUS": "1 of 2 guests connected"}
                log = await other_guest_then_stop(daemon, notes, paths[0], source[1])
            assert "inherited from systemd" in log, log
        # We did not create the socket files: they stay, and systemd's sockets still listen,
        # so a restarted service finds its VMMs' connections waiting.
        assert all(os.path.exists(path) for path in paths)
        for path in paths:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(path)
    finally:
        for sock in socks:
            sock.close()


async def test_ready_once_created_sockets_listen(workdir: str, source: tuple[str, bytes]) -> None:
    base = os.path.join(workdir, "rng.sock")
    async with notify_socket(workdir, "path") as (notify, address):
        notes = Notifications(notify)
        env = daemon_env(NOTIFY_SOCKET=address)
        args = [*PROG, "-s", base, "-c", "2", "-f", source[0]]
        async with running(args, env, [], workdir) as daemon:
            assert (await notes.next())["READY"] == "1", notes.seen
            # No retrying: READY=1 means every socket accepts now.
            await serve_one_guest(f"{base}1", source[1])
            await notes.until("STATUS", "0 of 2 guests connected")
            await daemon.stop()
            await notes.until("STOPPING", "1")
    assert not os.path.exists(f"{base}0")  # sockets we created are removed as before


async def test_an_unreachable_notify_socket_is_logged_once_never_fatal(
    workdir: str, source: tuple[str, bytes]
) -> None:
    base = os.path.join(workdir, "rng.sock")
    env = daemon_env(NOTIFY_SOCKET=os.path.join(workdir, "nobody-listens"))
    async with running([*PROG, "-s", base, "-f", source[0]], env, [], workdir) as daemon:
        for _ in range(2):  # two connections: two STATUS changes each, all failing
            await serve_one_guest_when_listening(f"{base}0", source[1])
        await daemon.stop()
        log = daemon.log()
    assert log.count("cannot notify the service manager") == 1, log


def run_launched(
    fds: Sequence[int], args: Sequence[str], **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        launch_args(fds, args),
        env=daemon_env(**env),
        pass_fds=fds,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_inherited_fds_must_be_listening_unix_stream_sockets(workdir: str) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    good = listening(os.path.join(workdir, "good.sock"))
    r, w = os.pipe()
    try:
        one_line_error(run_launched([good.fileno(), a.fileno()], []), "fd 4 (LISTEN_FDS)")
        one_line_error(run_launched([a.fileno()], []), "not listening")
        one_line_error(run_launched([dgram.fileno()], []), "not a stream socket")
        one_line_error(run_launched([tcp.fileno()], []), "not a Unix socket")
        one_line_error(run_launched([r], []), "not a socket")
    finally:
        for s in (a, b, dgram, tcp, good):
            s.close()
        os.close(r)
        os.close(w)
    assert os.path.exists(os.path.join(workdir, "good.sock"))


def test_socket_count_and_socket_path_against_inherited_sockets(workdir: str) -> None:
    socks = [listening(os.path.join(workdir, f"vm{i}.sock")) for i in range(2)]
    fds = [s.fileno() for s in socks]
    try:
        one_line_error(
            run_launched(fds, ["-c", "3"]), "--socket-count 3 does not match the 2 sockets"
        )
        one_line_error(
            run_launched(fds, ["-s", os.path.join(workdir, "rng.sock")]), "--socket-path"
        )
        one_line_error(run_launched(fds, ["--fd", "3"]), "--fd")
        # LISTEN_PID of another process: the variables were not meant for us, and are ignored.
        one_line_error(
            run_launched(fds, [], LISTEN_PID=str(os.getpid())),
            "one of --socket-path or --fd is required",
        )
    finally:
        for s in socks:
            s.close()
    assert not os.path.exists(os.path.join(workdir, "rng.sock0"))


def test_listen_variables_are_read_as_sd_listen_fds_and_unset() -> None:
    me = str(os.getpid())
    env = {"LISTEN_PID": me, "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "HOME": "/x"}
    assert inherited_sockets(env) == [InheritedSocket(3, "a"), InheritedSocket(4, "b")]
    assert env == {"HOME": "/x"}
    env = {"LISTEN_PID": me, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"}
    assert inherited_sockets(env) == [InheritedSocket(3, "")]  # names that do not fit
    env = {"LISTEN_PID": str(os.getppid()), "LISTEN_FDS": "2"}
    assert inherited_sockets(env) == [] and env == {}
    assert inherited_sockets({"LISTEN_FDS": "2"}) == []
    for bad in ({"LISTEN_PID": "x", "LISTEN_FDS": "1"}, {"LISTEN_PID": me, "LISTEN_FDS": "-1"}):
        with pytest.raises(ConfigError):
            inherited_sockets(bad)
        assert bad == {}


@pytest.mark.skipif(
    not os.access(SOCKET_ACTIVATE, os.X_OK),
    reason=f"{SOCKET_ACTIVATE} missing (Debian package systemd; scripts/test installs it)",
)
async def test_under_real_systemd_socket_activate(workdir: str, source: tuple[str, bytes]) -> None:
    paths = [os.path.join(workdir, f"vm{i}.sock") for i in range(2)]
    async with notify_socket(workdir, "abstract") as (notify, address):
        notes = Notifications(notify)
        source_root = os.path.dirname(os.path.dirname(os.path.abspath(rngd.__file__)))
        args = [SOCKET_ACTIVATE, *(f"--listen={path}" for path in paths), "--fdname=vm0:vm1"]
        args += [f"--setenv=PYTHONPATH={source_root}", f"--setenv=NOTIFY_SOCKET={address}"]
        args += [*PROG, "-f", source[0], "--log-level", "debug"]
        async with running(args, daemon_env(), [], workdir) as daemon:
            # The first connection makes systemd-socket-activate exec the daemon in its place
            # (same pid), handing it both listening sockets; it is waiting for the daemon.
            async with await connect_when_listening(paths[1]) as vmm:
                ready = await notes.next()
                assert ready["READY"] == "1", notes.seen
                await vmm.start_qemu72(queue_size=4)
                assert await vmm.read_random(256) in source[1]
                assert await notes.next() == {"STATUS": "1 of 2 guests connected"}
            log = await other_guest_then_stop(daemon, notes, paths[0], source[1])
        assert "inherited from systemd" in log and "vm1.sock: VMM connected" in log, log
        assert all(os.path.exists(path) for path in paths)  # not ours to remove


@pytest.mark.skipif(
    not os.access("/usr/bin/systemd-analyze", os.X_OK),
    reason="/usr/bin/systemd-analyze missing (Debian package systemd; scripts/test installs it)",
)
def test_contrib_units_verify(workdir: str) -> None:
    """systemd itself checks the example units: every directive known, every value valid."""
    contrib = os.path.join(os.path.dirname(__file__), "..", "contrib", "systemd")
    # ExecStart= must name an executable that exists: the one this suite runs.
    program = os.path.join(os.path.dirname(sys.executable), "vhost-device-rng")
    for unit in ("rngd@.socket", "rngd@.service"):
        with open(os.path.join(contrib, unit)) as f:
            text = f.read()
        with open(os.path.join(workdir, unit), "w") as f:
            f.write(text.replace("/usr/local/bin/vhost-device-rng", program))
    result = subprocess.run(
        [
            "/usr/bin/systemd-analyze",
            "verify",
            "--man=no",
            os.path.join(workdir, "rngd@vms.socket"),
            os.path.join(workdir, "rngd@vms.service"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=workdir,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
