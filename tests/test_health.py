"""The health tests without I/O (rngd.health): cutoffs, the RCT and APT against a byte-by-byte
reading of SP 800-90B, and the monitor's start-up, failure and recovery rules."""

from __future__ import annotations

import math
import os
import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rngd.health import (
    DEFAULT_ALPHA_LOG2,
    DEFAULT_MIN_ENTROPY,
    FAIL_COUNT,
    FAIL_SPAN,
    STARTUP_BYTES,
    WINDOW,
    Cutoffs,
    HealthMode,
    HealthMonitor,
    HealthTests,
    State,
    apt_cutoff,
    rct_cutoff,
    wants_tests,
)

RCT = Cutoffs().rct
APT = Cutoffs().apt


def exact_tail(window: int, h: int, c: int) -> Fraction:
    """P(X >= c), X ~ Binomial(window, 2^-h), exactly."""
    p = Fraction(1, 2**h)
    return sum(
        (
            Fraction(math.comb(window, i)) * p**i * (1 - p) ** (window - i)
            for i in range(c, window + 1)
        ),
        Fraction(0),
    )


def test_cutoffs_match_jitterentropy() -> None:
    """Linux's jitterentropy: RCT 31 and APT 325 at window 512 for alpha = 2^-30, H = 1."""
    assert rct_cutoff(1, -30) == 31
    assert apt_cutoff(1, -30) == 325


def test_default_cutoffs() -> None:
    assert (DEFAULT_MIN_ENTROPY, DEFAULT_ALPHA_LOG2) == (4.0, -70)
    assert (RCT, APT) == (19, 96)
    # The APT cutoff is the least whose binomial tail is within alpha (computed exactly).
    alpha = Fraction(1, 2**70)
    assert exact_tail(WINDOW, 4, APT) <= alpha < exact_tail(WINDOW, 4, APT - 1)
    # The RCT cutoff: a run of C from a source of min-entropy H has probability <= alpha.
    assert Fraction(1, 2 ** (4 * (RCT - 1))) <= alpha < Fraction(1, 2 ** (4 * (RCT - 2)))


@pytest.mark.parametrize("h", [1, 2, 3, 5, 8])
def test_apt_cutoff_is_the_binomial_critical_value(h: int) -> None:
    c = apt_cutoff(h, -40)
    alpha = Fraction(1, 2**40)
    assert exact_tail(WINDOW, h, c) <= alpha < exact_tail(WINDOW, h, c - 1)


def test_auto_mode_skips_only_the_kernel_csprng() -> None:
    assert not wants_tests(HealthMode.AUTO, (1, 9))  # /dev/urandom
    assert not wants_tests(HealthMode.AUTO, (1, 8))  # /dev/random
    assert wants_tests(HealthMode.AUTO, (1, 5))  # /dev/zero
    assert wants_tests(HealthMode.AUTO, (10, 183))  # /dev/hwrng
    assert wants_tests(HealthMode.AUTO, None)  # a file or a FIFO
    assert wants_tests(HealthMode.ON, (1, 9))
    assert not wants_tests(HealthMode.OFF, None)


# -- the tests against a byte-by-byte reading of the standard -------------------------------


def reference_failures(stream: bytes) -> list[tuple[int, str]]:
    """SP 800-90B 4.4.1 and 4.4.2 sample by sample: the windows (offsets) holding an RCT alarm
    (the run counted across everything) or an APT alarm; RCT named first when both."""
    failing: dict[int, str] = {}
    a, b = -1, 0
    for i, x in enumerate(stream):
        if x == a:
            b += 1
        else:
            a, b = x, 1
        if b >= RCT:
            failing.setdefault(i - i % WINDOW, "repetition count")
    for start in range(0, len(stream), WINDOW):
        ref = stream[start]
        count = sum(1 for x in stream[start : start + WINDOW] if x == ref)
        if count >= APT:
            failing.setdefault(start, "adaptive proportion")
    return sorted(failing.items())


