"""--poll-us: after a request a ring looks for the guest's next one before it asks for a kick
and sleeps; at most as many rings poll at once as the poll has slots; a stop ends a poll at
once; without polling, every completion already asks for the next kick.

The polls here outlast the tests (a minute), so what they check never depends on how soon
the test looks: a ring that is polling has not asked for a kick, and stays so until the test
posts, or stops it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import trio

from rngd.config import MAX_POLL_US, ConfigError, DaemonConfig
from rngd.ring import BusyPoll
from rngd.testing import Frontend
from rngd.testing.daemons import daemon_in_process, time_scale
from rngd.testing.driver import DriverQueue

STEP_TIMEOUT = 5.0 * time_scale()
#: Longer than any test: a poll that ends ends because the test made it.
FOREVER_US = 60_000_000


def asks_for_a_kick(queue: DriverQueue) -> bool:
    """Has the device asked to be kicked for the next request (avail_event at the avail
    index), as it does before it sleeps?"""
    return queue.read_avail_event() == queue.avail_idx


async def serve_one(queue: DriverQueue, source: bytes, offset: int) -> int:
    """Post one 64-byte request, kick only if the device asked for it (as Linux does), wait
    for it; check its bytes; return whether it was kicked."""
    queue.post(64)
    kicked = queue.kick()
    (used,) = await queue.wait_used()
    assert used.data == source[offset : offset + 64]
    return kicked


async def test_a_polling_ring_serves_the_next_request_without_a_kick(
    source: tuple[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rngd")
    poll = BusyPoll(FOREVER_US)
    with trio.fail_after(STEP_TIMEOUT):
        async with daemon_in_process(filename=source[0], poll=poll) as paths:
            async with await Frontend.connect(paths[0]) as vmm:
                queue = await vmm.start_qemu72(4, event_idx=True)
                assert await serve_one(queue, source[1], 0)  # the ring was asleep: kicked
                for n in range(1, 11):
                    # The ring polls after each request: it has not asked for a kick, so the
                    # driver posts without one, and the request is served all the same.
                    assert not asks_for_a_kick(queue)
                    assert not await serve_one(queue, source[1], 64 * n)
                # A stop does not wait for the poll to end.
                assert await vmm.stop() == 11
            # Ten requests found by polling, in the counters of the disconnect line.
            while not (lines := [r.message for r in caplog.records if "polled=" in r.message]):
                await trio.sleep(0.01)
    assert re.search(r"requests=11 .*polled=10\b", lines[-1]), lines[-1]


async def test_only_as_many_rings_poll_at_once_as_the_poll_has_slots(
    source: tuple[str, bytes],
) -> None:
    """One slot, two guests: the first guest's ring polls; the second's, finding no slot
    free, asks for a kick at once, and still serves every request."""
    poll = BusyPoll(FOREVER_US, slots=1)
    with trio.fail_after(STEP_TIMEOUT):
        async with (
            daemon_in_process(filename=source[0], socket_count=2, poll=poll) as paths,
            await Frontend.connect(paths[0]) as first,
            await Frontend.connect(paths[1]) as second,
        ):
            one = await first.start_qemu72(4, event_idx=True)
            two = await second.start_qemu72(4, event_idx=True)
            served = 0
            await serve_one(one, source[1], 0)
            served += 64
            assert not asks_for_a_kick(one)  # polling, holding the one slot
            for _ in range(3):
                assert await serve_one(two, source[1], served)  # no slot: kicked each time
                served += 64
                assert asks_for_a_kick(two)
            assert not await serve_one(one, source[1], served)  # still polling
            await first.stop()
            # The first ring's stop gave its slot back: the second polls now.
            await serve_one(two, source[1], served + 64)
            assert not asks_for_a_kick(two)


async def test_without_polling_every_completion_asks_for_the_next_kick(
    source: tuple[str, bytes],
) -> None:
    """--poll-us 0 (the default): the ring asks for a kick before it completes the request,
    so that a driver that kicks only when asked never waits on a sleeping ring."""
    with trio.fail_after(STEP_TIMEOUT):
        async with (
            daemon_in_process(filename=source[0], poll_us=0) as paths,
            await Frontend.connect(paths[0]) as vmm,
        ):
            queue = await vmm.start_qemu72(4, event_idx=True)
            for n in range(20):
                assert await serve_one(queue, source[1], 64 * n)
                assert asks_for_a_kick(queue)


@pytest.mark.parametrize("poll_us", [-1, MAX_POLL_US + 1])
def test_poll_us_out_of_range_is_refused(poll_us: int, tmp_path: Path) -> None:
    config = DaemonConfig(str(tmp_path / "rng.sock"), poll_us=poll_us)
    with pytest.raises(ConfigError, match=f"--poll-us must be in 0..{MAX_POLL_US}"):
        config.validate()
