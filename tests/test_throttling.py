"""While one vring waits for the bandwidth budget, nothing else does (issue: rate limiting).

The daemon runs in-process on trio's MockClock (autojump): a period of 10 s passes only when
everything is idle, so "before the refill" is exact and the tests do not wait long. The vrings
are served by worker threads whose work trio cannot see, so the clock may jump only once trio
has been idle for a while of real time (`threaded_autojump_clock`), not the moment it is.
"""

from __future__ import annotations

import trio
import trio.testing

from rngd.bandwidth import ShareMode
from rngd.testing import Frontend, daemon_in_process

PERIOD_MS = 10_000


async def test_completions_are_signalled_before_the_ring_parks(
    threaded_autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        daemon_in_process(max_bytes=256, period_ms=PERIOD_MS) as paths,
        await Frontend.connect(paths[0]) as vmm,
    ):
        queue = await vmm.start_qemu72(8)
        start = trio.current_time()
        for _ in range(8):
            queue.post(64, publish=False)
        queue.publish()
        queue.kick(force=True)
        done = await queue.wait_used(4)
        # The budget covers four requests; the guest hears of them before the refill, not
        # after the other four have waited a whole period (the original's behaviour).
        assert [u.len for u in done] == [64] * 4
        assert trio.current_time() - start < PERIOD_MS / 1000
        rest = await queue.wait_used(4)
        assert [u.len for u in rest] == [64] * 4
        assert trio.current_time() - start >= PERIOD_MS / 1000


async def test_parked_ring_leaves_protocol_and_other_guests_running(
    threaded_autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        daemon_in_process(socket_count=2, max_bytes=256, period_ms=PERIOD_MS) as paths,
        await Frontend.connect(paths[0]) as busy,
        await Frontend.connect(paths[1]) as other,
    ):
        busy_queue = await busy.start_qemu72(4)
        await other.start_qemu72(4)
        start = trio.current_time()
        # Split mode: each socket has 128 bytes per period. The busy guest spends its share
        # and parks on a third request.
        assert len(await busy.read_random(128)) == 128
        busy_queue.post(64)
        busy_queue.kick(force=True)
        # Its own connection still answers at once...
        assert await busy.get_features() & (1 << 32)
        # ...the other guest still gets its whole share in the same period...
        assert len(await other.read_random(128)) == 128
        assert trio.current_time() - start < PERIOD_MS / 1000
        # ...and stopping the parked ring is answered promptly, the parked request not counted.
        assert await busy.stop() == 2
        assert trio.current_time() - start < PERIOD_MS / 1000
        assert not busy_queue.used()
        # The other guest's next request waits for the refill like everyone's.
        assert len(await other.read_random(64)) == 64
        assert trio.current_time() - start >= PERIOD_MS / 1000


async def test_fair_share_lets_a_lone_guest_use_the_whole_budget(
    threaded_autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        daemon_in_process(
            socket_count=4, max_bytes=256, period_ms=PERIOD_MS, share=ShareMode.FAIR
        ) as p,
        await Frontend.connect(p[0]) as vmm,
    ):
        await vmm.start_qemu72(4)
        start = trio.current_time()
        assert len(await vmm.read_random(256)) == 256
        assert trio.current_time() - start < PERIOD_MS / 1000
        # The 257th byte is one too many for this period.
        assert len(await vmm.read_random(1)) == 1
        assert trio.current_time() - start >= PERIOD_MS / 1000
