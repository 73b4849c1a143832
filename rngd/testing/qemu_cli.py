"""The `rngd-qemu` helper (scripts/rngd-qemu): `rngd-qemu compare ...` is the real-guest
comparison (`rngd.testing.guest_bench`), any other command line boots guests
(`rngd.testing.qemu`).

The dispatch is here, apart from both, so that `guest_bench` imports `qemu` and not the
other way round as well.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rngd.testing import guest_bench, qemu


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:
        return guest_bench.main(argv[1:])
    return qemu.boot(argv)
