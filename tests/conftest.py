"""Fixtures shared by the tests that run a daemon: a work directory, a source file, sockets."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest
import trio.testing

from rngd.testing import daemon_in_process

SOURCE_SIZE = 1 << 20


@pytest.fixture
def workdir() -> Iterator[str]:
    # Not tmp_path: parametrized test names make paths longer than sun_path's 108 bytes.
    path = tempfile.mkdtemp(prefix="rngd-test-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def source(workdir: str) -> tuple[str, bytes]:
    """A file of random bytes to serve with -f, and its contents to compare against."""
    data = os.urandom(SOURCE_SIZE)
    path = os.path.join(workdir, "entropy")
    with open(path, "wb") as f:
        f.write(data)
    return path, data


@pytest.fixture
async def socks(source: tuple[str, bytes], workdir: str) -> AsyncIterator[list[str]]:
    """An in-process daemon serving `source` on two sockets."""
    async with daemon_in_process(
        os.path.join(workdir, "rng.sock"), filename=source[0], socket_count=2
    ) as paths:
        yield paths


@pytest.fixture
def threaded_autojump_clock() -> trio.testing.MockClock:
    """trio's autojump MockClock for tests of a daemon whose vrings run in worker threads:
    trio cannot see their work, so time jumps only once trio has been idle for a while of real
    time, not the moment it is. pytest-trio runs a test on whichever Clock a fixture returns."""
    return trio.testing.MockClock(autojump_threshold=0.25)
