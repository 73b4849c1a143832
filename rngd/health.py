"""Continuous health tests of an entropy source (NIST SP 800-90B, sections 4.3 and 4.4), sans I/O.

The source's byte stream is tested as 8-bit samples by the two tests of section 4.4:

* the Repetition Count Test (RCT): an alarm when one value repeats `rct_cutoff` times in a row;
* the Adaptive Proportion Test (APT): the stream is cut into windows of `WINDOW` (512)
  samples; an alarm when the first sample of a window occurs `apt_cutoff` times or more in it.

Both cutoffs come from the standard's formulas, given an assumed min-entropy per byte ``H`` and
a false-alarm probability ``alpha`` (`cutoffs`). `HealthTests` runs them over whole windows of
the stream (the RCT across window and call boundaries) with C-speed primitives: `bytes.count`
per window for the APT, and for the RCT a strided sample of the stream compared with itself
shifted by one (through big-integer XOR), which finds every run long enough to matter with no
loop over bytes in Python.

`HealthMonitor` is what a source does with the verdicts: the start-up test of section 4.3 (the
first `STARTUP_BYTES` bytes pass before any is released), a window that fails is never
released, and a source that fails `FAIL_COUNT` windows within `FAIL_SPAN` is declared failed
and releases nothing until it passes the start-up test again. It only decides; the pump in
`rngd.source` reads, writes and logs.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field

#: Samples per APT window (SP 800-90B 4.4.2, for non-binary samples).
WINDOW = 512
#: Bytes the start-up test (4.3) runs the tests on before anything is released: two windows.
STARTUP_BYTES = 1024
#: Assumed min-entropy of the source, bits per byte. Half of what a guest's kernel credits
#: (the Linux virtio-rng driver declares quality 1000 of 1024), so a healthy device is far
#: above it; a source that falls below it alarms.
DEFAULT_MIN_ENTROPY = 4.0
#: log2 of the false-alarm probability per test (alpha = 2^-70); see docs/health.md.
DEFAULT_ALPHA_LOG2 = -70
#: The persistent-failure rule: this many failed windows among the last `FAIL_SPAN` windows
#: tested declare the source failed.
FAIL_COUNT = 3
FAIL_SPAN = 64


class HealthMode(enum.StrEnum):
    """`--health-tests`: ``auto`` tests every source but the kernel's CSPRNG."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


#: (major, minor) of /dev/random and /dev/urandom: the kernel's CSPRNG, whose output the tests
#: cannot judge (a ChaCha20 stream passes them whatever its seeding).
KERNEL_CSPRNG = frozenset({(1, 8), (1, 9)})


def wants_tests(mode: HealthMode, device: tuple[int, int] | None) -> bool:
    """Whether a source is tested: `device` is its (major, minor) if a character device."""
    if mode is HealthMode.AUTO:
        return device not in KERNEL_CSPRNG
    return mode is HealthMode.ON


def rct_cutoff(min_entropy: float, alpha_log2: float) -> int:
    """C = 1 + ceil(-log2(alpha) / H) (SP 800-90B 4.4.1)."""
    return 1 + math.ceil(-alpha_log2 / min_entropy)


def apt_cutoff(min_entropy: float, alpha_log2: float, window: int = WINDOW) -> int:
    """C = 1 + CRITBINOM(W, 2^-H, 1 - alpha) (SP 800-90B 4.4.2): the least C such that a
    window of a source of min-entropy H holds C or more copies of its first sample with
    probability at most alpha (the binomial tail, summed in log space)."""
    p = 2.0**-min_entropy
    log_p, log_q = math.log(p), math.log1p(-p)
    log_alpha = alpha_log2 * math.log(2)

    def log_term(i: int) -> float:
        return (
            math.lgamma(window + 1)
            - math.lgamma(i + 1)
            - math.lgamma(window - i + 1)
            + i * log_p
            + (window - i) * log_q
        )

    # The tail P(X >= c) for c = W .. 0, accumulated from the top; the answer is the smallest
    # c whose tail is still <= alpha.
    tail = -math.inf
    answer = window + 1
    for c in range(window, -1, -1):
        t = log_term(c)
        tail = max(tail, t) + math.log1p(math.exp(-abs(tail - t)))
        if tail > log_alpha:
            break
        answer = c
    return answer


@dataclass(frozen=True)
class Cutoffs:
    min_entropy: float = DEFAULT_MIN_ENTROPY
    alpha_log2: float = DEFAULT_ALPHA_LOG2
    rct: int = field(init=False)
    apt: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rct", rct_cutoff(self.min_entropy, self.alpha_log2))
        object.__setattr__(self, "apt", apt_cutoff(self.min_entropy, self.alpha_log2))


