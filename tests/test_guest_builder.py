"""The pure parts of the QEMU test guest builder: module dependencies, the initramfs, the console
reports, the byte-stream check the QEMU tests rely on, the arm64 guest's command line and the
private apt index's mirrors. No QEMU, no downloads."""

from __future__ import annotations

import gzip
import lzma
import os
import struct
from pathlib import Path

import pytest

from rngd.testing.apt import DEFAULT_MIRROR, DEFAULT_SECURITY_MIRROR, host_mirrors
from rngd.testing.guest import (
    ARCHES,
    GuestBuildError,
    TestGuest,
    build_initramfs,
    match_stream,
    module_info,
    parse_report,
    resolve_modules,
)
from rngd.testing.qemu import qemu_command


def fake_module(**modinfo: str) -> bytes:
    """A minimal 64-bit ELF file with a .shstrtab and a .modinfo section, as a .ko has."""
    shstrtab = b"\0.shstrtab\0.modinfo\0"
    info = b"".join(f"{k}={v}".encode() + b"\0" for k, v in modinfo.items())
    data_offset = 64
    sh_offset = data_offset + len(shstrtab) + len(info)
    header = b"\x7fELF\x02\x01\x01" + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, sh_offset, 0, 64, 0, 0, 64, 3, 1)
    sections = bytes(64)  # the null section
    sections += struct.pack("<IIQQQQIIQQ", 1, 3, 0, 0, data_offset, len(shstrtab), 0, 0, 1, 0)
    sections += struct.pack(
        "<IIQQQQIIQQ", 11, 1, 0, 0, data_offset + len(shstrtab), len(info), 0, 0, 1, 0
    )
    return header + shstrtab + info + sections


def test_module_info_reads_modinfo() -> None:
    data = fake_module(license="GPL", depends="virtio,virtio_ring", name="virtio_rng")
    assert module_info(data) == {
        "license": "GPL",
        "depends": "virtio,virtio_ring",
        "name": "virtio_rng",
    }


def test_resolve_modules_orders_dependencies_first(tmp_path: Path) -> None:
    kernel = tmp_path / "kernel" / "drivers"
    kernel.mkdir(parents=True)
    (kernel / "virtio-rng.ko").write_bytes(fake_module(depends="virtio,virtio_ring"))
    # Compressed modules come out decompressed: busybox insmod can't load them.
    (kernel / "virtio.ko.xz").write_bytes(lzma.compress(fake_module(depends="virtio_ring")))
    (kernel / "virtio_ring.ko.gz").write_bytes(gzip.compress(fake_module(depends="")))
    (kernel / "virtio_pci.ko").write_bytes(fake_module(depends="virtio,rng_core"))
    (tmp_path / "modules.builtin").write_text("kernel/drivers/char/hw_random/rng-core.ko\n")

    order, builtin = resolve_modules(tmp_path, ["virtio_pci", "virtio_rng"])

    assert [name for name, _ in order] == ["virtio_ring", "virtio", "virtio_pci", "virtio_rng"]
    assert builtin == ["rng_core"]
    assert all(data.startswith(b"\x7fELF") for _, data in order)


def test_resolve_modules_reports_missing_and_loops(tmp_path: Path) -> None:
    (tmp_path / "kernel").mkdir()
    (tmp_path / "kernel" / "a.ko").write_bytes(fake_module(depends="b"))
    (tmp_path / "kernel" / "b.ko").write_bytes(fake_module(depends="a"))
    (tmp_path / "kernel" / "c.ko").write_bytes(fake_module(depends="nowhere"))
    with pytest.raises(GuestBuildError, match="loop"):
        resolve_modules(tmp_path, ["a"])
    with pytest.raises(GuestBuildError, match="nowhere not found"):
        resolve_modules(tmp_path, ["c"])