def checked(stream: bytes, cuts: list[int]) -> list[tuple[int, str]]:
    tests = HealthTests()
    found = []
    previous = 0
    for cut in [*cuts, len(stream)]:
        found += [(f.offset, f.test) for f in tests.check(stream[previous:cut])]
        previous = cut
    return found


segments = st.lists(
    st.one_of(
        st.binary(min_size=1, max_size=700),
        st.tuples(st.integers(0, 255), st.integers(1, 1200)).map(lambda t: bytes([t[0]]) * t[1]),
        # A biased stretch: one value in about half the bytes.
        st.tuples(st.integers(0, 255), st.randoms(use_true_random=False)).map(
            lambda t: bytes(
                t[0] if t[1].random() < 0.5 else t[1].randrange(256) for _ in range(600)
            )
        ),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=100, deadline=None)
@given(segments, st.data())
def test_rct_and_apt_match_the_standard(parts: list[bytes], data: st.DataObject) -> None:
    """Whatever the stream and however it is cut into blocks (of whole windows), the failing
    windows are exactly those of the byte-by-byte reading."""
    stream = b"".join(parts)
    stream = stream[: len(stream) - len(stream) % WINDOW] or os.urandom(WINDOW)
    windows = len(stream) // WINDOW
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, windows - 1)), max_size=5))))
    cuts = [c * WINDOW for c in cuts if c < windows]
    assert checked(stream, cuts) == reference_failures(stream)


def test_runs_at_the_cutoff() -> None:
    rng = random.Random(1)
    noise = bytes(rng.randrange(1, 256) for _ in range(4 * WINDOW))
    for length in (RCT - 1, RCT):
        for at in (0, 5, WINDOW - RCT + 3, WINDOW - 1, 2 * WINDOW - length, 4 * WINDOW - length):
            stream = bytearray(noise)
            stream[at : at + length] = bytes(length)
            stream = stream[: 4 * WINDOW]
            expected = reference_failures(bytes(stream))
            assert bool(expected) == (length >= RCT)
            for cut in (WINDOW, 2 * WINDOW, 3 * WINDOW):
                assert checked(bytes(stream), [cut]) == expected


def test_a_run_carried_over_many_blocks() -> None:
    tests = HealthTests()
    assert tests.check(os.urandom(WINDOW - 1).replace(b"\x07", b"\x08") + b"\x07") == []
    stuck = b"\x07" * WINDOW
    failures = [f for _ in range(3) for f in tests.check(stuck)]
    assert [f.test for f in failures] == ["repetition count"] * 3
    assert failures[-1].count >= 3 * WINDOW


def test_many_short_runs() -> None:
    """Runs of 10 and 18 equal bytes, back to back: below the RCT's cutoff, so only the APT
    can fail them (it does, every window: its first byte fills half of it); with a run of 19
    among them, the RCT fails that window too. Each run is looked at once (linear cost)."""
    stream = b"".join(bytes([i % 2]) * (10 if i % 3 else 18) for i in range(5000))
    stream = stream[: len(stream) - len(stream) % WINDOW]
    assert checked(stream, [WINDOW * 8]) == reference_failures(stream)
    assert {test for _, test in reference_failures(stream)} == {"adaptive proportion"}
    spiked = bytearray(stream)
    spiked[5000 : 5000 + RCT] = b"\x07" * RCT
    assert checked(bytes(spiked), []) == reference_failures(bytes(spiked))
    assert (4608, "repetition count") in reference_failures(bytes(spiked))


def test_random_bytes_pass() -> None:
    tests = HealthTests()
    for _ in range(64):
        assert tests.check(os.urandom(1 << 16)) == []


