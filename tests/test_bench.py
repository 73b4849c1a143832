"""scripts/bench end to end, briefly: every workload is measured and lands in the JSON.

No figure is compared with anything: timings belong to the benchmark, not to the tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench"

WORKLOADS = {
    "latency": ("p50_us", "p99_us", "cpu_us_per_req", "req_per_s"),
    "ring-512": ("mb_per_s", "req_per_s", "cpu_us_per_req", "ratio_to_raw"),
    "ring-4k": ("mb_per_s", "req_per_s", "cpu_us_per_req", "ratio_to_raw"),
    "ring-64k": ("mb_per_s", "req_per_s", "cpu_us_per_req", "ratio_to_raw"),
    "guests-1": ("mb_per_s", "req_per_s", "cpu_us_per_req", "ratio_to_one_guest"),
    "guests-2": ("mb_per_s", "req_per_s", "cpu_us_per_req", "ratio_to_one_guest"),
    "guests-8": ("mb_per_s", "req_per_s", "cpu_us_per_req", "ratio_to_one_guest"),
    "rss": ("kib_per_guest", "rss_after_kib"),
    "wakeups": ("seconds",),
}


def test_quick_run_reports_every_workload(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(BENCH.parent.parent)},
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert list(report["workloads"]) == list(WORKLOADS)
    assert [b["name"] for b in report["backends"]] == ["rngd"]
    for key, figures in WORKLOADS.items():
        results = report["workloads"][key]["results"]
        for name in (
            ("raw", "rngd") if key in ("latency", "ring-512", "ring-4k", "ring-64k") else ("rngd",)
        ):
            for figure in figures if name == "rngd" else ("mb_per_s", "cpu_us_per_req"):
                assert results[name][figure] > 0, (key, name, figure, results[name])
    # Idle wake-ups may well be none at all.
    assert report["workloads"]["wakeups"]["results"]["rngd"]["per_s"] >= 0
    # The table names every workload too, one row each.
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(WORKLOADS)
