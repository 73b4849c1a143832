"""A tiny Linux test guest for real-QEMU runs, built on the fly from Debian packages.

The guest is Debian's own kernel (`linux-image-*-amd64`, downloaded with `apt-get download`, never
installed on the host) and an initramfs holding `busybox-static`, the virtio modules it needs and an
`/init` script. Its whole job is to read `/dev/hwrng` and report on the serial console, so the
host can check what a vhost-user RNG backend delivered to an unmodified guest driver.

The same guest is built for arm64 (`arch="arm64"`: `linux-image-*-arm64` and arm64
`busybox-static`, from a private arm64 apt index on an amd64 host, see rngd/testing/apt.py), for
QEMU's `-M virt` machine; `ARCHES` says what differs.

The result is cached under a folder keyed by a hash of everything that goes into it (package
versions, the init script, the module list, the builder version), so a build happens once per
kernel update or init change. Without a package index (no `apt-get update`, no network) the newest
cached build is reused.

What `/init` understands on the kernel command line:

`rngtest.bytes=N`
    how many bytes to read from /dev/hwrng (default 262144); 0 reads nothing.
`rngtest.boots=N`
    boot N times in one QEMU run (default 1): after its report the guest reboots with
    `reboot -f` until it has booted N times, then powers off. An initramfs keeps nothing across a
    reboot, so the count lives in a byte of the emulated CMOS RTC memory, which QEMU keeps across
    a system reset (and starts at zero in every new QEMU process). amd64 only (`-M virt` has no
    CMOS).
`rngtest.dump=/dev/vda`
    also write the bytes read to this block device (a raw `-drive` on the host), so that the host
    can compare them byte for byte.
`rngtest.wait=S`
    seconds to wait for a virtio-rng hwrng to appear when a virtio RNG device exists (default 20).
`rngtest.shell=1`
    instead of powering off at the end, start a shell on the console.
`rngtest.pause=N`
    read the first N bytes, print `RNGTEST-PAUSE`, then wait for one line on the console (the
    host writes it to QEMU's serial input, `QemuGuest.send`) before reading the rest: a barrier,
    so that a host can hold several guests in the middle of their reads and release them
    together.
`rngtest.hash=0`
    only count the bytes read (`head -c N /dev/hwrng | wc -c`) instead of hashing them, so that
    the timed read does nothing else on the guest's CPU (throughput comparisons); the report
    then has no `sha256` field.

What it prints (one line each, `key=value` fields, see `parse_report`; `seconds` is the read
alone, timed with the guest's monotonic clock)::

    RNGTEST-START boot=1 current=virtio_rng.0 bytes=262144
    RNGTEST boot=1 current=virtio_rng.0 bytes=262144 seconds=0.412345 sha256=<hex>
    RNGTEST boot=1 current=none bytes=0 error=no-virtio-rng-device

and `RNGTEST-REBOOT boot=1` before a reboot, `RNGTEST-PAUSE boot=1 bytes=N` at a pause.

Userspace does not see every byte the device delivers: the kernel's hwrng core reads the first
buffer itself when the device registers (early randomness), and its fill thread takes one 64-byte
buffer now and then for the entropy pool (on 6.1 it runs whatever the quality setting: measured
here, 3 to 4 buffers during a 7 s read). So a guest reads the device's bytes in order, but with
whole buffers missing: see `match_stream`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from rngd.testing.apt import Apt, AptError, cache_root, unpack

#: Bump when the builder's output changes for the same inputs (forces a rebuild of every cache).
BUILDER_VERSION = "1"

BUSYBOX_PACKAGE = "busybox-static"


@dataclasses.dataclass(frozen=True)
class GuestArch:
    """What differs between the test guests of two architectures."""

    #: Debian's name of the architecture; the kernel meta package is `linux-image-<debian>`.
    debian: str
    #: QEMU's system emulator for it, and the Debian package that has it.
    qemu_binary: str
    qemu_package: str
    #: QEMU's machine type, and the CPU model under TCG (None: the machine's default).
    machine: str
    tcg_cpu: str | None
    #: The kernel's name of that machine's first serial port.
    console: str
    #: Guest RAM: "memfd" (`memory-backend-memfd` as the machine's memory backend) or
    #: "shm-file" (`memory-backend-file` on /dev/shm and `-numa node,memdev=`, the form of
    #: vhost-device-rng's README). vhost-user needs it shared (`share=on`) either way.
    ram: str
    #: Whether the boot counter of `rngtest.boots` (CMOS memory, through /dev/port) exists.
    has_cmos: bool

    @property
    def kernel_meta_package(self) -> str:
        return f"linux-image-{self.debian}"


ARCHES = {
    "amd64": GuestArch(
        "amd64", "qemu-system-x86_64", "qemu-system-x86", "pc", None, "ttyS0", "memfd", True
    ),
    # vhost-device-rng's README example: `qemu-system -M virt`, an Arm machine. It boots a
    # kernel directly with -kernel/-initrd, no firmware needed.
    "arm64": GuestArch(
        "arm64",
        "qemu-system-aarch64",
        "qemu-system-arm",
        "virt",
        "cortex-a57",
        "ttyAMA0",
        "shm-file",
        False,
    ),
}


def guest_arch(name: str) -> GuestArch:
    try:
        return ARCHES[name]
    except KeyError:
        raise GuestBuildError(f"no test guest for {name!r} (only {', '.join(ARCHES)})") from None


#: Modules the guest loads (with their dependencies): the PCI transport, the RNG driver and the
#: block driver for `rngtest.dump`. Any of them built into the kernel is skipped.
GUEST_MODULES = ("virtio_pci", "virtio_rng", "virtio_blk")

DEFAULT_BYTES = 256 * 1024

#: Kernel command line for the test guest, after `console=`. Nothing here stops the hwrng core's
#: fill thread: on 6.1 neither `rng_core.default_quality=0` nor writing 0 to `rng_quality` does
#: (virtio-rng keeps quality 1000, and the thread runs whatever the quality), so tests allow for
#: it instead.
BASE_APPEND = "quiet"

INIT_SCRIPT = r"""#!/bin/sh
# rngd test guest init: reads /dev/hwrng and reports on the console (see rngd/testing/guest.py).
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp
mount -t tmpfs tmpfs /tmp
set -o pipefail

