"""The vhost-user back-end program conventions: `--fd` and `--print-capabilities`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import trio

from rngd.testing import Frontend

PROG = [sys.executable, "-P", "-m", "rngd"]


def test_print_capabilities() -> None:
    result = subprocess.run(
        [*PROG, "--print-capabilities"], capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout) == {"type": "rng"}


async def test_serves_an_already_connected_socket_then_exits(source: tuple[str, bytes]) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs:
        proc = await trio.lowlevel.open_process(
            [*PROG, "--fd", str(theirs.fileno()), "-f", source[0]], pass_fds=[theirs.fileno()]
        )
    try:
        with trio.fail_after(10):
            async with Frontend(trio.socket.from_stdlib_socket(ours), "fd") as vmm:
                await vmm.start_qemu72(queue_size=4)
                assert await vmm.read_random(256) == source[1][:256]
            # The VMM hung up: a --fd back-end has nothing left to serve.
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_fd_must_be_a_socket_and_excludes_socket_path() -> None:
    result = subprocess.run(
        [*PROG, "--fd", "0"], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 1 and "not a socket" in result.stderr
    result = subprocess.run(
        [*PROG, "--fd", "0", "-s", "/tmp/x.sock"], capture_output=True, text=True
    )
    assert result.returncode == 1 and "exclude" in result.stderr