@dataclass(frozen=True)
class Failure:
    """A window that failed a test."""

    #: Stream offset of the window's first byte.
    offset: int
    #: "repetition count" or "adaptive proportion".
    test: str
    value: int
    #: The run's length so far (RCT), or the copies of `value` in the window (APT).
    count: int

    def __str__(self) -> str:
        what = "in a row" if self.test == "repetition count" else f"times in {WINDOW}"
        return (
            f"{self.test} test: byte 0x{self.value:02x} {self.count} {what} in the window at "
            f"byte {self.offset}"
        )


class HealthTests:
    """The RCT and the APT over a stream fed in whole windows (`check`).

    The RCT counts runs continuously across calls: a run that ends one block and starts the
    next is one run.
    """

    def __init__(self, cutoffs: Cutoffs | None = None) -> None:
        self.cutoffs = cutoffs = cutoffs or Cutoffs()
        self.rct = cutoffs.rct
        self.apt = cutoffs.apt
        #: Stride of the RCT's sample: every run of `rct` bytes holds two sampled positions.
        self.stride = max(1, self.rct // 2)
        #: The value and length of the run the last block ended with.
        self.last = -1
        self.run = 0
        #: Stream offset of the next byte.
        self.offset = 0

    def check(self, block: bytes) -> list[Failure]:
        """Test `block` (a whole number of windows, the stream's next bytes); return the failing
        windows, in order, at most one failure each."""
        n = len(block)
        assert n % WINDOW == 0
        failures: dict[int, Failure] = {}
        if n == 0:
            return []
        base = self.offset
        # -- RCT (first: a stuck source is a repetition count failure, though both see it).
        for first, end, value, length in self._long_runs(block):
            # Windows holding the run's `rct`-th sample onwards fail.
            start = first - first % WINDOW
            while start < end:
                if start not in failures:
                    failures[start] = Failure(base + start, "repetition count", value, length)
                start += WINDOW
        # -- APT: one bytes.count per window (of the window's first byte, over the window),
        # mapped in C; the windows are looked at one by one only when one alarms.
        starts = range(0, n, WINDOW)
        counts = list(map(block.count, block[::WINDOW], starts, range(WINDOW, n + 1, WINDOW)))
        if max(counts) >= self.apt:
            for start, b in zip(starts, counts, strict=True):
                if b >= self.apt and start not in failures:
                    failures[start] = Failure(base + start, "adaptive proportion", block[start], b)
        self.offset += n
        return [failures[k] for k in sorted(failures)]

    def _long_runs(self, block: bytes) -> list[tuple[int, int, int, int]]:
        """Runs of `rct` or more equal bytes, counted across blocks: (index of the sample that
        reaches the cutoff, end of the run in the block, value, run length)."""
        n = len(block)
        cutoff = self.rct
        runs: list[tuple[int, int, int, int]] = []
        # The run carried in from the previous block.
        lead = 0
        carried = 0
        if self.last == block[0]:
            carried = self.run
            lead = n - len(block.lstrip(block[:1]))
            if carried + lead >= cutoff:
                first = max(0, cutoff - 1 - carried)
                runs.append((first, lead, self.last, carried + lead))
        # Runs inside the block: a run of `cutoff` bytes covers two consecutive positions that
        # are multiples of the stride, so it shows as two equal neighbours in the sample.
        s = self.stride
        sample = block[::s]
        if len(sample) > 1:
            # Byte k of `zeros` is sample[k] ^ sample[k + 1] (the top one, sample[-1] ^ 0, is
            # never looked at).
            x = int.from_bytes(sample, "little")
            zeros = (x ^ (x >> 8)).to_bytes(len(sample), "little")[:-1]
            k = zeros.find(0)
            covered = lead
            while k >= 0:
                p = k * s
                if p >= covered and block[p : p + s + 1] == block[p : p + 1] * (s + 1):
                    value = block[p]
                    left, right = _run_around(block, p)
                    length = right - left
                    if left == 0 and carried:
                        pass  # the carried run, handled above
                    elif length >= cutoff:
                        runs.append((left + cutoff - 1, right, value, length))
                    covered = right
                k = zeros.find(0, k + 1)
        # The run this block ends with, carried into the next.
        tail_value = block[-1]
        tail = 1 if block[-2] != tail_value else n - len(block.rstrip(block[-1:]))
        if tail == n and self.last == tail_value:
            self.run += n
        else:
            self.run = tail
        self.last = tail_value
        return runs


def _run_around(block: bytes, p: int) -> tuple[int, int]:
    """Where the run of equal bytes holding `block[p]` begins and ends (end exclusive).

    Looked for in slices that double in size from 64 bytes, so that a run costs what its
    length does, never the block's: a stream of many short runs stays linear."""
    byte = block[p : p + 1]
    n = len(block)
    left, step = p, 64
    while left > 0:
        low = max(0, left - step)
        kept = len(block[low:left].rstrip(byte))
        if kept:
            left = low + kept
            break
        left, step = low, step * 2
    right, step = p + 1, 64
    while right < n:
        high = min(n, right + step)
        rest = len(block[right:high].lstrip(byte))
        if rest:
            right = high - rest
            break
        right, step = high, step * 2
    return left, right


class State(enum.Enum):
    STARTUP = "running its start-up test"
    OK = "ok"
    FAILED = "failed"


@dataclass
class Verdict:
    """What `HealthMonitor.feed` decided about a block."""

    #: The bytes to serve, in stream order.
    release: list[bytes | memoryview] = field(default_factory=list)
    #: Windows that failed a test (each is a health failure).
    failures: list[Failure] = field(default_factory=list)
    #: The start-up test failed (at start, or a retry while failed).
    startup_failed: bool = False
    #: The source has just been declared failed (persistent failure, or start-up failure).
    declared_failed: bool = False
    #: The source has just passed its start-up test (at start, or after a failure).
    passed_startup: bool = False
    #: The rest of the block was discarded and nothing should be read for a while (the
    #: source is failed; the next start-up attempt should come later, on fresh bytes).
    back_off: bool = False


class HealthMonitor:
    """The health state of one source's stream, fed in whole windows.

    * Start-up (`State.STARTUP`): the first `STARTUP_BYTES` bytes are tested and held; once
      they all pass they are released and the source is `OK`. A failing window fails the
      start-up test: the source is declared failed.
    * `OK`: every window is tested; a window that passes is released, one that fails is
      discarded (a health failure). `FAIL_COUNT` failures among the last `FAIL_SPAN` windows
      declare the source failed.
    * `FAILED`: nothing is released; the rest of the block is discarded and `back_off` asks the
      caller to wait before feeding more. The next block starts a new start-up test, on fresh
      bytes; passing it makes the source `OK` again.
    """

    def __init__(self, cutoffs: Cutoffs | None = None) -> None:
        self.tests = HealthTests(cutoffs)
        self.state = State.STARTUP
        #: Health failures so far: failing windows while serving, plus failed start-up tests.
        self.failures = 0
        #: Windows tested so far.
        self.windows = 0
        #: Times the source was declared failed.
        self.failed_count = 0
        self._held: list[bytes] = []
        self._recent: deque[int] = deque()
        #: The start-up test under way is a retry of a failed source.
        self._retrying = False

    def feed(self, block: bytes) -> Verdict:
        """Test `block` (whole windows, the stream's next bytes) and say what to do with it."""
        verdict = Verdict()
        if self.state is State.FAILED:
            # A new start-up attempt, on fresh bytes.
            self.state = State.STARTUP
            self._retrying = True
        failing = self.tests.check(block)
        first_window = self.windows
        self.windows += len(block) // WINDOW
        if not failing and self.state is State.OK:
            verdict.release.append(block)  # the common case
            return verdict
        bad = {(f.offset // WINDOW) - first_window: f for f in failing}
        mv = memoryview(block)
        run_start = 0  # start of the run of passing windows not yet released (state OK)
        for i in range(len(block) // WINDOW):
            start = i * WINDOW
            failure = bad.get(i)
            if self.state is State.STARTUP:
                if failure is None:
                    self._held.append(bytes(mv[start : start + WINDOW]))
                    if len(self._held) * WINDOW >= STARTUP_BYTES:
                        verdict.release.extend(self._held)
                        self._held = []
                        self.state = State.OK
                        self._retrying = False
                        verdict.passed_startup = True
                        run_start = start + WINDOW
                    continue
                verdict.failures.append(failure)
                verdict.startup_failed = True
                self.failures += 1
                self._fail(verdict)
                return verdict
            # State.OK
            if failure is None:
                continue
            if run_start < start:
                verdict.release.append(mv[run_start:start])
            run_start = start + WINDOW
            verdict.failures.append(failure)
            self.failures += 1
            window = first_window + i
            recent = self._recent
            recent.append(window)
            while recent[0] <= window - FAIL_SPAN:
                recent.popleft()
            if len(recent) >= FAIL_COUNT:
                self._fail(verdict)
                return verdict
        if self.state is State.OK and run_start < len(block):
            verdict.release.append(mv[run_start:] if run_start else block)
        return verdict

    def _fail(self, verdict: Verdict) -> None:
        # Nothing more of the stream goes out, not even the windows of this block that passed.
        verdict.release.clear()
        self.state = State.FAILED
        self._held = []
        self._recent.clear()
        verdict.back_off = True
        if not self._retrying:
            # Said once per failure, not at every retry.
            self.failed_count += 1
            verdict.declared_failed = True
