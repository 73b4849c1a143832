"""scripts/bench-health end to end, briefly: both rates and their ratio land in the JSON.

No figure is compared with anything: timings belong to the benchmark, not to the tests. This
keeps the script working against scripts/bench's options and JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench-health"


def test_quick_run_reports_both_rates(tmp_path: Path) -> None:
    out = tmp_path / "health.json"
    run = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--size",
            str(512 << 20),
            "--dir",
            str(tmp_path),
            "--seconds",
            "0.02",
            "--rounds",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(SCRIPT.parent.parent)},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert all(figures[key] > 0 for key in ("on", "off", "raw", "ratio")), figures
    assert "| on / off |" in run.stdout
    assert not list(tmp_path.glob("rngd-bench-health-*")), "the file written is removed"