BYTES=262144
BOOTS=1
DUMP=
WAIT=20
SHELL_MODE=0
HASH=1
PAUSE=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        rngtest.bytes=*) BYTES=${arg#*=} ;;
        rngtest.boots=*) BOOTS=${arg#*=} ;;
        rngtest.dump=*) DUMP=${arg#*=} ;;
        rngtest.wait=*) WAIT=${arg#*=} ;;
        rngtest.shell=*) SHELL_MODE=${arg#*=} ;;
        rngtest.hash=*) HASH=${arg#*=} ;;
        rngtest.pause=*) PAUSE=${arg#*=} ;;
    esac
done

# Boot count across `reboot -f`: CMOS byte 0x48, which neither QEMU's PC firmware tables nor the
# kernel's RTC driver use; QEMU keeps CMOS memory across a reset and zeroes it at start.
CMOS_INDEX=72
octal() { printf "\\$(printf %03o "$1")"; }
cmos_get() {
    octal $CMOS_INDEX | dd of=/dev/port bs=1 seek=112 count=1 conv=notrunc 2>/dev/null &&
        dd if=/dev/port bs=1 skip=113 count=1 2>/dev/null | od -An -tu1 | tr -d ' \n'
}
cmos_set() {
    octal $CMOS_INDEX | dd of=/dev/port bs=1 seek=112 count=1 conv=notrunc 2>/dev/null &&
        octal "$1" | dd of=/dev/port bs=1 seek=113 count=1 conv=notrunc 2>/dev/null
}
BOOT=1
if [ "$BOOTS" -gt 1 ]; then
    prev=$(cmos_get)
    case "$prev" in ''|*[!0-9]*) prev=0 ;; esac
    [ "$prev" -ge "$BOOTS" ] && prev=0
    BOOT=$((prev + 1))
    cmos_set $BOOT