def _cpio_entries(archive: bytes) -> dict[str, tuple[int, bytes]]:
    """{name: (mode, data)} of a newc archive, read independently of the writer."""
    entries: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert archive[pos : pos + 6] == b"070701"
        fields = [int(archive[pos + 6 + 8 * k : pos + 14 + 8 * k], 16) for k in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = archive[name_start : name_start + namesize - 1].decode()
        data_start = (name_start + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, archive[data_start : data_start + size])
        pos = (data_start + size + 3) & ~3


def test_initramfs_holds_init_busybox_modules_and_console() -> None:
    image = build_initramfs(b"BUSYBOX", [("virtio", b"\x7fELF1"), ("virtio_rng", b"\x7fELF2")])
    entries = _cpio_entries(gzip.decompress(image))
    assert entries["init"][0] == 0o100755
    assert entries["init"][1].startswith(b"#!/bin/sh")
    assert entries["bin/busybox"] == (0o100755, b"BUSYBOX")
    assert entries["bin/sh"] == (0o120777, b"busybox")
    assert entries["dev/console"][0] == 0o020600
    assert entries["lib/modules/virtio_rng.ko"][1] == b"\x7fELF2"
    assert entries["etc/rngtest-modules"][1] == b"virtio\nvirtio_rng\n"
    # Inputs alone decide the bytes (no timestamps): the cache key is a hash of the inputs.
    assert build_initramfs(b"BUSYBOX", []) == build_initramfs(b"BUSYBOX", [])


def test_parse_report() -> None:
    line = "\x1b[6n[  2.1] RNGTEST boot=2 current=virtio_rng.0 bytes=262144 seconds=0.412 sha256=ab"
    report = parse_report(line)
    assert report is not None
    assert report.kind == "RNGTEST" and report.ok
    assert (report.boot, report.current, report.nbytes) == (2, "virtio_rng.0", 262144)
    assert report.seconds == pytest.approx(0.412)
    failed = parse_report("RNGTEST boot=1 current=none bytes=0 error=no-virtio-rng-device")
    assert failed is not None and not failed.ok
    start = parse_report("RNGTEST-START boot=1 current=virtio_rng.0 bytes=5")
    assert start is not None and start.kind == "RNGTEST-START" and not start.ok
    counted = parse_report("RNGTEST boot=1 current=virtio_rng.0 bytes=4096 seconds=0.010203")
    assert counted is not None and counted.ok and counted.sha256 == ""  # rngtest.hash=0
    assert counted.seconds == pytest.approx(0.010203)
    short = parse_report("RNGTEST boot=1 current=virtio_rng.0 bytes=9 seconds=1.0 error=x")
    assert short is not None and not short.ok
    assert parse_report("[    2.40] reboot: Power down") is None


SOURCE = os.urandom(64 * 1024)


def test_match_stream_accepts_the_source_with_buffers_missing() -> None:
    assert match_stream(SOURCE, SOURCE[64:8192]) == (64, 0)
    got = SOURCE[64:1024] + SOURCE[1088:4096] + SOURCE[4224:9000]
    assert match_stream(SOURCE, got) == (64, 64 + 128)


@pytest.mark.parametrize(
    "got",
    [
        SOURCE[:1024] + SOURCE[512:2048],  # repeated bytes
        SOURCE[:1024] + SOURCE[2048:3072] + SOURCE[1024:2048],  # out of order
        SOURCE[:1024] + bytes(64) + SOURCE[1024:2048],  # bytes from elsewhere
        os.urandom(1024),  # nothing of the source
    ],
    ids=["repeated", "reordered", "foreign", "unrelated"],
)
def test_match_stream_refuses_what_a_device_cannot_have_served(got: bytes) -> None:
    with pytest.raises(ValueError):
        match_stream(SOURCE, got)


def test_arm64_guest_console_and_command_line() -> None:
    """The arm64 guest talks on the PL011 (ttyAMA0) of `-M virt`, its RAM is the form of
    vhost-device-rng's README (memory-backend-file on /dev/shm, share=on, `-numa node`), and
    it cannot count boots (no CMOS)."""
    guest = TestGuest(Path("k"), Path("i"), "6.1.0-1-arm64", {}, "arm64")
    assert guest.append(bytes_to_read=5).split()[:3] == [
        "console=ttyAMA0",
        "quiet",
        "rngtest.bytes=5",
    ]
    with pytest.raises(ValueError, match="CMOS"):
        guest.append(boots=2)
    cmd = qemu_command("qemu-system-aarch64", accel="tcg", sockets=[Path("/s0")], arch="arm64")
    line = " ".join(cmd)
    assert "-cpu cortex-a57 -machine virt" in line
    assert (
        "memory-backend-file,id=mem,size=256M,mem-path=/dev/shm,share=on -numa node,memdev=mem"
        in line
    )
    assert "-chardev socket,id=rng0,path=/s0 -device vhost-user-rng-pci,chardev=rng0" in line
    assert "memfd" not in line
    amd64 = " ".join(qemu_command("q", accel="tcg", arch="amd64"))
    assert "memory-backend-memfd,id=mem,size=256M,share=on -machine pc,memory-backend=mem" in amd64
    assert set(ARCHES) == {"amd64", "arm64"}


def test_private_apt_index_uses_the_hosts_mirrors() -> None:
    deb822 = """Types: deb
# URIs: http://old.example/debian
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
"""
    assert host_mirrors(deb822) == (
        "http://mirror.example/debian",
        "http://mirror.example/debian-security",
    )
    one_line = "deb [arch=amd64] https://m.example/pub/debian bookworm main\n"
    assert host_mirrors(one_line) == ("https://m.example/pub/debian", DEFAULT_SECURITY_MIRROR)
    assert host_mirrors("deb https://packages.example/apt stable main\n") == (
        DEFAULT_MIRROR,
        DEFAULT_SECURITY_MIRROR,
    )
