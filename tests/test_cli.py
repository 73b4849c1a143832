"""The command line, as an operator meets it: a real process, its exit code and its stderr."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PROG = [sys.executable, "-m", "rngd"]


def run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PROG, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def wait_for_sockets(paths: list[Path], proc: subprocess.Popen[str], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "daemon did not create its sockets"
        time.sleep(0.02)  # polling a subprocess from a sync test; not trio code


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], list[Path]]]:
    base = tmp_path / "rng.sock"
    proc = subprocess.Popen([*PROG, "-s", str(base), "-c", "3"], stderr=subprocess.PIPE, text=True)
    paths = [Path(f"{base}{i}") for i in range(3)]
    try:
        wait_for_sockets(paths, proc)
        yield proc, paths
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_help_lists_every_option() -> None:
    result = run("--help")
    assert result.returncode == 0
    for option in (
        "--socket-path",
        "--filename",
        "--rng-source",
        "--socket-count",
        "--period",
        "--max-bytes",
        "--log-level",
        "--version",
        "--share",
        "--socket-mode",
        "--allow-uid",
        "--health-tests",
    ):
        assert option in result.stdout
    assert run("-h").stdout == result.stdout


def test_version() -> None:
    result = run("-V")
    assert result.returncode == 0 and "rngd" in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-p", "0"], "--period"),
        (["-p", "65537"], "--period"),
        (["-c", "0"], "--socket-count"),
        (["-c", "abc"], "socket-count"),
        (["-m", "0"], "--max-bytes"),
        (["-f", "/nonexistent/source"], "/nonexistent/source"),
        (["--share", "greedy"], "share"),
        (["--health-tests", "maybe"], "health-tests"),
    ],
)
def test_bad_input_exits_1_with_one_line_and_no_socket(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    base = tmp_path / "rng.sock"
    result = run("-s", str(base), *args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_socket_path_and_directory() -> None:
    result = run()
    assert result.returncode == 1 and "--socket-path" in result.stderr
    result = run("-s", "/nonexistent/dir/rng.sock")
    assert result.returncode == 1 and "/nonexistent/dir" in result.stderr


def test_unreadable_source(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root reads anything; a directory is unreadable as a source for everyone.
        source = tmp_path / "dir"
        source.mkdir()
    else:
        source = tmp_path / "secret"
        source.write_bytes(b"x")
        source.chmod(0)
    result = run("-s", str(tmp_path / "rng.sock"), "-f", str(source))
    assert result.returncode == 1 and str(source) in result.stderr
    assert not (tmp_path / "rng.sock0").exists()


def test_listens_on_numbered_sockets_and_sigterm_removes_them(
    daemon: tuple[subprocess.Popen[str], list[Path]],
) -> None:
    proc, paths = daemon
    for path in paths:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 0
    assert time.monotonic() - start < 1.0
    assert not any(p.exists() for p in paths)


def test_sigint_exits_cleanly(daemon: tuple[subprocess.Popen[str], list[Path]]) -> None:
    proc, paths = daemon
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=5) == 0
    assert not any(p.exists() for p in paths)


def test_refuses_a_path_another_daemon_listens_on(
    daemon: tuple[subprocess.Popen[str], list[Path]],
) -> None:
    _, paths = daemon
    base = str(paths[0])[:-1]
    result = run("-s", base, "-c", "1")
    assert result.returncode == 1 and "in use" in result.stderr
    assert paths[0].exists()  # the running daemon's socket was left alone


def test_never_replaces_a_file_that_is_not_a_socket(tmp_path: Path) -> None:
    victim = tmp_path / "rng.sock0"
    victim.write_text("precious")
    result = run("-s", str(tmp_path / "rng.sock"))
    assert result.returncode == 1 and "not a socket" in result.stderr
    assert victim.read_text() == "precious"


def test_replaces_a_stale_socket(tmp_path: Path) -> None:
    stale = tmp_path / "rng.sock0"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(stale))  # bound, never listening: what a crashed daemon leaves behind
    proc = subprocess.Popen([*PROG, "-s", str(tmp_path / "rng.sock")], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket(socket.AF_UNIX) as client:
                try:
                    client.connect(str(stale))
                    break
                # Refused while the stale file stands; missing for the instant between the
                # daemon's unlink and its bind.
                except (ConnectionRefusedError, FileNotFoundError):
                    assert proc.poll() is None and time.monotonic() < deadline
                    time.sleep(0.02)
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) == 0


def test_socket_mode_option(tmp_path: Path) -> None:
    base = tmp_path / "rng.sock"
    proc = subprocess.Popen([*PROG, "-s", str(base), "--socket-mode", "0660"], text=True)
    try:
        wait_for_sockets([Path(f"{base}0")], proc)
        assert stat.S_IMODE(Path(f"{base}0").stat().st_mode) == 0o660
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def test_a_host_without_an_argued_fence_is_refused_with_one_line() -> None:
    """The ring path's fence is argued for x86-64 and arm64 only: elsewhere the daemon exits
    1 with one line before it creates a socket."""
    code = (
        "import platform, sys\n"
        "platform.machine = lambda: 'riscv64'\n"
        "from rngd.cli import main\n"
        "sys.exit(main(['--socket-path', sys.argv[1]]))\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rng.sock")
        run = subprocess.run(
            [sys.executable, "-c", code, path], capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 1
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1, run.stderr
        assert "riscv64" in lines[0] and "fence" in lines[0]
        assert not os.path.exists(path + "0")