fi

finish() {
    if [ "$BOOT" -lt "$BOOTS" ]; then
        echo "RNGTEST-REBOOT boot=$BOOT"
        reboot -f
    fi
    if [ "$SHELL_MODE" = 1 ]; then
        echo "rngtest: starting a shell (poweroff -f to stop)"
        setsid cttyhack sh
    fi
    poweroff -f
    sleep 10
}

while read -r m; do
    [ -n "$m" ] && { insmod "/lib/modules/$m.ko" || echo "RNGTEST-WARN insmod $m failed"; }
done < /etc/rngtest-modules

has_rng_device=0
for d in /sys/bus/virtio/devices/*; do
    [ "$(cat "$d/device" 2>/dev/null)" = 0x0004 ] && has_rng_device=1
done
current=none
tries=$((WAIT * 10))
while :; do
    current=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null || echo none)
    case "$current" in virtio_rng*) break ;; esac
    [ "$has_rng_device" = 1 ] && [ "$tries" -gt 0 ] || break
    tries=$((tries - 1))
    usleep 100000
done
case "$current" in
    virtio_rng*) ;;
    *)
        err=no-virtio-rng-device
        [ "$has_rng_device" = 1 ] && err=virtio-rng-not-current
        echo "RNGTEST boot=$BOOT current=$current bytes=0 error=$err"
        finish
        ;;
esac

now_ns() {
    awk '/^now at/ { print $3; ok = 1; exit } END { exit !ok }' /proc/timer_list 2>/dev/null ||
        awk '{ printf "%d\n", $1 * 1000000000 }' /proc/uptime
}
# The bytes on stdout; with rngtest.pause=N, a barrier after the first N (stdout is a pipe
# here, so the marker goes to the console itself, and the release line comes from there).
read_hwrng() {
    if [ "$PAUSE" -gt 0 ] && [ "$PAUSE" -lt "$BYTES" ]; then
        head -c "$PAUSE" /dev/hwrng || return 1
        echo "RNGTEST-PAUSE boot=$BOOT bytes=$PAUSE" > /dev/console
        read -r _ < /dev/console
        head -c $((BYTES - PAUSE)) /dev/hwrng
    else
        head -c "$BYTES" /dev/hwrng
    fi
}
echo "RNGTEST-START boot=$BOOT current=$current bytes=$BYTES"
t0=$(now_ns)
if [ -n "$DUMP" ]; then
    read_hwrng > /tmp/rng.bin
    rc=$?
    t1=$(now_ns)
    got=$(wc -c < /tmp/rng.bin)
    sum=$(sha256sum /tmp/rng.bin | cut -d' ' -f1)
    dd if=/tmp/rng.bin of="$DUMP" bs=65536 conv=notrunc,fsync 2>/dev/null || rc=dump-failed
elif [ "$HASH" = 0 ]; then
    got=$(read_hwrng | wc -c | tr -d ' ')
    rc=$?
    t1=$(now_ns)
    sum=
    [ "$rc" = 0 ] && [ "$got" != "$BYTES" ] && rc=short
else
    sum=$(read_hwrng | sha256sum | cut -d' ' -f1)
    rc=$?
    t1=$(now_ns)
    got=$BYTES
    [ "$rc" = 0 ] || got=unknown
fi
secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f", (b - a) / 1e9 }')
if [ "$rc" = 0 ]; then
    echo "RNGTEST boot=$BOOT current=$current bytes=$got seconds=$secs${sum:+ sha256=$sum}"
else
    echo "RNGTEST boot=$BOOT current=$current bytes=$got seconds=$secs error=read-failed-$rc"
fi
finish
"""


class GuestBuildError(Exception):
    """The test guest could not be built (missing tool, package or module)."""


@dataclasses.dataclass(frozen=True)
class TestGuest:
    """A built test guest: boot it with `-kernel kernel -initrd initrd -append append`."""

    __test__ = False  # not a pytest test class, despite the name

    kernel: Path
    initrd: Path
    #: Kernel version the initramfs modules belong to, e.g. "6.1.0-56-amd64".
    kernel_release: str
    packages: Mapping[str, str]
    #: Debian's name of its architecture (a key of ARCHES).
    arch: str = "amd64"

    def append(
        self,
        *,
        bytes_to_read: int = DEFAULT_BYTES,
        boots: int = 1,
        dump: str | None = None,
        wait: int | None = None,
        shell: bool = False,
        hash_bytes: bool = True,
        pause: int = 0,
        extra: str = "",
    ) -> str:
        """The kernel command line for one run of the guest's `/init`."""
        arch = ARCHES[self.arch]
        parts = [f"console={arch.console}", BASE_APPEND, f"rngtest.bytes={bytes_to_read}"]
        if boots != 1:
            if not arch.has_cmos:
                raise ValueError(f"rngtest.boots needs CMOS memory, which {arch.machine} lacks")
            parts.append(f"rngtest.boots={boots}")
        if dump:
            parts.append(f"rngtest.dump={dump}")
        if wait is not None:
            parts.append(f"rngtest.wait={wait}")
        if shell:
            parts.append("rngtest.shell=1")
        if not hash_bytes:
            parts.append("rngtest.hash=0")
        if pause:
            parts.append(f"rngtest.pause={pause}")
        if extra:
            parts.append(extra)
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class Report:
    """One `RNGTEST...` line from the guest's console."""

    kind: str  # "RNGTEST", "RNGTEST-START", "RNGTEST-REBOOT" or "RNGTEST-WARN"
    fields: Mapping[str, str]

    @property
    def ok(self) -> bool:
        """A final report of a read that succeeded (with `rngtest.hash=0` it has no sha256)."""
        return self.kind == "RNGTEST" and "error" not in self.fields and "seconds" in self.fields

    @property
    def boot(self) -> int:
        return int(self.fields.get("boot", "0"))

    @property
    def current(self) -> str:
        return self.fields.get("current", "")

    @property
    def nbytes(self) -> int:
        value = self.fields.get("bytes", "0")
        return int(value) if value.isdigit() else 0

    @property
    def seconds(self) -> float:
        return float(self.fields.get("seconds", "nan"))

    @property
    def sha256(self) -> str:
        return self.fields.get("sha256", "")


_REPORT_RE = re.compile(r"(RNGTEST(?:-[A-Z]+)?) (.*)$")


def parse_report(line: str) -> Report | None:
    """The report on one console line, or None. Tolerates console noise before the marker."""
    match = _REPORT_RE.search(line.strip())
    if match is None:
        return None
    fields: dict[str, str] = {}
    for token in match.group(2).split():
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value
    return Report(match.group(1), fields)


def _common_run(a: bytes, ai: int, b: bytes, bi: int) -> int:
    """How many bytes of `a` from `ai` equal those of `b` from `bi`."""
    limit = min(len(a) - ai, len(b) - bi)
    n = 0
    while n < limit:
        k = min(4096, limit - n)
        if a[ai + n : ai + n + k] == b[bi + n : bi + n + k]:
            n += k
            continue
        while a[ai + n] == b[bi + n]:
            n += 1
        break
    return n


def match_stream(
    source: bytes, got: bytes, *, probe: int = 32, max_gap: int = 64 * 1024
) -> tuple[int, int]:
    """Check that `got` is bytes of `source` in the source's order, with only gaps between them.

    That is what a guest reading /dev/hwrng sees of a device that serves `source`: the hwrng
    core takes some device buffers for itself (see the module's docstring), so runs of the source
    are missing, but nothing read may be out of order, repeated or from elsewhere. Returns the
    offset in `source` of the first byte read and the total number of bytes skipped after it.
    Raises ValueError naming the first byte read that is neither the next byte of the source nor
    found within `max_gap` bytes after it.
    """
    if not got:
        return 0, 0
    pos = source.find(got[:probe])
    if pos < 0:
        raise ValueError("the first bytes read are nowhere in the source")
    start, i, skipped = pos, 0, 0
    while True:
        run = _common_run(source, pos, got, i)
        pos += run
        i += run
        if i == len(got):
            return start, skipped
        nxt = source.find(got[i : i + probe], pos + 1, pos + 1 + max_gap + probe)
        if nxt < 0:
            raise ValueError(f"byte {i} read is not the source's next byte (offset {pos})")
        skipped += nxt - pos
        pos = nxt


# --- building ------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`.cache/test-guest` in a source checkout, else under `$XDG_CACHE_HOME` (or ~/.cache);
    each architecture's builds are in a folder of its own in there."""
    env = os.environ.get("RNGD_TEST_GUEST_CACHE")
    if env:
        return Path(env)
    return cache_root() / "test-guest"


def resolve_packages(
    kernel_package: str | None = None, *, arch: str = "amd64", apt: Apt | None = None
) -> dict[str, str]:
    """{package: version} for the kernel image and busybox, as apt would install them now.

    `linux-image-<arch>` is a meta package: its Depends names the versioned image package.
    `apt`: where to look (default: `Apt.for_arch(arch)`, the host's apt for the host's own
    architecture).
    """
    meta = guest_arch(arch).kernel_meta_package
    try:
        apt = apt or Apt.for_arch(arch)
        if kernel_package is None:
            depends = apt.fields(meta).get("Depends", "")
            names = re.findall(rf"(linux-image-[0-9][^\s,(|]*-{arch})", depends)
            if not names:
                raise GuestBuildError(f"cannot find the kernel image in {meta}: {depends}")
            kernel_package = names[0]
        return {
            kernel_package: apt.version(kernel_package),
            BUSYBOX_PACKAGE: apt.version(BUSYBOX_PACKAGE),
        }
    except AptError as exc:
        raise GuestBuildError(str(exc)) from exc


def _elf_section(data: bytes, wanted: str) -> bytes:
    """The contents of one section of a 64-bit little-endian ELF file (a kernel module)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise GuestBuildError("not a 64-bit little-endian ELF module")
    e_shoff = struct.unpack_from("<Q", data, 0x28)[0]
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [
        struct.unpack_from("<IIQQQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)
    ]
    names_offset = headers[e_shstrndx][4]
    for name_off, _type, _flags, _addr, offset, size in headers:
        end = data.index(b"\0", names_offset + name_off)
        if data[names_offset + name_off : end].decode() == wanted:
            return data[offset : offset + size]
    return b""


def module_info(data: bytes) -> dict[str, str]:
    """The `.modinfo` key=value strings of a kernel module (the first value of each key)."""
    info: dict[str, str] = {}
    for item in _elf_section(data, ".modinfo").split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep and key not in info:
            info[key] = value
    return info


def _decompress_module(path: Path) -> bytes:
    name = path.name
    if name.endswith(".ko"):
        return path.read_bytes()
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        # Python 3.11 has no zstd in its standard library.
        result = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=False)
        if result.returncode != 0:
            raise GuestBuildError(f"zstd -dc {path} failed: {result.stderr.decode()[-500:]}")
        return result.stdout
    raise GuestBuildError(f"unknown module format: {path}")


def _module_name(path: Path) -> str:
    return re.sub(r"\.ko(\.[a-z]+)?$", "", path.name).replace("-", "_")


def resolve_modules(
    modules_dir: Path, wanted: Iterable[str]
) -> tuple[list[tuple[str, bytes]], list[str]]:
    """The modules to load, dependencies first, as (name, uncompressed .ko), and those built in.

    Debian's package ships no modules.dep (depmod runs at install), so dependencies come from each
    module's own `.modinfo` `depends=` list.
    """
    builtin: set[str] = set()
    builtin_list = modules_dir / "modules.builtin"
    if builtin_list.is_file():
        builtin = {_module_name(Path(line)) for line in builtin_list.read_text().split()}
    files = {_module_name(p): p for p in (modules_dir / "kernel").rglob("*.ko*")}
    order: list[tuple[str, bytes]] = []
    done: set[str] = set()
    skipped: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in done:
            return
        if name in chain:
            raise GuestBuildError(f"module dependency loop: {' -> '.join((*chain, name))}")
        if name in builtin:
            skipped.append(name)
            done.add(name)
            return
        if name not in files:
            raise GuestBuildError(f"kernel module {name} not found under {modules_dir}")
        data = _decompress_module(files[name])
        for dep in filter(None, module_info(data).get("depends", "").split(",")):
            visit(dep, (*chain, name))
        done.add(name)
        order.append((name, data))

    for name in wanted:
        visit(name, ())
    return order, skipped


class _Cpio:
    """A writer of `newc` cpio archives: what the kernel unpacks as an initramfs."""

    def __init__(self, out: io.BufferedIOBase) -> None:
        self._out = out
        self._ino = 0

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self._out.write(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)


def build_initramfs(
    busybox: bytes, modules: Sequence[tuple[str, bytes]], init_script: str = INIT_SCRIPT
) -> bytes:
    """A gzip-compressed newc initramfs: busybox, the modules (in load order) and /init."""
    raw = io.BytesIO()
    cpio = _Cpio(raw)
    for directory in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp"):
        cpio.directory(directory)
    # The kernel opens /dev/console for init's stdio before /init can mount devtmpfs.
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox, 0o755)
    cpio.symlink("bin/sh", "busybox")
    for name, data in modules:
        cpio.file(f"lib/modules/{name}.ko", data)
    cpio.file("etc/rngtest-modules", "".join(f"{name}\n" for name, _ in modules).encode())
    cpio.file("init", init_script.encode(), 0o755)
    cpio.close()
    return gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)


def _inputs_key(packages: Mapping[str, str], init_script: str, arch: str = "amd64") -> str:
    blob = json.dumps(
        {
            "builder": BUILDER_VERSION,
            "arch": arch,
            "packages": dict(sorted(packages.items())),
            "modules": list(GUEST_MODULES),
            "init": init_script,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _load(build_dir: Path) -> TestGuest | None:
    manifest = build_dir / "manifest.json"
    if not manifest.is_file():
        return None
    meta = json.loads(manifest.read_text())
    kernel, initrd = build_dir / "vmlinuz", build_dir / "initrd.img"
    if not (kernel.is_file() and initrd.is_file()):
        return None
    arch = meta.get("arch", "amd64")
    return TestGuest(kernel, initrd, meta["kernel_release"], meta["packages"], arch)


def _newest_cached(cache: Path) -> TestGuest | None:
    builds = sorted(
        (p for p in cache.iterdir() if (p / "manifest.json").is_file()),
        key=lambda p: (p / "manifest.json").stat().st_mtime,
        reverse=True,
    )
    for build_dir in builds:
        guest = _load(build_dir)
        if guest is not None:
            return guest
    return None


def build_test_guest(
    cache_dir: Path | None = None,
    *,
    arch: str = "amd64",
    kernel_package: str | None = None,
    force: bool = False,
    log: bool = True,
) -> TestGuest:
    """Build (or reuse) the test guest of an architecture (Debian's name, a key of ARCHES) and
    return where its kernel and initramfs are. Builds live in `cache_dir/<arch>`."""
    guest_arch(arch)
    top = cache_dir or default_cache_dir()
    cache = top / arch

    def say(message: str) -> None:
        if log:
            print(f"build-test-guest: {message}", file=sys.stderr, flush=True)

    def fall_back(exc: GuestBuildError, hint: str) -> TestGuest:
        # No package index (apt-get update never ran), a stale one (it names versions the
        # mirror no longer has) or no network: a cached build is better than nothing, as long
        # as one exists.
        cached = None if force else _newest_cached(cache)
        if cached is None:
            raise GuestBuildError(f"{exc} ({hint})") from exc
        say(f"{exc}; using the cached build")
        return cached

    with _locked(cache):
        apt: Apt | None = None
        try:
            apt = Apt.for_arch(arch)
            packages = resolve_packages(kernel_package, arch=arch, apt=apt)
        except (AptError, GuestBuildError) as exc:
            return fall_back(GuestBuildError(f"cannot resolve packages: {exc}"), "apt-get update?")
        key = _inputs_key(packages, INIT_SCRIPT, arch)
        build_dir = cache / key
        if not force:
            cached = _load(build_dir)
            if cached is not None:
                return cached
        say(f"building {arch} {key} from {', '.join(f'{p}={v}' for p, v in packages.items())}")
        try:
            debs = {p: apt.download(p, v, cache / "debs") for p, v in packages.items()}
        except AptError as exc:
            return fall_back(
                GuestBuildError(f"cannot download: {exc}"), "stale package index? apt-get update"
            )
        kernel_package = next(p for p in packages if p != BUSYBOX_PACKAGE)
        with tempfile.TemporaryDirectory(prefix="unpack-", dir=cache) as tmp:
            root = Path(tmp)
            try:
                unpack(debs.values(), root)
            except AptError as exc:
                raise GuestBuildError(f"cannot unpack: {exc}") from exc
            releases = sorted((root / "lib" / "modules").iterdir())
            if len(releases) != 1:
                raise GuestBuildError(f"expected one kernel release in {kernel_package}")
            release = releases[0].name
            kernel = root / "boot" / f"vmlinuz-{release}"
            busybox = root / "bin" / "busybox"
            modules, builtin = resolve_modules(releases[0], GUEST_MODULES)
            if builtin:
                say(f"built into the kernel: {', '.join(builtin)}")
            say(f"modules: {', '.join(name for name, _ in modules)}")
            initrd = build_initramfs(busybox.read_bytes(), modules)
            staging = cache / f".{key}.new"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            shutil.copyfile(kernel, staging / "vmlinuz")
            (staging / "initrd.img").write_bytes(initrd)
            (staging / "manifest.json").write_text(
                json.dumps(
                    {
                        "builder": BUILDER_VERSION,
                        "arch": arch,
                        "kernel_release": release,
                        "packages": packages,
                        "modules": [name for name, _ in modules],
                    },
                    indent=2,
                )
                + "\n"
            )
            shutil.rmtree(build_dir, ignore_errors=True)
            staging.rename(build_dir)
        # Old builds and packages are dead weight once a newer kernel took over; so are the
        # builds of before there was a folder per architecture.
        for old in cache.iterdir():
            if old.is_dir() and old.name not in (key, "debs") and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
        for old in top.iterdir():
            if old.name == "debs" or (old / "manifest.json").is_file():
                shutil.rmtree(old, ignore_errors=True)
        wanted = {deb.name for deb in debs.values()}
        for deb in (cache / "debs").glob("*.deb"):
            if deb.name not in wanted:
                deb.unlink()
        guest = _load(build_dir)
        assert guest is not None
        return guest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="build-test-guest",
        description="Build (or reuse) the rngd test guest: a Debian kernel and a busybox "
        "initramfs whose /init reads /dev/hwrng and reports on the serial console.",
    )
    parser.add_argument("--cache-dir", type=Path, help="default: .cache/test-guest in the checkout")
    parser.add_argument(
        "--arch", choices=sorted(ARCHES), default="amd64", help="the guest's (default amd64)"
    )
    parser.add_argument(
        "--kernel-package", help="e.g. linux-image-6.1.0-56-amd64 (default: current)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead")
    args = parser.parse_args(argv)
    try:
        guest = build_test_guest(
            args.cache_dir, arch=args.arch, kernel_package=args.kernel_package, force=args.force
        )
    except GuestBuildError as exc:
        print(f"build-test-guest: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(
            json.dumps(
                {
                    "kernel": str(guest.kernel),
                    "initrd": str(guest.initrd),
                    "arch": guest.arch,
                    "kernel_release": guest.kernel_release,
                    "packages": dict(guest.packages),
                    "append": guest.append(),
                }
            )
        )
    else:
        print(f"kernel {guest.kernel}")
        print(f"initrd {guest.initrd}")
    return 0
