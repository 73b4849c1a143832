"""A driver polling the used ring never sees its index go backwards: the device writes each
index with one store. (struct.pack_into zeroes a field before writing it; a poller on another core
saw used idx 0 dozens of times a second with a full ring, which Linux would take for a
broken device.)"""

from __future__ import annotations

import os
import threading

import trio

from rngd.testing import Frontend, daemon_process

SECONDS = 2.0
SIZE = 256


async def test_used_index_never_seen_going_backwards(workdir: str) -> None:
    async with (
        daemon_process(
            os.path.join(workdir, "rng.sock"), filename="/dev/urandom", log_level="warning"
        ) as daemon,
        await Frontend.connect(daemon.socket_paths[0]) as vmm,
    ):
        queue = await vmm.start_qemu72(queue_size=SIZE)
        region = next(r for r in queue.memory.regions if r.contains(queue.used_ring, 4))
        offset = region.spec.mmap_offset + queue.used_ring - region.spec.guest_phys_addr
        used_header = memoryview(region._map)[offset : offset + 4].cast("H")
        jumps: list[tuple[int, int]] = []
        stop = threading.Event()

        def poll() -> None:
            # A thread, not a task: it must read while the daemon (another process, on the
            # other core) writes, as a guest vCPU would.
            last = used_header[1]
            while not stop.is_set():
                now = used_header[1]
                # Forward moves can be long (this thread waits for the GIL while the harness
                # runs); a backward one is a value the device never meant to publish.
                if 0 < (last - now) & 0xFFFF < 0x8000:
                    jumps.append((last, now))
                last = now

        poller = threading.Thread(target=poll)
        poller.start()
        rounds = 0
        try:
            end = trio.current_time() + SECONDS
            while trio.current_time() < end:
                await vmm.read_random(SIZE * 64 * 4, 64, in_flight=None)
                rounds += 1
        finally:
            stop.set()
            poller.join()
            used_header.release()
        assert rounds > 0
        assert jumps == [], f"used idx seen going back {len(jumps)} times, e.g. {jumps[:3]}"
