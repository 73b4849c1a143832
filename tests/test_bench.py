"""scripts/bench end to end, briefly: every workload is measured and lands in the JSON; a rate
limit reaches every back-end; the instruction counts' parts (callgrind runs, their difference,
the count-bounded and settled guest runs) work on real processes.

No figure is compared with a timing: timings belong to the benchmark, not to the tests. What is
checked are counts (requests, kicks, bytes under a limit) and that instruction counts exist.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from rngd.testing.callgrind import (
    CallgrindError,
    Count,
    count_process,
    per_request,
    read_instructions,
    require_elf,
)
from rngd.testing.loadgen import Guest
from rngd.testing.qemu import Rngd, RngdOptions

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench"
FLOOR = ROOT / "rngd" / "testing" / "floor.py"

SINGLE = ("p50_us", "p99_us", "cpu_us_per_req", "req_per_s")
WORKLOADS = {
    "latency": SINGLE,
    "many-single": SINGLE,
    "ring-512": ("mb_per_s", "req_per_s", "cpu_us_per_req", "ratio_to_raw"),
    "ring-4k": ("mb_per_s", "req_per_s", "cpu_us_per_req", "ratio_to_raw"),
    "ring-64k": ("mb_per_s", "req_per_s", "cpu_us_per_req", "ratio_to_raw"),
    "guests-1": ("mb_per_s", "req_per_s", "cpu_us_per_req", "ratio_to_one_guest"),
    "guests-2": ("mb_per_s", "req_per_s", "cpu_us_per_req", "ratio_to_one_guest"),
    "guests-8": ("mb_per_s", "req_per_s", "cpu_us_per_req", "ratio_to_one_guest"),
    "rss": ("kib_per_guest", "rss_after_kib"),
    "wakeups": ("seconds",),
}


def _bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 0, run.stderr
    report: dict[str, Any] = json.loads(out.read_text())
    return run, report


def test_quick_run_reports_every_workload(tmp_path: Path) -> None:
    run, report = _bench(tmp_path)
    assert list(report["workloads"]) == list(WORKLOADS)
    assert [b["name"] for b in report["backends"]] == ["rngd"]
    for key, figures in WORKLOADS.items():
        results = report["workloads"][key]["results"]
        for name in (
            ("raw", "rngd") if key in ("latency", "ring-512", "ring-4k", "ring-64k") else ("rngd",)
        ):
            for figure in figures if name == "rngd" else ("mb_per_s", "cpu_us_per_req"):
                assert results[name][figure] > 0, (key, name, figure, results[name])
    # Every one of the 8 guests had requests served.
    many = report["workloads"]["many-single"]["results"]["rngd"]
    assert many["guests"] == 8
    assert all(rate > 0 for rate in many["per_guest_mb_per_s"]), many
    # Idle wake-ups may well be none at all.
    assert report["workloads"]["wakeups"]["results"]["rngd"]["per_s"] >= 0
    # The table names every workload too, one row each.
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(WORKLOADS)
    assert "No rate limit." in run.stdout
    assert "instructions" not in report


def test_rate_limit_reaches_the_daemon(tmp_path: Path) -> None:
    """640 bytes per 100 ms: ten 64-byte requests a period, for one guest and for eight."""
    max_bytes, period_ms = 640, 100
    run, report = _bench(
        tmp_path,
        "--workloads",
        "latency,many-single",
        "--max-bytes",
        str(max_bytes),
        "--period",
        str(period_ms),
    )
    config = report["config"]
    assert (config["max_bytes"], config["period"]) == (max_bytes, period_ms)
    (rngd,) = report["backends"]
    command = rngd["command"]
    assert command[command.index("--max-bytes") + 1] == str(max_bytes)
    assert command[command.index("--period") + 1] == str(period_ms)
    for key in ("latency", "many-single"):
        figures = report["workloads"][key]["results"]["rngd"]
        # A window of S seconds touches at most ceil(S / period) + 1 periods. Unlimited,
        # the daemon serves thousands of requests in the same window.
        periods = math.ceil(figures["seconds"] / (period_ms / 1000)) + 1
        assert 0 < figures["bytes"] <= periods * max_bytes, (key, figures)
    assert f"--max-bytes {max_bytes} --period {period_ms}" in run.stdout


def test_count_bounded_and_settled_guest_runs(tmp_path: Path) -> None:
    """The runs --instructions makes, natively: N requests served, each single one after the
    daemon slept (so each needed a kick), and a full ring's tail counted in ``served``."""
    with Rngd(RngdOptions(tmp_path / "rng.sock", 1)) as daemon:
        daemon.wait_listening()
        guest = Guest(str(daemon.sockets[0]), daemon.proc.pid)
        try:
            guest.start(4, 64)
            far = time.monotonic_ns() + 60_000_000_000
            window = guest.run("single", far, 25, settle=True)
            assert window.requests == window.served == 25
            assert window.bytes == 25 * 64
            assert window.kicks == 25
            guest.start(256, 512)
            window = guest.run("full", far, 1000)
            assert 1000 <= window.requests <= window.served <= window.requests + 256
        finally:
            guest.close()
        assert daemon.stop() in (0, -15), daemon.log()


