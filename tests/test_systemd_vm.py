"""The shipped units under a real systemd as PID 1: `scripts/systemd-vm` as a test.

It builds (or reuses, from .cache/systemd-vm) a Debian 12 image with mmdebstrap, boots it under
QEMU and checks socket activation, STATUS=, the sandbox, a /dev/hwrng variant, --allow-uid
with PrivateUsers=, `systemctl stop` and `systemd-analyze security` inside (see
rngd/testing/systemd_vm.py). Root and a Debian mirror are needed to build the image; without
them the test skips, except under CI (CI=true), where it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import NoReturn

import pytest

from rngd.testing.systemd_vm import CHECKS, default_cache_dir

pytestmark = [pytest.mark.qemu, pytest.mark.systemd_vm]


def _unavailable(message: str) -> NoReturn:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the systemd VM: {message}")
    pytest.skip(message)


def test_shipped_units_under_systemd_as_pid1() -> None:
    cached = any(default_cache_dir().glob("*/ok"))
    if not cached and os.geteuid() != 0:
        _unavailable("building the VM image needs root (mmdebstrap)")
    if not cached and shutil.which("mmdebstrap") is None:
        _unavailable("mmdebstrap not found (apt-get install mmdebstrap)")
    if shutil.which("qemu-system-x86_64") is None:
        _unavailable("qemu-system-x86_64 not found")
    result = subprocess.run(
        [sys.executable, "-m", "rngd.testing.systemd_vm"],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    for name in CHECKS:
        assert f"RNGD-VM ok {name} " in result.stdout, name
