"""The bandwidth scheduler, on trio's mock clock: per-window caps and shares, parking, refunds,
cancellation and wake order. Every grant is recorded with the trio time it was returned at, and
the windows are recomputed here from those times. Last, one real-time run through the daemon
and the `rngd.testing` front-end."""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rngd.bandwidth import BandwidthScheduler, GuestBudget, ShareMode
from rngd.config import ConfigError, DaemonConfig
from rngd.daemon import Daemon
from rngd.testing import DriverQueue, Frontend

Grant = tuple[int, float, int]  # guest index, trio time, bytes (negative: a refund)
PERIOD = 1.0


def window_of(t: float, epoch: float, period: float) -> int:
    """The k with epoch + k*period <= t < epoch + (k+1)*period, as the issue defines windows."""
    k = math.floor((t - epoch) / period)
    while epoch + (k + 1) * period <= t:
        k += 1
    while epoch + k * period > t:
        k -= 1
    return k


def tally(log: Iterable[Grant], epoch: float, period: float) -> dict[int, dict[int, int]]:
    """Bytes per window per guest."""
    out: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for guest, t, n in log:
        out[window_of(t, epoch, period)][guest] += n
    return out


def jain(xs: list[int]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


async def greedy(budget: GuestBudget, want: int, log: list[Grant], use_try: bool) -> None:
    """A vring with a full ring: asks again as soon as it has been served."""
    while True:
        granted = budget.try_acquire(want) if use_try else 0
        if granted:
            await trio.sleep(0)  # the device's read from the source
        else:
            granted = await budget.acquire(want)
        assert 1 <= granted <= want
        log.append((budget.index, trio.current_time(), granted))


async def run_greedy(
    sched: BandwidthScheduler, periods: int, wants: dict[int, list[int]], use_try: bool = True
) -> list[Grant]:
    """Guest g runs one greedy task per entry of wants[g] until `periods` windows have passed."""
    log: list[Grant] = []
    async with trio.open_nursery() as nursery:
        nursery.cancel_scope.deadline = sched.window_start(periods)
        for guest, sizes in wants.items():
            for want in sizes:
                nursery.start_soon(greedy, sched.guest(guest), want, log, use_try)
    return log


# -- split ------------------------------------------------------------------------------------


@pytest.mark.parametrize("guests", [1, 2, 8])
@pytest.mark.parametrize("use_try", [True, False])
async def test_split_each_guest_gets_exactly_its_share_every_period(
    autojump_clock: trio.testing.MockClock, guests: int, use_try: bool
) -> None:
    budget, periods = 1003, 30  # 1003 // 8 == 125, with 3 bytes nobody may use
    sched = BandwidthScheduler(budget, PERIOD, guests)
    # Two vrings per guest with sizes that do not divide the share: partial grants every period.
    log = await run_greedy(sched, periods, {g: [64, 37] for g in range(guests)}, use_try)
    windows = tally(log, 0.0, PERIOD)
    assert set(range(periods)) <= set(windows)
    for w in range(periods):
        assert dict(windows[w]) == {g: budget // guests for g in range(guests)}, w
    assert max(windows) <= periods  # nothing after the deadline


async def test_split_idle_share_is_not_lent(autojump_clock: trio.testing.MockClock) -> None:
    sched = BandwidthScheduler(800, PERIOD, 8, ShareMode.SPLIT)
    log = await run_greedy(sched, 10, {0: [64], 3: [64]})
    for w, per_guest in tally(log, 0.0, PERIOD).items():
        if w < 10:
            assert dict(per_guest) == {0: 100, 3: 100}


async def test_split_decimal_period_windows_stay_exact(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 0.1 s is not a binary fraction: window boundaries must not drift or double-refill.
    period, periods = 0.1, 200
    sched = BandwidthScheduler(1000, period, 2)
    log = await run_greedy(sched, periods, {0: [300], 1: [7]})
    windows = tally(log, 0.0, period)
    for w in range(periods):
        assert dict(windows[w]) == {0: 500, 1: 500}, w


# -- fair -------------------------------------------------------------------------------------


@pytest.mark.parametrize("guests", [1, 2, 8])
@pytest.mark.parametrize("use_try", [True, False])
async def test_fair_contending_guests_share_equally(
    autojump_clock: trio.testing.MockClock, guests: int, use_try: bool
) -> None:
    budget, periods = 1003, 30
    sched = BandwidthScheduler(budget, PERIOD, guests, ShareMode.FAIR)
    log = await run_greedy(sched, periods, {g: [64, 37] for g in range(guests)}, use_try)
    windows = tally(log, 0.0, PERIOD)
    for w in range(periods):
        # Work-conserving: the whole budget goes out every period, and never a byte more.
        assert sum(windows[w].values()) == budget, w
        if w >= 1:  # from the first refill on, shares are equal to the byte
            shares = sorted(windows[w].values())
            assert len(shares) == guests
            assert shares[0] >= budget // guests and shares[-1] - shares[0] <= 1, (w, shares)
    totals = [sum(windows[w][g] for w in range(1, periods)) for g in range(guests)]
    assert jain(totals) > 0.9999


async def test_fair_lone_guest_gets_the_whole_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sched = BandwidthScheduler(1000, PERIOD, 8, ShareMode.FAIR)
    log = await run_greedy(sched, 10, {5: [64]})
    windows = tally(log, 0.0, PERIOD)
    for w in range(10):
        assert dict(windows[w]) == {5: 1000}


async def test_fair_idle_guests_share_goes_to_the_busy_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sched = BandwidthScheduler(1000, PERIOD, 8, ShareMode.FAIR)
    log = await run_greedy(sched, 10, {0: [64], 3: [64]})
    windows = tally(log, 0.0, PERIOD)
    for w in range(10):
        assert sum(windows[w].values()) == 1000
        if w >= 1:
            assert dict(windows[w]) == {0: 500, 3: 500}


async def test_fair_shares_are_per_guest_not_per_task(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sched = BandwidthScheduler(1000, PERIOD, 2, ShareMode.FAIR)
    log = await run_greedy(sched, 10, {0: [64, 64, 64, 64], 1: [64]})
    windows = tally(log, 0.0, PERIOD)
    for w in range(1, 10):
        assert dict(windows[w]) == {0: 500, 1: 500}


async def test_fair_joining_and_leaving(autojump_clock: trio.testing.MockClock) -> None:
    sched = BandwidthScheduler(1000, PERIOD, 2, ShareMode.FAIR)
    log: list[Grant] = []
    async with trio.open_nursery() as nursery:
        nursery.cancel_scope.deadline = 12.0
        nursery.start_soon(greedy, sched.guest(0), 64, log, True)
        await trio.sleep_until(3.25)
        with trio.move_on_at(6.5):
            await greedy(sched.guest(1), 64, log, True)
    windows = tally(log, 0.0, PERIOD)
    for w in range(12):
        assert sum(windows[w].values()) == 1000, w
    for w in (0, 1, 2, 3):  # guest 0 alone, then guest 1 arrives after the budget is spent
        assert dict(windows[w]) == {0: 1000}, w
    for w in (4, 5, 6):  # contending; guest 1 takes its half early in 6 and leaves mid-way
        assert dict(windows[w]) == {0: 500, 1: 500}, w
    # Guest 1 left while parked: its half is not held for it any longer.
    for w in range(7, 12):
        assert dict(windows[w]) == {0: 1000}, w


async def test_fair_newcomer_gets_an_equal_share_of_what_is_left(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sched = BandwidthScheduler(1000, PERIOD, 2, ShareMode.FAIR)
    log: list[Grant] = []

    async def slow_reader() -> None:  # alone, it spreads the whole budget over the period
        while True:
            granted = await sched.guest(0).acquire(125)
            log.append((0, trio.current_time(), granted))
            await trio.sleep(PERIOD / 8)

    async with trio.open_nursery() as nursery:
        nursery.cancel_scope.deadline = 4.0
        nursery.start_soon(slow_reader)
        await trio.sleep_until(2.3)  # guest 0 has taken 375 of window 2 and claims the rest
        nursery.start_soon(greedy, sched.guest(1), 1000, log, True)
    windows = tally(log, 0.0, PERIOD)
    assert dict(windows[1]) == {0: 1000}
    assert dict(windows[2]) == {0: 500, 1: 500}
    assert [t for g, t, _ in log if g == 1 and t < 3] == [2.3]  # at once, not at the refill
    assert dict(windows[3]) == {0: 500, 1: 500}


async def test_fair_light_guest_keeps_its_bytes_and_lends_the_rest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sched = BandwidthScheduler(1000, PERIOD, 2, ShareMode.FAIR)
    log: list[Grant] = []

    async def light() -> None:
        for w in range(12):
            await trio.sleep_until(w + 0.5)
            granted = await sched.guest(1).acquire(10)
            log.append((1, trio.current_time(), granted))

    async with trio.open_nursery() as nursery:
        nursery.cancel_scope.deadline = 12.0
        nursery.start_soon(greedy, sched.guest(0), 64, log, True)
        nursery.start_soon(light)
    windows = tally(log, 0.0, PERIOD)
    for w in range(3, 12):
        assert dict(windows[w]) == {0: 990, 1: 10}, w


# -- leases: `spare` ----------------------------------------------------------------------------


async def test_split_spare_comes_from_the_guests_own_share_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sched = BandwidthScheduler(1600, PERIOD, 2)
    assert sched.guest(0).lease == 100  # an eighth of the even share
    first, second = sched.guest(0), sched.guest(1)
    assert first.try_acquire(64, spare=36) == 100
    assert first.try_acquire(64, spare=10_000) == 700  # the rest of its 800, no more
    assert first.try_acquire(1) == 0
    assert second.try_acquire(800) == 800  # untouched by the other's leases
    assert sched.statistics().granted == 1600


async def test_spare_only_when_all_of_want_is_granted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = BandwidthScheduler(100, PERIOD, 1).guest(0)
    assert budget.try_acquire(90) == 90
    assert budget.try_acquire(20, spare=50) == 10  # a partial grant carries no lease


async def test_fair_spare_leaves_claims_and_demand_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A lease is what is free for the guest anyway: it never makes a guest unlimited (a
    refusal beyond its demand would), so it never takes another guest's claim."""
    sched = BandwidthScheduler(1000, PERIOD, 2, ShareMode.FAIR)
    light, heavy = sched.guest(0), sched.guest(1)
    await trio.sleep_until(PERIOD * 1.1)
    assert light.try_acquire(10) == 10
    assert heavy.try_acquire(10_000) == 990
    await trio.sleep_until(PERIOD * 2.1)  # window 2: light expects 10, heavy the rest
    claims = [g.claim for g in sched.statistics().guests]
    assert claims == [10, 990]
    assert light.try_acquire(10, spare=500) == 10  # its claim, and nothing of heavy's
    assert [g.claim for g in sched.statistics().guests] == claims
    assert heavy.try_acquire(10_000) == 990


async def test_leases_never_charge_a_window_beyond_the_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sched = BandwidthScheduler(1000, PERIOD, 3, ShareMode.FAIR)
    for k in range(5):
        await trio.sleep_until(PERIOD * (k + 0.5))
        for i in range(3):
            budget = sched.guest(i)
            while budget.try_acquire(7, spare=budget.lease):
                pass
        assert sched.statistics().granted <= 1000


# -- one request at a time --------------------------------------------------------------------


async def test_partial_grant_then_park_until_refill(
    autojump_clock: trio.testing.MockClock,
) -> None:
    await trio.sleep(0.3)  # the windows start when the scheduler is made, not at 0
    sched = BandwidthScheduler(100, PERIOD, 1)
    assert sched.epoch == 0.3
    budget = sched.guest(0)
    assert await budget.acquire(60) == 60
    assert budget.try_acquire(60) == 40
    assert budget.try_acquire(1) == 0
    assert await budget.acquire(10) == 10
    assert trio.current_time() == 1.3
    assert await budget.acquire(1000) == 90
    assert trio.current_time() == 1.3


async def test_unlimited_never_parks(autojump_clock: trio.testing.MockClock) -> None:
    sched = BandwidthScheduler(None, PERIOD, 2, ShareMode.FAIR)
    budget = sched.guest(1)
    for _ in range(1000):
        assert await budget.acquire(1 << 20) == 1 << 20
        assert budget.try_acquire(4096) == 4096
        budget.refund(100)
    assert trio.current_time() == 0.0


async def test_refund_in_the_same_window(autojump_clock: trio.testing.MockClock) -> None:
    budget = BandwidthScheduler(100, PERIOD, 1).guest(0)
    assert await budget.acquire(100) == 100
    budget.refund(30)
    assert budget.try_acquire(50) == 30
    budget.refund(1000)  # only what this task was granted in this window comes back
    assert budget.try_acquire(1000) == 100
    assert budget.try_acquire(1) == 0


async def test_refund_of_a_past_window_is_not_credited(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = BandwidthScheduler(100, PERIOD, 1).guest(0)
    assert await budget.acquire(100) == 100
    await trio.sleep(PERIOD)
    budget.refund(50)  # the read finished after the refill: window 0 stays charged
    assert budget.try_acquire(1000) == 100
    assert budget.try_acquire(1) == 0


async def test_refund_is_credited_per_task(autojump_clock: trio.testing.MockClock) -> None:
    budget = BandwidthScheduler(100, PERIOD, 1).guest(0)
    await trio.sleep(0.9)
    assert await budget.acquire(100) == 100  # task A, window 0
    async with trio.open_nursery() as nursery:

        async def other_vring() -> None:
            await trio.sleep_until(1.0)
            assert await budget.acquire(100) == 100  # task B, window 1

        nursery.start_soon(other_vring)
    # Task A's read of its window-0 grant ends short in window 1: B's grant must not be undone.
    budget.refund(100)
    assert budget.try_acquire(1) == 0


async def test_refund_wakes_a_parked_request(autojump_clock: trio.testing.MockClock) -> None:
    budget = BandwidthScheduler(100, PERIOD, 1).guest(0)
    assert await budget.acquire(100) == 100
    got: list[tuple[float, int]] = []
    async with trio.open_nursery() as nursery:

        async def parked() -> None:
            granted = await budget.acquire(50)
            got.append((trio.current_time(), granted))

        nursery.start_soon(parked)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.5)
        budget.refund(20)
    assert got == [(0.5, 20)]


# -- cancellation -----------------------------------------------------------------------------


async def test_cancelled_while_parked_takes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sched = BandwidthScheduler(100, PERIOD, 1)
    budget = sched.guest(0)
    assert await budget.acquire(100) == 100
    got: list[tuple[str, float, int]] = []

    async def request(name: str, want: int, start: float, cancel_at: float = math.inf) -> None:
        with trio.move_on_at(cancel_at):
            await trio.sleep_until(start)
            granted = await budget.acquire(want)
            got.append((name, trio.current_time(), granted))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request, "cancelled", 100, 0.1, 0.5)
        nursery.start_soon(request, "second", 100, 0.2)
    # The cancelled request was ahead in the queue; the refill is whole for the one behind it.
    assert got == [("second", 1.0, 100)]
    assert budget.try_acquire(1) == 0


async def test_cancelled_after_being_handed_a_grant_gives_it_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = BandwidthScheduler(100, PERIOD, 1).guest(0)
    assert await budget.acquire(100) == 100
    got: list[tuple[str, float, int]] = []

    async def request(name: str, scope: trio.CancelScope) -> None:
        with scope:
            granted = await budget.acquire(40)
            got.append((name, trio.current_time(), granted))

    first, second = trio.CancelScope(), trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(request, "first", first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(request, "second", second)
        await trio.testing.wait_all_tasks_blocked()
        # The first is cancelled, then handed bytes before it runs again: it must not keep them.
        first.cancel()
        budget.refund(30)
    assert first.cancelled_caught
    assert got == [("second", 0.0, 30)]


async def test_mass_cancellation_leaks_nothing(autojump_clock: trio.testing.MockClock) -> None:
    sched = BandwidthScheduler(900, PERIOD, 3, ShareMode.FAIR)
    async with trio.open_nursery() as nursery:
        for g in range(3):
            for _ in range(4):
                nursery.start_soon(greedy, sched.guest(g), 1000, [], False)
        await trio.sleep(3.5)  # a connection goes away mid-window, its tasks all parked
        nursery.cancel_scope.cancel()
    await trio.sleep_until(4.0)
    assert sched.guest(1).try_acquire(10_000) == 900  # nobody is left to claim a share
    assert trio.current_time() == 4.0


# -- wake order -------------------------------------------------------------------------------


async def test_parked_requests_of_a_guest_are_served_in_turn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = BandwidthScheduler(100, PERIOD, 1).guest(0)
    assert await budget.acquire(100) == 100
    order: list[tuple[str, int]] = []

    async def vring(name: str) -> None:
        while True:
            await budget.acquire(100)  # each grant is the whole period's budget
            order.append((name, int(trio.current_time())))

    async with trio.open_nursery() as nursery:
        nursery.cancel_scope.deadline = 6.5
        for name in "abc":
            nursery.start_soon(vring, name)
            await trio.testing.wait_all_tasks_blocked()
    assert order == [("a", 1), ("b", 2), ("c", 3), ("a", 4), ("b", 5), ("c", 6)]


@pytest.mark.parametrize("mode", list(ShareMode))
async def test_refill_is_not_grabbed_by_the_first_to_wake(
    autojump_clock: trio.testing.MockClock, mode: ShareMode
) -> None:
    sched = BandwidthScheduler(1000, PERIOD, 4, mode)
    got: list[Grant] = []

    async def big(guest: int) -> None:
        n = await sched.guest(guest).acquire(1000)
        got.append((guest, trio.current_time(), n))
        n = await sched.guest(guest).acquire(1000)
        got.append((guest, trio.current_time(), n))

    async with trio.open_nursery() as nursery:
        for g in range(4):
            nursery.start_soon(big, g)
    second = sorted(g for g in got if g[1] == 1.0)
    assert second == [(g, 1.0, 250) for g in range(4)]


# -- statistics -------------------------------------------------------------------------------


async def test_statistics_follow_grants_parking_and_the_refill(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sched = BandwidthScheduler(100, PERIOD, 2)
    first, second = sched.guest(0), sched.guest(1)
    stats = sched.statistics()
    assert (stats.max_bytes, stats.period, stats.mode) == (100, PERIOD, ShareMode.SPLIT)
    assert (stats.window, stats.granted, stats.parked, stats.total_granted) == (0, 0, 0, 0)
    assert [g.index for g in stats.guests] == [0, 1]
    assert await first.acquire(30) == 30
    assert first.try_acquire(40) == 20  # its share is 50
    assert second.try_acquire(10) == 10
    stats = sched.statistics()
    assert (stats.granted, stats.total_granted) == (60, 60)
    assert [(g.granted, g.claim, g.total_granted) for g in stats.guests] == [
        (50, None, 50),
        (10, None, 10),
    ]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(first.acquire, 5)
        nursery.start_soon(first.acquire, 7)
        await trio.testing.wait_all_tasks_blocked()
        stats = sched.statistics()
        assert (stats.parked, stats.total_parked) == (2, 2)
        assert [(g.parked, g.total_parked) for g in stats.guests] == [(2, 2), (0, 0)]
        assert first.statistics() == stats.guests[0]
    assert trio.current_time() == 1.0
    stats = sched.statistics()
    assert (stats.window, stats.granted, stats.parked, stats.total_parked) == (1, 12, 0, 2)
    assert [(g.granted, g.total_granted) for g in stats.guests] == [(12, 62), (0, 10)]
    # The split scheduler has nothing left for guest 0 this window, whatever guest 1 does.
    assert first.try_acquire(100) == 38
    assert sched.statistics().granted == 50
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.granted = 0  # type: ignore[misc]


async def test_statistics_roll_over_without_any_other_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sched = BandwidthScheduler(100, PERIOD, 1)
    assert await sched.guest(0).acquire(70) == 70
    await trio.sleep(2.5)
    stats = sched.statistics()
    assert (stats.window, stats.granted, stats.total_granted) == (2, 0, 70)


async def test_statistics_count_refunds_credited_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sched = BandwidthScheduler(100, PERIOD, 1)
    budget = sched.guest(0)
    assert await budget.acquire(100) == 100
    budget.refund(30)
    budget.refund(1000)  # only the 70 this task still holds in this window come back
    stats = budget.statistics()
    assert (stats.granted, stats.total_granted, stats.total_refunded) == (0, 100, 100)
    assert await budget.acquire(60) == 60
    await trio.sleep(PERIOD)
    budget.refund(60)  # too late: window 0 stays charged, and the refund is not counted
    stats = budget.statistics()
    assert (stats.granted, stats.total_granted, stats.total_refunded) == (0, 160, 100)


async def test_statistics_do_not_count_a_grant_withdrawn_from_a_cancelled_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sched = BandwidthScheduler(100, PERIOD, 1)
    budget = sched.guest(0)
    assert await budget.acquire(100) == 100
    first, second = trio.CancelScope(), trio.CancelScope()

    async def request(scope: trio.CancelScope) -> None:
        with scope:
            await budget.acquire(40)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request, first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(request, second)
        await trio.testing.wait_all_tasks_blocked()
        first.cancel()
        budget.refund(30)  # handed to the cancelled request, which gives it to the second
    stats = sched.statistics()
    assert (stats.granted, stats.parked, stats.total_parked) == (100, 0, 2)
    assert (stats.total_granted, stats.total_refunded) == (130, 30)


async def test_statistics_show_the_fair_claims(autojump_clock: trio.testing.MockClock) -> None:
    sched = BandwidthScheduler(1000, PERIOD, 3, ShareMode.FAIR)
    assert sched.guest(0).try_acquire(1000) == 1000
    assert [g.claim for g in sched.statistics().guests] == [0, 0, 0]  # first come, first served
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sched.guest(0).acquire, 1)
        nursery.start_soon(sched.guest(1).acquire, 1)
    stats = sched.statistics()
    # Both were parked at the refill; guest 2 wanted nothing and claims nothing.
    assert stats.window == 1
    assert [(g.claim, g.granted) for g in stats.guests] == [(500, 1), (500, 1), (0, 0)]
    assert [g.total_parked for g in stats.guests] == [1, 1, 0]


async def test_statistics_when_unlimited(autojump_clock: trio.testing.MockClock) -> None:
    sched = BandwidthScheduler(None, PERIOD, 2, ShareMode.FAIR)
    budget = sched.guest(1)
    assert await budget.acquire(4096) == 4096
    assert budget.try_acquire(100) == 100
    budget.refund(96)
    await trio.sleep(3.5)
    stats = sched.statistics()
    assert (stats.max_bytes, stats.window, stats.granted, stats.parked) == (None, 0, 0, 0)
    assert (stats.total_granted, stats.total_refunded, stats.total_parked) == (4196, 96, 0)
    assert [g.claim for g in stats.guests] == [None, None]
    assert stats.guests[0].total_granted == 0


def test_statistics_outside_trio() -> None:
    sched = BandwidthScheduler(100, PERIOD, 2)
    stats = sched.statistics()  # no clock yet: the state as it stands, windows not started
    assert (stats.window, stats.granted, stats.total_granted) == (0, 0, 0)

    async def main() -> None:
        await trio.sleep(0.5)
        assert sched.guest(1).try_acquire(80) == 50

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    stats = sched.statistics()  # trio.run is over: the last state it left
    assert (stats.window, stats.granted, stats.total_granted) == (0, 50, 50)


# -- window_end -------------------------------------------------------------------------------


async def test_window_end_is_when_a_grant_stops_counting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    await trio.sleep(0.3)
    sched = BandwidthScheduler(100, PERIOD, 1)
    budget = sched.guest(0)
    assert budget.window_end() == sched.window_start(1) == 1.3
    await trio.sleep_until(2.9)
    assert budget.try_acquire(100) == 100
    end = budget.window_end()
    assert end == sched.window_start(3) == 3.3
    # A holder of the grant (a worker thread) may use it until `end`, not after: there the
    # grant stops counting against its window, and the next window's budget is whole.
    await trio.sleep_until(end)
    assert budget.window_end() == 4.3
    budget.refund(100)
    assert budget.statistics().total_refunded == 0
    assert budget.try_acquire(1000) == 100


async def test_window_end_is_exactly_the_next_window_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    period = 0.1  # not a binary fraction: the end must be window_start's, not a recomputation
    sched = BandwidthScheduler(1000, period, 2)
    for k in range(0, 50, 7):
        await trio.sleep_until(sched.window_start(k))
        assert sched.guest(k % 2).window_end() == sched.window_start(k + 1)
        assert sched.statistics().window == k


def test_window_end_starts_the_windows_of_a_scheduler_made_outside_trio() -> None:
    sched = BandwidthScheduler(100, PERIOD, 1)

    async def main() -> float:
        await trio.sleep(5.5)
        return sched.guest(0).window_end()

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == 6.5
    assert sched.epoch == 5.5


async def test_window_end_when_unlimited(autojump_clock: trio.testing.MockClock) -> None:
    sched = BandwidthScheduler(None, PERIOD, 1)
    assert sched.guest(0).window_end() == sched.window_end() == math.inf


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_bytes", "period", "guests", "mode"),
    [
        (100, 1.0, 0, ShareMode.SPLIT),
        (100, 0.0, 1, ShareMode.SPLIT),
        (100, math.inf, 1, ShareMode.SPLIT),
    ],
)
def test_rejects_arguments_it_cannot_count_with(
    max_bytes: int, period: float, guests: int, mode: ShareMode
) -> None:
    with pytest.raises(ValueError):
        BandwidthScheduler(max_bytes, period, guests, mode)


@pytest.mark.parametrize(
    ("max_bytes", "sockets", "mode", "message"),
    [
        (0, 1, ShareMode.FAIR, "--max-bytes must be at least 1"),
        (7, 8, ShareMode.SPLIT, "split over 8 sockets"),  # 7 // 8 == 0 bytes per guest
    ],
)
def test_the_options_that_would_starve_guests_are_refused_once_by_the_config(
    tmp_path: Path, max_bytes: int, sockets: int, mode: ShareMode, message: str
) -> None:
    config = DaemonConfig(
        str(tmp_path / "rng.sock"), socket_count=sockets, max_bytes=max_bytes, share=mode
    )
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_fair_mode_accepts_fewer_bytes_than_guests(tmp_path: Path) -> None:
    DaemonConfig(
        str(tmp_path / "rng.sock"), socket_count=8, max_bytes=7, share=ShareMode.FAIR
    ).validate()
    BandwidthScheduler(7, 1.0, 8, ShareMode.FAIR)


def test_made_outside_trio_starts_its_windows_on_first_use() -> None:
    sched = BandwidthScheduler(100, PERIOD, 1)
    assert sched.epoch is None

    async def main() -> float:
        await trio.sleep(5.5)
        budget = sched.guest(0)
        assert await budget.acquire(1000) == 100
        assert await budget.acquire(1) == 1
        return trio.current_time()

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == 6.5
    assert sched.epoch == 5.5


# -- property ---------------------------------------------------------------------------------

request = st.tuples(
    st.integers(0, 7),  # guest (modulo the guest count)
    st.floats(0, 6, allow_nan=False),  # arrival, in periods
    st.integers(1, 3000),  # want
    st.floats(0, 1.5, allow_nan=False),  # time holding the grant before the (short) read ends
    st.floats(0, 1),  # fraction of the grant refunded
    st.one_of(st.none(), st.floats(0, 8, allow_nan=False)),  # cancelled at, in periods
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    max_bytes=st.integers(1, 4000),
    guests=st.integers(1, 8),
    mode=st.sampled_from(ShareMode),
    period=st.sampled_from([1.0, 0.1, 0.3, 0.065536]),
    requests=st.lists(request, max_size=30),
)
def test_no_window_ever_exceeds_the_budget(
    max_bytes: int,
    guests: int,
    mode: ShareMode,
    period: float,
    requests: list[tuple[int, float, int, float, float, float | None]],
) -> None:
    if mode is ShareMode.SPLIT and max_bytes < guests:
        max_bytes = guests
    log: list[Grant] = []

    async def one(guest: int, at: float, want: int, hold: float, frac: float) -> None:
        budget = sched.guest(guest)
        await trio.sleep_until(at * period)
        granted = budget.try_acquire(want) or await budget.acquire(want)
        t = trio.current_time()
        assert 1 <= granted <= want
        log.append((guest, t, granted))
        await trio.sleep(hold * period)
        unused = int(granted * frac)
        budget.refund(unused)
        # Only a refund in the grant's own window may count; anything else stays charged.
        epoch = sched.epoch
        assert epoch is not None
        if window_of(trio.current_time(), epoch, period) == window_of(t, epoch, period):
            log.append((guest, trio.current_time(), -unused))

    async def main() -> None:
        # No starvation: 30 requests are all served long before this (or were cancelled).
        with trio.fail_after(1000 * period):
            async with trio.open_nursery() as nursery:
                for g, at, want, hold, frac, cancel_at in requests:
                    deadline = math.inf if cancel_at is None else cancel_at * period
                    scope = trio.CancelScope(deadline=deadline)

                    async def task(
                        scope: trio.CancelScope = scope,
                        args: tuple[int, float, int, float, float] = (
                            g % guests,
                            at,
                            want,
                            hold,
                            frac,
                        ),
                    ) -> None:
                        with scope:
                            await one(*args)

                    nursery.start_soon(task)

    # Made outside trio.run: its windows start at the first request, wherever that falls.
    sched = BandwidthScheduler(max_bytes, period, guests, mode)
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert sched.epoch is not None or not log
    stats = sched.statistics()
    assert stats.total_granted == sum(n for _, _, n in log if n > 0)
    assert stats.total_refunded == -sum(n for _, _, n in log if n < 0)
    assert stats.granted <= max_bytes and stats.parked == 0
    for w, per_guest in tally(log, sched.epoch or 0.0, period).items():
        assert sum(per_guest.values()) <= max_bytes, w
        if mode is ShareMode.SPLIT:
            assert max(per_guest.values()) <= max_bytes // guests, w


# -- real time, through the daemon ------------------------------------------------------------


async def keep_ring_full(queue: DriverQueue, log: list[tuple[float, int]]) -> None:
    while True:
        while queue.free_descriptors:
            queue.post(64, publish=False)
        queue.publish()
        queue.kick()
        for used in await queue.wait_used():
            log.append((trio.current_time(), used.len))


@pytest.mark.parametrize("share", list(ShareMode))
async def test_real_time_limit_through_the_daemon(share: ShareMode) -> None:
    budget, period_ms, periods = 2048, 50, 12
    period = period_ms / 1000
    with tempfile.TemporaryDirectory(prefix="rngd-bw-") as tmp:
        config = DaemonConfig(
            os.path.join(tmp, "rng.sock"),
            socket_count=2,
            max_bytes=budget,
            period_ms=period_ms,
            share=share,
        )
        daemon = Daemon(config)
        sched = daemon.scheduler
        logs: list[list[tuple[float, int]]] = [[], []]
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.serve)
            vmms = [await Frontend.connect(path) for path in daemon.paths]
            queues = [await vmm.start_qemu72(queue_size=8) for vmm in vmms]
            start = trio.current_time()
            with trio.move_on_at(start + periods * period):
                async with trio.open_nursery() as guests:
                    for queue, log in zip(queues, logs, strict=True):
                        guests.start_soon(keep_ring_full, queue, log)
            for vmm in vmms:
                await vmm.aclose()
            nursery.cancel_scope.cancel()
    epoch = sched.epoch
    assert epoch is not None and epoch <= start
    # A byte the guest has seen was granted no later: by the end of window k, at most (k+1)
    # budgets can have been completed, however late the completions arrive.
    seen = sorted((t, n) for log in logs for t, n in log)
    done = 0
    for t, n in seen:
        done += n
        assert done <= budget * (window_of(t, epoch, period) + 1)
    # And the budget is what limits: the guests get nearly all of it, in equal halves.
    whole = window_of(start + periods * period, epoch, period) - window_of(start, epoch, period) - 1
    assert done >= 0.9 * whole * budget
    halves = [sum(n for _, n in log) for log in logs]
    assert abs(halves[0] - halves[1]) <= 0.1 * done
