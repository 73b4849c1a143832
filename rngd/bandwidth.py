"""The bandwidth scheduler: `--max-bytes` per `--period`, shared by every guest.

Time is cut into windows ``[epoch + k*period, epoch + (k+1)*period)`` of trio's clock, ``epoch``
being when the scheduler was made (or first used, if made outside ``trio.run``). Every grant is
charged to the window it is made in, and no window is ever charged more than ``max_bytes``: that
is checked against one counter, so it holds exactly whatever the sharing policy does.

Nothing runs in the background. The accounting rolls over to a new window lazily, on the first
call that sees the clock past the window's end, or when the parked tasks' timeouts fire at the
window start. The refill is then handed out to the parked requests in the order they parked, by
the scheduler itself, before anyone else is served; so no waiter can lose its turn to whichever
task trio happens to run first.

Sharing:

* ``split`` (the default, as vhost-device-rng): each of the N guests may take
  ``max_bytes // N`` per window, used or not.
* ``fair``: max-min fair and work-conserving. At each refill every guest gets a *claim* on the
  window's budget by water-filling: a guest with a request parked at the refill is assumed to
  want without limit, any other guest to want what it took last window (so an idle guest
  claims nothing and a light one only what it uses; a guest whose parked requests were
  cancelled, by a ring stop or a disconnect, claims nothing until it asks again). A guest can
  always take up to its claim; the budget nobody claimed is first come, first served. A guest
  refused beyond its expected demand becomes unlimited at once and the claims are recomputed
  from what is left, so a newcomer gets an equal share of whatever has not been taken yet, and
  from the next window on contending guests get ``max_bytes / k`` each.

All the accounting, every guest's included, is the scheduler's: a `GuestBudget` only binds a
guest index to it, so the policy above can be read (and changed) in one class.
`BandwidthScheduler.statistics()` reports the current window and running totals, as trio's
`CapacityLimiter.statistics()` does; `window_end()` tells until when a grant made now counts
against the current window, for a holder of granted bytes outside trio (a worker thread) to stop
using them in time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
from typing import Protocol

import trio


class ShareMode(enum.StrEnum):
    """How the guests share the budget: the `--share` option's values, as the command line
    parses them and as `DaemonConfig` carries them to the scheduler."""

    SPLIT = "split"
    FAIR = "fair"


@dataclasses.dataclass(frozen=True)
class GuestStatistics:
    """One guest's part of `BandwidthStatistics`.

    The per-window fields describe the current window and are 0 (`claim` None) when the
    scheduler is unlimited, which has no windows. The ``total_`` fields count since the
    scheduler was made, limited or not, and only ever grow.
    """

    #: The guest's (socket's) index.
    index: int
    #: Bytes charged to it in the current window: what it was granted less what it refunded.
    granted: int
    #: Fair mode: bytes of the window reserved for it at the last water-filling; None in split
    #: mode, where every guest's share is ``max_bytes // guests``.
    claim: int | None
    #: Its requests parked now, waiting for bytes.
    parked: int
    #: Bytes returned by its `try_acquire` and `acquire` calls.
    total_granted: int
    #: Bytes of those given back by `refund` and credited (a refund is only credited in the
    #: window of the grant; when unlimited, always).
    total_refunded: int
    #: Times one of its requests parked (nothing left for it, or others of its requests
    #: already parked).
    total_parked: int


@dataclasses.dataclass(frozen=True)
class BandwidthStatistics:
    """What `BandwidthScheduler.statistics()` returns: the configuration, the current window,
    and the totals, over all guests and per guest (``guests[i]`` is guest i's part)."""

    max_bytes: int | None
    period: float
    mode: ShareMode
    #: The number k of the current window, which starts at ``window_start(k)``; 0 while
    #: unlimited or before the windows start.
    window: int
    #: Bytes charged to the current window, all guests; never above `max_bytes`.
    granted: int
    #: Requests parked now, all guests.
    parked: int
    #: The sums of the guests' ``total_`` fields.
    total_granted: int
    total_refunded: int
    total_parked: int
    guests: tuple[GuestStatistics, ...]


class _Account:
    """The scheduler's books on one guest."""

    __slots__ = (
        "claim",
        "demand",
        "idle",
        "parked",
        "refundable",
        "total_granted",
        "total_parked",
        "total_refunded",
        "used",
    )

    def __init__(self) -> None:
        self.used = 0  # bytes charged to this guest in the current window
        self.parked = 0  # requests of this guest waiting in the scheduler's queue
        self.demand: int | None = 0  # fair mode: expected demand this window, None = unlimited
        self.claim = 0  # fair mode: bytes reserved for this guest this window
        self.idle = False  # its parked requests were cancelled and it has not asked since
        # What each task was granted this window and may still refund. Keyed by task so that a
        # vring's late refund of an old window's grant is not credited to another's new one.
        self.refundable: dict[trio.lowlevel.Task, int] = {}
        self.total_granted = 0
        self.total_refunded = 0
        self.total_parked = 0


class _Waiter:
    """One parked `acquire` call."""

    __slots__ = ("account", "event", "granted", "want", "window")

    def __init__(self, account: _Account, want: int) -> None:
        self.account = account
        self.want = want
        self.granted = 0
        self.window = 0
        self.event = trio.Event()


class BandwidthScheduler:
    """The budget of `max_bytes` per `period` seconds, and the guests sharing it.

    The guests' vring tasks use it through their `GuestBudget` (see `guest`); the methods
    taking a guest index here are what those handles call.
    """

    def __init__(
        self,
        max_bytes: int | None,
        period: float,
        guests: int,
        mode: ShareMode = ShareMode.SPLIT,
    ) -> None:
        """`max_bytes` None means unlimited: acquiring never parks and costs next to nothing.

        The options' rules (`max_bytes` at least 1, and in split mode at least `guests`, or
        each guest's share would be 0 bytes per period) are `DaemonConfig.validate`'s, checked
        there once; here only what the arithmetic needs: a guest, and a positive period.
        """
        if guests < 1:
            raise ValueError(f"need at least one guest, not {guests}")
        if not (math.isfinite(period) and period > 0):
            raise ValueError(f"the period must be a positive number of seconds, not {period}")
        self.max_bytes = max_bytes
        self.period = period
        self.mode = mode
        self._quota = max_bytes // guests if max_bytes is not None else 0
        #: Bytes a ring asks for at a time (see `GuestBudget.lease`): an eighth of a guest's
        #: even share, so that a lease not used up holds back little of anyone's share.
        self.lease = max_bytes // (8 * guests) if max_bytes is not None else 0
        self._accounts = [_Account() for _ in range(guests)]
        self._guests = [GuestBudget(self, i) for i in range(guests)]
        self._window = 0
        self._claims_version = 0  # bumped by every _reserve
        # A dict is an ordered set: FIFO order for the hand-out, O(1) removal on cancellation.
        self._waiters: dict[_Waiter, None] = {}
        self._epoch: float | None = None
        # Made outside trio.run, there is no clock yet: then the first call fixes the epoch.
        with contextlib.suppress(RuntimeError):
            self._epoch = trio.current_time()

    def guest(self, index: int) -> GuestBudget:
        """The long-lived budget of socket `index` (it survives reconnections)."""
        return self._guests[index]

    @property
    def epoch(self) -> float | None:
        """trio time at which window 0 starts (None until first used, if made outside trio)."""
        return self._epoch

    def window_start(self, k: int) -> float:
        """trio time at which window `k` starts; the refill of window k happens then."""
        assert self._epoch is not None
        return self._epoch + k * self.period

    # -- the per-guest calls ----------------------------------------------------------------

    def try_acquire(self, guest: int, want: int, spare: int = 0) -> int:
        """`GuestBudget.try_acquire` of guest index `guest`."""
        if want < 1:
            raise ValueError(f"want must be at least 1, not {want}")
        account = self._accounts[guest]
        if self.max_bytes is None:
            account.total_granted += want
            return want
        self._advance()
        account.idle = False
        if account.parked:
            return 0
        version = self._claims_version
        granted = self._take(account, want)
        if granted == want and spare > 0:
            # Only what is free for it as things stand: asking beyond its need must not make
            # a guest look hungrier than it is (its claims and demand stay as they are).
            extra = min(spare, self._allowance(account))
            if extra > 0:
                account.used += extra
                granted += extra
        if self._claims_version != version:
            self._hand_out()  # new claims may let another guest's parked request through
        if granted:
            self._record(account, granted)
            account.total_granted += granted
        return granted

    async def acquire(self, guest: int, want: int) -> int:
        """`GuestBudget.acquire` of guest index `guest`."""
        if want < 1:
            raise ValueError(f"want must be at least 1, not {want}")
        account = self._accounts[guest]
        if self.max_bytes is None:
            await trio.lowlevel.checkpoint()
            account.total_granted += want
            return want
        await trio.lowlevel.checkpoint_if_cancelled()
        granted = self.try_acquire(guest, want)
        if granted:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return granted
        waiter = _Waiter(account, want)
        self._waiters[waiter] = None
        account.parked += 1
        account.total_parked += 1
        try:
            while not waiter.granted:
                with trio.move_on_at(self.window_start(self._window + 1)):
                    await waiter.event.wait()
                self._advance()
        except BaseException:
            self._withdraw(waiter)
            raise
        if waiter.window == self._window:
            self._record(account, waiter.granted)
        account.total_granted += waiter.granted
        return waiter.granted

    def refund(self, guest: int, unused: int) -> None:
        """`GuestBudget.refund` of guest index `guest`."""
        if unused < 0:
            raise ValueError(f"cannot refund a negative amount ({unused})")
        if unused == 0:
            return
        account = self._accounts[guest]
        if self.max_bytes is None:
            account.total_refunded += unused
            return
        self._advance()
        task = trio.lowlevel.current_task()
        credit = min(unused, account.refundable.get(task, 0))
        if credit:
            account.refundable[task] -= credit
            account.used -= credit
            account.total_refunded += credit
            self._hand_out()

    def window_end(self) -> float:
        """trio time at which grants made now stop counting against the current window.

        Bytes granted before then may be used until then; after it they belong to a window
        that is over (a refund is no longer credited, and the next window's budget is not
        theirs). Brings the accounting up to date first, so it is the end of the window the
        clock is in (and, made outside trio and unused so far, it starts the windows).
        math.inf when unlimited.
        """
        if self.max_bytes is None:
            return math.inf
        self._advance()
        return self.window_start(self._window + 1)

    def statistics(self) -> BandwidthStatistics:
        """The configuration, the current window's accounting and the totals since start.

        Called in trio once the windows have started, it first brings the accounting to the
        window the clock is in, handing the refill to parked requests as any call would; so
        what it reports is the state a request made now would meet. Outside trio, or before
        the first use of a scheduler made outside trio, it reports the state as it stands.
        """
        if self.max_bytes is not None and self._epoch is not None and self._clock_running():
            self._advance()
        guests = tuple(self._guest_statistics(i) for i in range(len(self._accounts)))
        return BandwidthStatistics(
            max_bytes=self.max_bytes,
            period=self.period,
            mode=self.mode,
            window=self._window,
            granted=sum(g.granted for g in guests),
            parked=sum(g.parked for g in guests),
            total_granted=sum(g.total_granted for g in guests),
            total_refunded=sum(g.total_refunded for g in guests),
            total_parked=sum(g.total_parked for g in guests),
            guests=guests,
        )

    @staticmethod
    def _clock_running() -> bool:
        try:
            trio.current_time()
        except RuntimeError:  # not in trio.run, or not in its thread
            return False
        return True

    def _guest_statistics(self, index: int) -> GuestStatistics:
        account = self._accounts[index]
        fair = self.mode is ShareMode.FAIR and self.max_bytes is not None
        return GuestStatistics(
            index=index,
            granted=account.used,
            claim=account.claim if fair else None,
            parked=account.parked,
            total_granted=account.total_granted,
            total_refunded=account.total_refunded,
            total_parked=account.total_parked,
        )

    # -- the accounting ---------------------------------------------------------------------

    def _window_at(self, now: float) -> int:
        k = math.floor((now - self.window_start(0)) / self.period)
        # The division rounds; window boundaries are what window_start says (the parked tasks
        # sleep until exactly that), so settle any disagreement in its favour.
        while self.window_start(k + 1) <= now:
            k += 1
        while self.window_start(k) > now:
            k -= 1
        return k

    def _advance(self) -> None:
        """Bring the accounting to the window trio's clock is in, refilling if it moved on.

        Every grant is made right after this, in the same step, so that it is charged to the
        window it is actually made in.
        """
        now = trio.current_time()
        if self._epoch is None:
            self._epoch = now
        window = self._window_at(now)
        if window == self._window:
            return
        consecutive = window == self._window + 1
        self._window = window
        for account in self._accounts:
            self._roll_over(account, consecutive)
        if self.mode is ShareMode.FAIR:
            self._reserve()
        self._hand_out()

    @staticmethod
    def _roll_over(account: _Account, consecutive: bool) -> None:
        # Parked at the refill means it wants more than it got. Otherwise expect it to want what
        # it took last window: a guest that stopped asking keeps its claim one window at most.
        if account.parked:
            account.demand = None
        else:
            account.demand = account.used if consecutive and not account.idle else 0
        account.used = 0
        account.claim = 0
        account.refundable.clear()

    def _reserve(self) -> None:
        """Water-fill this window's budget into max-min fair claims.

        A guest's claim is at least what it has taken already (a claim cannot take back bytes)
        and at most its expected demand; `level` is the highest equal share that fits.
        """
        assert self.max_bytes is not None
        budget = self.max_bytes
        lows = [a.used for a in self._accounts]
        highs = [
            budget if a.demand is None else max(a.used, min(a.demand, budget))
            for a in self._accounts
        ]

        def total(level: int) -> int:
            return sum(min(max(level, lo), hi) for lo, hi in zip(lows, highs, strict=True))

        low, high = 0, budget  # total(0) == bytes used so far <= budget
        while low < high:
            mid = (low + high + 1) // 2
            if total(mid) <= budget:
                low = mid
            else:
                high = mid - 1
        claims = [min(max(low, lo), hi) for lo, hi in zip(lows, highs, strict=True)]
        # The bytes the division leaves over go one each to guests still below their demand;
        # the first in line rotates with the window so none is favoured period after period.
        spare = budget - sum(claims)
        count = len(claims)
        for offset in range(count):
            i = (self._window + offset) % count
            if spare and lows[i] <= low < highs[i]:
                claims[i] += 1
                spare -= 1
        for account, claim in zip(self._accounts, claims, strict=True):
            account.claim = claim
        self._claims_version += 1

    def _allowance(self, account: _Account) -> int:
        """How many bytes the guest of `account` may still take in this window."""
        assert self.max_bytes is not None
        if self.mode is ShareMode.SPLIT:
            return self._quota - account.used
        # Everything but what the other guests have taken or still hold a claim on. Grants
        # keep sum(max(claim, used)) <= max_bytes, so each guest can always reach its claim.
        held = sum(max(a.claim, a.used) for a in self._accounts if a is not account)
        return self.max_bytes - held - account.used

    def _take(self, account: _Account, want: int) -> int:
        """Charge up to `want` bytes to the guest in this window; returns the amount (maybe 0)."""
        allowed = self._allowance(account)
        if allowed < want and self.mode is ShareMode.FAIR and account.demand is not None:
            # It wants more than it was expected to: give it an equal claim on what is left.
            account.demand = None
            self._reserve()
            allowed = self._allowance(account)
        granted = max(0, min(want, allowed))
        account.used += granted
        return granted

    @staticmethod
    def _record(account: _Account, granted: int) -> None:
        task = trio.lowlevel.current_task()
        account.refundable[task] = account.refundable.get(task, 0) + granted

    def _hand_out(self) -> None:
        """Serve parked requests in the order they parked, as far as the budget goes."""
        progress = True
        while progress:
            # Another pass when something moved: a claim recomputed for a guest served late in
            # the pass can free bytes for a request earlier in it.
            progress = False
            for waiter in list(self._waiters):
                granted = self._take(waiter.account, waiter.want)
                if granted:
                    waiter.granted, waiter.window = granted, self._window
                    self._unpark(waiter)
                    waiter.event.set()
                    progress = True

    def _unpark(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            del self._waiters[waiter]
            waiter.account.parked -= 1

    def _withdraw(self, waiter: _Waiter) -> None:
        """A parked request was cancelled: forget it, and give back a grant it never saw."""
        account = waiter.account
        self._unpark(waiter)
        self._advance()
        if waiter.granted and waiter.window == self._window:
            account.used -= waiter.granted
        if not account.parked:
            # Parked requests are cancelled when a ring stops or the guest goes away; unless it
            # asks again, it should not keep a claim on the next windows.
            account.idle = True
            if self.mode is ShareMode.FAIR:
                account.demand = 0
                self._reserve()
        self._hand_out()


class GuestBudget:
    """One guest's (socket's) handle on the scheduler; its vrings' tasks share it."""

    __slots__ = ("_scheduler", "index")

    def __init__(self, scheduler: BandwidthScheduler, index: int) -> None:
        self.index = index
        self._scheduler = scheduler

    @property
    def lease(self) -> int:
        """How many bytes a ring should ask for at a time, so that its thread asks the
        scheduler (a round trip into trio) a few times a period, not once a request: an
        eighth of the even share of the budget; 0 when unlimited."""
        return self._scheduler.lease

    def try_acquire(self, want: int, *, spare: int = 0) -> int:
        """Grant up to `want` bytes without waiting; 0 if this guest may take nothing now.

        Returns 0 while other requests of this guest are parked, so none jumps their queue.
        With all of `want` granted, also up to `spare` bytes more, as far as they are this
        guest's to take without waiting and without a new claim (its split share, or in fair
        mode its claim and the budget nobody claims): the lease of a ring's thread.
        """
        return self._scheduler.try_acquire(self.index, want, spare)

    async def acquire(self, want: int) -> int:
        """Grant between 1 and `want` bytes, parking until a refill if nothing is left.

        Parked requests are served in the order they parked, before any newcomer. A request
        cancelled while parked takes nothing (a grant it was handed but never saw goes back).
        A checkpoint, as trio's own primitives are.
        """
        return await self._scheduler.acquire(self.index, want)

    def refund(self, unused: int) -> None:
        """Give back bytes of a grant the source did not fill (short read, EOF, cancellation).

        Only what the calling task was granted in the current window can come back: a window
        that is over stays charged, so its total is never exceeded.
        """
        self._scheduler.refund(self.index, unused)

    def window_end(self) -> float:
        """trio time until which bytes granted now count against the current window (see
        `BandwidthScheduler.window_end`); math.inf when unlimited."""
        return self._scheduler.window_end()

    def statistics(self) -> GuestStatistics:
        """This guest's part of `BandwidthScheduler.statistics()`."""
        return self._scheduler.statistics().guests[self.index]


class Budget(Protocol):
    """One guest's view of the bandwidth scheduler, as the ring path uses it (`GuestBudget`
    is the scheduler's; tests may give a ring another)."""

    @property
    def lease(self) -> int:
        """How many bytes a ring should ask for at a time (0 when unlimited)."""
        ...

    def try_acquire(self, want: int, *, spare: int = 0) -> int:
        """Grant up to `want` bytes now without waiting; 0 if nothing is left this period.
        With all of `want`, also up to `spare` more, as far as they are free for this guest."""
        ...

    async def acquire(self, want: int) -> int:
        """Grant 1..`want` bytes, parking until the next refill if nothing is left."""
        ...

    def refund(self, unused: int) -> None:
        """Give back the part of a grant that was not used."""
        ...

    def window_end(self) -> float:
        """trio time at which grants made now stop counting (math.inf when unlimited)."""
        ...
