#!/usr/bin/env python3
"""Benchmark the bandwidth limit through the real daemon: rate, fairness, refill latency.

For 1, 2 and 8 guests in both ``--share`` modes it starts ``python -m rngd`` with
``--max-bytes`` per ``--period``, connects one `rngd.testing.Frontend` per socket (QEMU 7.2's
sequence) and has every guest keep its whole ring full of ``--chunk``-byte buffers, so that
the budget, not the guests, is the limit. Over ``--periods`` whole periods it reports:

* delivered / configured: bytes completed divided by ``periods * max_bytes``, and the same
  for the worst single period;
* Jain's fairness index of the bytes each guest got (1.0 = equal, 1/n = one guest got all);
* refill -> first completion: per guest and period, from the refill to the first completion
  the guest sees (median and max, in ms).

The daemon's windows start at its first request, which this script makes alone, at a known
time: refills are taken to be at ``t0 + k*period`` where ``t0`` is when that request was
posted. The true epoch is later by at most its round trip, printed as ``epoch uncertainty``;
the latencies are upper bounds by that much. The machine's load shows in the latencies: the
guests here are Python too, and share the CPUs with the daemon.

Run with the project's venv, e.g. ``.venv/bin/python scripts/bench_bandwidth.py``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
from dataclasses import dataclass

import trio

from rngd.testing import DriverQueue, Frontend, daemon_process

Completion = tuple[float, int]  # trio time the guest saw it, bytes


@dataclass
class Result:
    guests: int
    share: str
    rate: float
    worst_period: float
    jain: float
    latency_ms: list[float]
    epoch_uncertainty_ms: float


def jain(xs: list[int]) -> float:
    squares = sum(x * x for x in xs)
    return sum(xs) ** 2 / (len(xs) * squares) if squares else 0.0


async def keep_ring_full(queue: DriverQueue, chunk: int, log: list[Completion]) -> None:
    """A guest that always has every descriptor of its ring posted."""
    while True:
        while queue.free_descriptors:
            queue.post(chunk, publish=False)
        queue.publish()
        queue.kick()
        for used in await queue.wait_used():
            log.append((trio.current_time(), used.len))


async def run_case(guests: int, share: str, args: argparse.Namespace) -> Result:
    period = args.period_ms / 1000
    with tempfile.TemporaryDirectory(prefix="rngd-bench-") as tmp:
        async with daemon_process(
            os.path.join(tmp, "rng.sock"),
            socket_count=guests,
            filename=args.source,
            max_bytes=args.max_bytes,
            period_ms=args.period_ms,
            log_level="warning",
            extra_args=["--share", share],
        ) as daemon:
            vmms = [await Frontend.connect(path) for path in daemon.socket_paths]
            try:
                queues = [await vmm.start_qemu72(queue_size=args.queue_size) for vmm in vmms]
                logs: list[list[Completion]] = [[] for _ in range(guests)]
                # One lone request starts the daemon's windows between t0 and its completion.
                t0 = trio.current_time()
                queues[0].post(args.chunk)
                queues[0].kick()
                await queues[0].wait_used()
                first = trio.current_time()
                async with trio.open_nursery() as nursery:
                    # Window 0 is partial (guests starting); then `periods` whole ones, then a
                    # little more so the last one's completions are all in.
                    nursery.cancel_scope.deadline = t0 + (args.periods + 1.25) * period
                    for queue, log in zip(queues, logs, strict=True):
                        nursery.start_soon(keep_ring_full, queue, args.chunk, log)
            finally:
                for vmm in vmms:
                    await vmm.aclose()

    per_guest = [0] * guests
    per_period = [0] * (args.periods + 1)
    latency_ms: list[float] = []
    for g, log in enumerate(logs):
        seen: set[int] = set()
        for t, n in log:  # in the order the guest saw them
            k = math.floor((t - t0) / period)
            if not 1 <= k <= args.periods:
                continue
            per_guest[g] += n
            per_period[k] += n
            if k not in seen:
                seen.add(k)
                latency_ms.append((t - (t0 + k * period)) * 1000)
    return Result(
        guests=guests,
        share=share,
        rate=sum(per_guest) / (args.periods * args.max_bytes),
        worst_period=min(per_period[1:]) / args.max_bytes,
        jain=jain(per_guest),
        latency_ms=latency_ms,
        epoch_uncertainty_ms=(first - t0) * 1000,
    )


async def unthrottled_capacity(args: argparse.Namespace) -> float:
    """Bytes per second one guest gets with no limit: the budget must stay well below it."""
    with tempfile.TemporaryDirectory(prefix="rngd-bench-") as tmp:
        async with (
            daemon_process(
                os.path.join(tmp, "rng.sock"), filename=args.source, log_level="warning"
            ) as daemon,
            await Frontend.connect(daemon.socket_paths[0]) as vmm,
        ):
            queue = await vmm.start_qemu72(queue_size=args.queue_size)
            log: list[Completion] = []
            start = trio.current_time()
            with trio.move_on_after(1.0):
                await keep_ring_full(queue, args.chunk, log)
            return sum(n for _, n in log) / (trio.current_time() - start)


async def main(args: argparse.Namespace) -> None:
    capacity = await unthrottled_capacity(args)
    configured = args.max_bytes / (args.period_ms / 1000)
    print(
        f"budget {args.max_bytes} bytes per {args.period_ms} ms ({configured / 1000:.0f} kB/s); "
        f"one unthrottled guest gets {capacity / 1000:.0f} kB/s; "
        f"{args.queue_size} x {args.chunk}-byte buffers per ring; {args.periods} periods\n"
    )
    print(
        "| guests | share | delivered / configured | worst period | Jain index | "
        "refill -> first completion, median / max (ms) | epoch uncertainty (ms) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    for guests in args.guests:
        for share in args.share:
            r = await run_case(guests, share, args)
            median = statistics.median(r.latency_ms) if r.latency_ms else math.nan
            worst = max(r.latency_ms, default=math.nan)
            print(
                f"| {r.guests} | {r.share} | {r.rate:.3f} | {r.worst_period:.3f} | {r.jain:.4f} | "
                f"{median:.2f} / {worst:.2f} | {r.epoch_uncertainty_ms:.2f} |",
                flush=True,
            )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-bytes", type=int, default=16384)
    parser.add_argument("--period-ms", type=int, default=100)
    parser.add_argument("--periods", type=int, default=20, help="whole periods measured (>= 10)")
    parser.add_argument("--guests", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--share", nargs="+", default=["split", "fair"])
    parser.add_argument("--chunk", type=int, default=64, help="bytes per buffer (Linux: 64)")
    parser.add_argument("--queue-size", type=int, default=16)
    parser.add_argument("--source", default="/dev/urandom")
    args = parser.parse_args()
    if args.periods < 10:
        parser.error("--periods must be at least 10")
    return args


if __name__ == "__main__":
    trio.run(main, parse_args())
