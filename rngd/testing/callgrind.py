"""User-space instructions per request, counted by valgrind's callgrind: for `scripts/bench`.

A count is the difference between two runs of different lengths of the same process, so that
start-up and shutdown, whatever they cost, drop out: ``(I_long - I_short) / (R_long -
R_short)``. Each run is a whole process under ``valgrind --tool=callgrind`` whose out file's
``totals:`` line gives its instructions (the ``Ir`` event: user space only, every thread of the
process summed).

Valgrind must run the program itself: a shell wrapper (pyenv's shims, for one) would be what it
counts, and with ``--trace-children=no`` the real program would run natively, uncounted.
`callgrind_command` refuses anything but an ELF file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

VALGRIND = "valgrind"


class CallgrindError(Exception):
    pass


def valgrind() -> str:
    """The valgrind binary; CallgrindError if it is not installed."""
    path = shutil.which(VALGRIND)
    if path is None:
        raise CallgrindError("valgrind is not installed (Debian: apt-get install valgrind)")
    return path


def require_elf(program: str) -> str:
    """``program``'s path if it is an executable ELF file (symlinks followed)."""
    path = program if os.sep in program else shutil.which(program)
    if path is None or not os.access(path, os.X_OK):
        raise CallgrindError(f"{program}: not an executable file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"\x7fELF":
        raise CallgrindError(
            f"{program}: not an ELF binary (a script or wrapper?): valgrind would count it, "
            "not the program it runs"
        )
    return path


def callgrind_command(out_file: str, argv: Sequence[str]) -> list[str]:
    """``argv`` under callgrind, its counts to ``out_file``; its children run uncounted.

    A Python program runs with a fixed hash seed: string hashes decide how many probes each
    dict lookup of its start-up takes, and with a seed drawn per run the start-ups of the
    short and the long run differed by up to a million instructions, which then did not
    drop out (a request's count moved by 3% from one pair of runs to the next).
    """
    require_elf(argv[0])
    return [
        "env",
        "PYTHONHASHSEED=0",
        valgrind(),
        "--tool=callgrind",
        "--trace-children=no",
        f"--callgrind-out-file={out_file}",
        *argv,
    ]


def read_instructions(out_file: str) -> int:
    """The ``Ir`` total of a callgrind out file (its ``totals:`` line, else ``summary:``)."""
    events: list[str] | None = None
    totals: list[int] | None = None
    summary: list[int] | None = None
    try:
        with open(out_file, errors="replace") as f:
            for line in f:
                if line.startswith("events:"):
                    events = line.split()[1:]
                elif line.startswith("totals:"):
                    totals = [int(word) for word in line.split()[1:]]
                elif line.startswith("summary:"):
                    summary = [int(word) for word in line.split()[1:]]
    except FileNotFoundError:
        raise CallgrindError(
            f"no callgrind output {out_file}: the process did not exit cleanly"
        ) from None
    figures = totals if totals is not None else summary
    if events is None or "Ir" not in events or figures is None:
        raise CallgrindError(f"{out_file}: no events/totals lines with Ir")
    index = events.index("Ir")
    if index >= len(figures):
        raise CallgrindError(f"{out_file}: totals line shorter than the events line")
    return figures[index]


@dataclass(frozen=True)
class Count:
    """One run under callgrind: the requests it served and the instructions it took."""

    requests: int
    instructions: int


def per_request(short: Count, long: Count) -> float:
    """Instructions per request from two runs of different lengths."""
    if long.requests <= short.requests:
        raise CallgrindError(
            f"the long run served {long.requests} requests, the short {short.requests}"
        )
    return (long.instructions - short.instructions) / (long.requests - short.requests)


def count_process(argv: Sequence[str], out_file: str, requests: int, timeout: float) -> Count:
    """Run ``argv`` to its end under callgrind (a process that serves ``requests`` requests
    and exits 0); its count."""
    run = subprocess.run(
        callgrind_command(out_file, argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=timeout,
        check=False,
    )
    if run.returncode != 0:
        tail = run.stderr.decode(errors="replace")[-2000:]
        raise CallgrindError(f"{argv[0]} exited with {run.returncode} under callgrind:\n{tail}")
    return Count(requests, read_instructions(out_file))
