"""contrib/qemu/50-rngd.json, the descriptor by which management tools (libvirt) find rngd.

The schema is QEMU's `docs/interop/vhost-user.json` (QAPI), written out here:

    { 'struct' : 'VhostUserBackend',
      'data'   : { 'description': 'str', 'type': 'VHostUserBackendType',
                   'binary': 'str', '*tags': [ 'str' ] } }

`@binary` is an "absolute path to the backend binary"; `VHostUserBackendType` is the enum
below. QAPI input visitors refuse members a struct does not declare, and libvirt drops every
descriptor it found when one fails to parse, so the file must be exactly this and strict JSON.

`--print-capabilities` prints a `VHostUserBackendCapabilities`: a union on `type` whose only
branches with members are `input` and `gpu`, so for `rng` it is `{"type": "rng"}` alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESCRIPTOR = ROOT / "contrib" / "qemu" / "50-rngd.json"

#: VHostUserBackendType, in QEMU's order.
BACKEND_TYPES = (
    "9p",
    "balloon",
    "block",
    "caif",
    "console",
    "crypto",
    "gpu",
    "input",
    "net",
    "rng",
    "rpmsg",
    "rproc-serial",
    "scsi",
    "vsock",
    "fs",
)
REQUIRED = {"description": str, "type": str, "binary": str}
OPTIONAL = {"tags": list}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    duplicated = sorted({key for key in keys if keys.count(key) > 1})
    if duplicated:
        raise ValueError(f"duplicate members: {duplicated}")
    return dict(pairs)


def _parse(text: str) -> Any:
    """Strict JSON: no NaN or Infinity, no duplicate members (a QAPI parser sees one)."""

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=constant)


def vhost_user_backend_problems(text: str) -> list[str]:
    """What is wrong with a descriptor, by the VhostUserBackend schema; [] if nothing."""
    try:
        obj = _parse(text)
    except ValueError as exc:
        return [f"not strict JSON: {exc}"]
    if not isinstance(obj, dict):
        return ["the root must be one object (a VhostUserBackend)"]
    problems = [f"unexpected member {key!r}" for key in obj if key not in REQUIRED | OPTIONAL]
    for key, kind in REQUIRED.items():
        if key not in obj:
            problems.append(f"missing member {key!r}")
        elif not isinstance(obj[key], kind):
            problems.append(f"{key!r} must be a {kind.__name__}")
    if "tags" in obj and not (
        isinstance(obj["tags"], list) and all(isinstance(tag, str) for tag in obj["tags"])
    ):
        problems.append("'tags' must be a list of strings")
    if isinstance(obj.get("type"), str) and obj["type"] not in BACKEND_TYPES:
        problems.append(f"'type' {obj['type']!r} is not a VHostUserBackendType")
    if isinstance(obj.get("binary"), str) and not obj["binary"].startswith("/"):
        problems.append("'binary' must be an absolute path")
    return problems


def test_descriptor_matches_qemus_schema() -> None:
    text = DESCRIPTOR.read_text()
    assert vhost_user_backend_problems(text) == []
    obj = json.loads(text)
    assert obj["type"] == "rng"
    assert obj["description"].strip()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"description": "d", "type": "rng", "binary": "/b",}', "not strict JSON"),
        ('// rngd\n{"description": "d", "type": "rng", "binary": "/b"}', "not strict JSON"),
        ('{"description": "d", "type": "rng", "type": "rng", "binary": "/b"}', "duplicate"),
        ('[{"description": "d", "type": "rng", "binary": "/b"}]', "one object"),
        ('{"type": "rng", "binary": "/b"}', "missing member 'description'"),
        ('{"description": "d", "type": "random", "binary": "/b"}', "not a VHostUserBackendType"),
        ('{"description": "d", "type": "rng", "binary": "b"}', "absolute path"),
        ('{"description": "d", "type": "rng", "binary": "/b", "tags": "x"}', "list of strings"),
        ('{"description": "d", "type": "rng", "binary": "/b", "args": []}', "unexpected member"),
    ],
)
def test_the_schema_check_catches(text: str, problem: str) -> None:
    """The checks above are real: each of these malformed descriptors is refused."""
    problems = vhost_user_backend_problems(text)
    assert any(problem in p for p in problems), problems


def test_descriptor_agrees_with_print_capabilities() -> None:
    """The descriptor names a console script this package installs, and that program's
    --print-capabilities (run from this environment's bin) gives the descriptor's type."""
    obj = json.loads(DESCRIPTOR.read_text())
    binary = Path(obj["binary"])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert binary.name in scripts, (binary.name, scripts)
    installed = Path(sys.executable).parent / binary.name
    assert installed.is_file(), f"{installed} missing: pip install -e . first"
    out = subprocess.run(
        [str(installed), "--print-capabilities"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    capabilities = _parse(out)
    # VHostUserBackendCapabilities: the base member `type`, and no branch members for "rng".
    assert capabilities == {"type": obj["type"]}, out


def test_descriptor_binary_is_where_the_unit_runs_it() -> None:
    """One install location for both: the systemd unit's ExecStart and the descriptor."""
    obj = json.loads(DESCRIPTOR.read_text())
    unit = (ROOT / "contrib" / "systemd" / "rngd@.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.split("=", 1)[1].split()[0] == obj["binary"]
