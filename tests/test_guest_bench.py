"""The pure parts of `rngd-qemu compare` (rngd/testing/guest_bench.py): the order of the boots,
the paired ratios, the tables, the CPU clock. The comparison itself is in tests/test_qemu.py."""

from __future__ import annotations

import os
import threading

import pytest

from rngd.testing.guest_bench import (
    BUILTIN,
    Backend,
    Run,
    against_backend,
    cpu_seconds,
    markdown,
    rotated,
    summarize,
)
from rngd.testing.qemu import QemuError

BACKENDS = [Backend(BUILTIN, None), Backend("rngd", ("python", "-m", "rngd")), Backend("x", ("x",))]


def run(round_: int, backend: str, seconds: float, cpu: float | None = 0.02) -> Run:
    return Run(
        round=round_,
        position=1,
        backend=backend,
        nbytes=1000,
        guest_seconds=seconds,
        host_seconds=seconds + 0.01,
        boot_seconds=5.0,
        current="virtio_rng.0",
        backend_cpu_seconds=None if backend == BUILTIN else cpu,
        backend_cpu_read_seconds=None if backend == BUILTIN else cpu,
        qemu_cpu_read_seconds=0.1,
    )


def test_rounds_interleave_and_rotate() -> None:
    orders = [[b.name for b in rotated(BACKENDS, r)] for r in (1, 2, 3, 4)]
    assert orders == [
        [BUILTIN, "rngd", "x"],
        ["rngd", "x", BUILTIN],
        ["x", BUILTIN, "rngd"],
        [BUILTIN, "rngd", "x"],
    ]


def test_ratios_pair_each_round_with_its_builtin_boot() -> None:
    runs = [
        run(1, BUILTIN, 1.0),
        run(1, "rngd", 2.0),
        run(2, BUILTIN, 0.5),
        run(2, "rngd", 2.0),
        run(3, BUILTIN, 1.0),
        run(3, "rngd", 1.0),
    ]
    builtin, rngd = summarize(runs, BACKENDS[:2])
    assert builtin.ratios == [1.0, 1.0, 1.0]
    assert rngd.rates == [500.0, 500.0, 1000.0]
    assert rngd.ratios == [0.5, 0.25, 1.0]
    assert rngd.median_ratio == 0.5  # the median of the paired ratios, not a ratio of medians
    assert rngd.median_rate == 500.0
    assert rngd.median_backend_cpu_ms == pytest.approx(20.0)
    assert builtin.median_backend_cpu_ms is None
    table = markdown(runs, [builtin, rngd])
    assert (
        "| rngd | 500 | 0.50 | 0.50, 0.25, 1.00 | 500, 500, 1,000 | 20.0 | 20.0 | 100.0 |" in table
    )
    assert (
        "| 2 | 1 | rngd | 1000 | 2.000 | 2.010 | 500 | 0.25 | 20.0 | 20.0 | 100.0 | 5.0 |" in table
    )
    assert "| built-in | 1,000 | 1.00 |" in table and "| - | - |" in table


def test_cpu_seconds_counts_threads_that_ended() -> None:
    before = cpu_seconds(os.getpid())

    def spin() -> None:
        sum(range(3_000_000))

    worker = threading.Thread(target=spin)
    worker.start()
    worker.join()
    assert cpu_seconds(os.getpid()) - before >= 0.01


def test_against_names_and_checks_the_program() -> None:
    taken = {BUILTIN, "rngd"}
    first = against_backend("sh -c true", taken)
    second = against_backend("sh", taken)
    assert (first.name, second.name) == ("sh", "sh#2")
    assert first.program is not None and first.program[1:] == ("-c", "true")
    assert os.path.isabs(first.program[0])
    with pytest.raises(QemuError):
        against_backend("/nonexistent/backend", taken)