needs_valgrind = pytest.mark.skipif(
    shutil.which("valgrind") is None and os.environ.get("CI", "").lower() != "true",
    reason="valgrind is not installed (scripts/test installs it)",
)


@needs_valgrind
def test_callgrind_counts_a_real_loop_by_difference(tmp_path: Path) -> None:
    """The bare-Python floor under callgrind at two lengths: start-up drops out of the
    difference, and what is left per iteration is a Python loop's worth of instructions."""
    counts = [
        count_process(
            [sys.executable, "-P", str(FLOOR), str(n)], str(tmp_path / f"{n}.out"), n, 120
        )
        for n in (100, 600)
    ]
    short, long = counts
    assert short.instructions > 1_000_000  # the interpreter's start-up alone
    assert long.instructions > short.instructions
    assert read_instructions(str(tmp_path / "600.out")) == long.instructions
    each = per_request(short, long)
    assert each == (long.instructions - short.instructions) / 500
    # A few thousand instructions per iteration: more than its system calls' wrappers, far
    # less than the start-up that the difference removed.
    assert 1_000 < each < 100_000, each
    assert each < short.instructions / 100


def test_callgrind_errors(tmp_path: Path) -> None:
    script = tmp_path / "wrapper"
    script.write_text('#!/bin/sh\nexec python3 "$@"\n')
    script.chmod(0o755)
    with pytest.raises(CallgrindError, match="not an ELF"):
        require_elf(str(script))
    with pytest.raises(CallgrindError, match="no callgrind output"):
        read_instructions(str(tmp_path / "missing.out"))
    garbled = tmp_path / "garbled.out"
    garbled.write_text("events: Dr\ntotals: 12\n")
    with pytest.raises(CallgrindError, match="Ir"):
        read_instructions(str(garbled))
    with pytest.raises(CallgrindError, match="long run"):
        per_request(Count(100, 5_000), Count(100, 9_000))
    assert require_elf(sys.executable)


def test_ring_threads_script_briefly(tmp_path: Path) -> None:
    """`scripts/ring-threads` in brief: both shapes (a thread per ring, one thread for every
    ring) serve every request the pretend guests post, in the number of threads they claim,
    and their figures land in the JSON."""
    figures_path = tmp_path / "ring-threads.json"
    result = subprocess.run(
        [
            *(sys.executable, str(ROOT / "scripts" / "ring-threads")),
            *("--rings", "3", "--requests", "600", "--rounds", "2", "--json", str(figures_path)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| a thread per ring |" in result.stdout and "| one thread |" in result.stdout
    figures = json.loads(figures_path.read_text())
    for shape, threads in (("threads", 3 + 1), ("shared", 1)):
        rounds = figures["rounds"][shape]
        assert len(rounds) == 2
        for figure in rounds:
            assert figure["requests"] >= 600
            assert figure["threads"] == threads
            assert figure["cpu_us"] > 0 and figure["switches"] > 0