def test_bias_is_caught_by_the_apt() -> None:
    """One value in 40% of the bytes, the others uniform: the APT fails the windows that start
    with it (about 40% of them), the RCT nothing."""
    rng = random.Random(2)
    stream = bytes(0xA5 if rng.random() < 0.4 else rng.randrange(256) for _ in range(64 * WINDOW))
    failures = HealthTests().check(stream)
    assert failures and {f.test for f in failures} == {"adaptive proportion"}
    assert all(stream[f.offset] == 0xA5 and f.count >= APT for f in failures)
    assert len(failures) == sum(1 for s in range(0, len(stream), WINDOW) if stream[s] == 0xA5)


# -- the monitor ---------------------------------------------------------------------------


def state(monitor: HealthMonitor) -> State:
    return monitor.state  # read afresh each time (mypy would narrow the attribute)


def released(verdict_release: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(piece) for piece in verdict_release)


def test_startup_holds_the_first_1024_bytes() -> None:
    monitor = HealthMonitor()
    first = os.urandom(WINDOW)
    verdict = monitor.feed(first)
    assert verdict.release == [] and state(monitor) is State.STARTUP
    second = os.urandom(3 * WINDOW)
    verdict = monitor.feed(second)
    assert verdict.passed_startup and state(monitor) is State.OK
    assert released(verdict.release) == first + second
    assert STARTUP_BYTES == 2 * WINDOW


def test_constant_stream_fails_at_startup() -> None:
    monitor = HealthMonitor()
    verdict = monitor.feed(bytes(4 * WINDOW))
    assert verdict.release == []
    assert verdict.startup_failed and verdict.declared_failed and verdict.back_off
    assert state(monitor) is State.FAILED and monitor.failures == 1
    # Retries that fail again are failures, but the source is declared failed only once.
    verdict = monitor.feed(bytes(4 * WINDOW))
    assert verdict.startup_failed and not verdict.declared_failed and verdict.release == []
    assert monitor.failures == 2 and monitor.failed_count == 1


def test_an_isolated_failure_discards_only_its_window() -> None:
    monitor = HealthMonitor()
    monitor.feed(os.urandom(STARTUP_BYTES))
    block = bytearray(os.urandom(8 * WINDOW))
    block[3 * WINDOW + 100 : 3 * WINDOW + 100 + RCT] = b"\x00" * RCT
    verdict = monitor.feed(bytes(block))
    assert [f.offset for f in verdict.failures] == [STARTUP_BYTES + 3 * WINDOW]
    assert not verdict.declared_failed and state(monitor) is State.OK
    assert released(verdict.release) == bytes(block[: 3 * WINDOW] + block[4 * WINDOW :])


def test_persistent_failure_rule() -> None:
    """FAIL_COUNT failures within FAIL_SPAN windows declare the source failed; fewer, or
    spread wider, do not."""
    monitor = HealthMonitor()
    monitor.feed(os.urandom(STARTUP_BYTES))
    good = os.urandom(WINDOW)
    bad = bytes(WINDOW)
    # FAIL_COUNT - 1 failures, then a gap of FAIL_SPAN windows: the count starts over.
    for _ in range(FAIL_COUNT - 1):
        assert not monitor.feed(bad).declared_failed
    for _ in range(FAIL_SPAN):
        assert released(monitor.feed(good).release) == good
    for _ in range(FAIL_COUNT - 1):
        assert not monitor.feed(bad).declared_failed
    verdict = monitor.feed(good + bad + good)
    assert verdict.declared_failed and verdict.back_off and verdict.release == []
    assert state(monitor) is State.FAILED and monitor.failures == 2 * FAIL_COUNT - 1


def test_recovery_needs_a_whole_startup_test() -> None:
    monitor = HealthMonitor()
    monitor.feed(bytes(2 * WINDOW))
    assert state(monitor) is State.FAILED
    # A retry that passes one window and fails the next releases nothing.
    verdict = monitor.feed(os.urandom(WINDOW) + bytes(WINDOW))
    assert verdict.release == [] and state(monitor) is State.FAILED
    good = os.urandom(3 * WINDOW)
    verdict = monitor.feed(good)
    assert verdict.passed_startup and state(monitor) is State.OK
    assert released(verdict.release) == good
