#!/usr/bin/env python3
"""Throughput and memory of rngd, as ratios against raw reads of the same source.

Runs a real daemon process and plays the guest with `rngd.testing` (itself Python, on the same
cores, so the ratios are conservative). Prints a markdown table:

* latency-bound: one 64-byte buffer in flight, as the Linux virtio-rng driver does;
* throughput-bound: a 256-entry ring kept full of 4 KiB buffers;
* the notification floor: a bare process that answers each kick with a call, nothing else;
* memory: the daemon's RSS idle and with guests connected.

Usage: scripts/bench_throughput.py [--seconds S] [--source FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import trio

from rngd.testing import Frontend, daemon_process


def raw_rate(source: str, chunk: int, seconds: float) -> float:
    """Reads per second of `chunk` bytes with os.readv into a reused buffer (the baseline)."""
    fd = os.open(source, os.O_RDONLY)
    buffer = memoryview(bytearray(chunk))
    count, start = 0, time.perf_counter()
    try:
        while (elapsed := time.perf_counter() - start) < seconds:
            for _ in range(256):
                if os.readv(fd, [buffer]) < chunk:
                    os.lseek(fd, 0, os.SEEK_SET)
            count += 256
    finally:
        os.close(fd)
    return count / elapsed


# The floor of a 64-byte request's cost: a process that answers each kick eventfd with a call,
# doing nothing else, in the same trio wake-up pattern rngd uses.
_ECHO = """
import os, sys, trio
kick, call = int(sys.argv[1]), int(sys.argv[2])
async def main():
    while True:
        await trio.lowlevel.wait_readable(kick)
        os.read(kick, 8)
        os.write(call, (1).to_bytes(8, "little"))
trio.run(main)
"""


async def echo_rate(seconds: float) -> float:
    """Kick/call round trips per second against a bare echo process (the notification floor)."""
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", _ECHO, str(kick), str(call)], pass_fds=[kick, call]
    )
    try:
        count, start = 0, trio.current_time()
        while (elapsed := trio.current_time() - start) < seconds:
            os.write(kick, (1).to_bytes(8, "little"))
            await trio.lowlevel.wait_readable(call)
            os.read(call, 8)
            count += 1
        return count / elapsed
    finally:
        proc.kill()
        await proc.wait()
        os.close(kick)
        os.close(call)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def rngd_rate(
    path: str, *, chunk: int, queue_size: int, in_flight: int | None, seconds: float
) -> float:
    """Requests per second a guest completes through rngd."""
    async with await Frontend.connect(path) as vmm:
        await vmm.start_qemu72(queue_size=queue_size)
        batch = chunk * (1 if in_flight == 1 else queue_size) * 16
        await vmm.read_random(batch, chunk, in_flight=in_flight)  # warm-up
        total, start = 0, trio.current_time()
        while (elapsed := trio.current_time() - start) < seconds:
            total += len(await vmm.read_random(batch, chunk, in_flight=in_flight))
        await vmm.stop()
    return total / chunk / elapsed


async def main(seconds: float, source: str) -> None:
    rows: list[tuple[str, str, str, str]] = []
    latency_bound = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        async with daemon_process(
            os.path.join(tmp, "rng.sock"), socket_count=4, filename=source, log_level="warning"
        ) as daemon:
            idle = rss_kib(daemon.pid)
            floor = await echo_rate(seconds)
            for label, chunk, size, in_flight in (
                ("64 B, one in flight (Linux driver)", 64, 4, 1),
                ("4 KiB, ring of 256 kept full", 4096, 256, None),
            ):
                raw = raw_rate(source, chunk, seconds)
                got = await rngd_rate(
                    f"{tmp}/rng.sock0",
                    chunk=chunk,
                    queue_size=size,
                    in_flight=in_flight,
                    seconds=seconds,
                )
                if in_flight == 1:
                    latency_bound = got
                rows.append(
                    (
                        label,
                        f"{got:,.0f} req/s ({got * chunk / 1e6:.1f} MB/s)",
                        f"{raw:,.0f} reads/s ({raw * chunk / 1e6:.1f} MB/s)",
                        f"{got / raw:.3f}",
                    )
                )
            async with trio.open_nursery() as nursery:
                vmms = [await Frontend.connect(f"{tmp}/rng.sock{i}") for i in range(4)]
                for vmm in vmms:
                    await vmm.start_qemu72(queue_size=256)
                    await vmm.read_random(4096)
                busy = rss_kib(daemon.pid)
                for vmm in vmms:
                    await vmm.aclose()
                nursery.cancel_scope.cancel()
    print(f"source {source}, {seconds:.0f} s per measurement\n")
    print("| workload | through rngd | raw reads of the source | ratio |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(
        f"\nnotification floor (a bare process answering each kick with a call): "
        f"{floor:,.0f} round trips/s; rngd's 64 B rate is {f'{latency_bound / floor:.2f}'} of it"
    )
    print(
        f"\ndaemon RSS: {idle / 1024:.1f} MiB idle, {busy / 1024:.1f} MiB with 4 guests "
        f"connected ({(busy - idle) / 4:.0f} KiB per guest, memory maps not counted until touched)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--source", default="/dev/urandom")
    args = parser.parse_args()
    trio.run(main, args.seconds, args.source)
