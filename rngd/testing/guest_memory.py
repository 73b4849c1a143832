"""Guest RAM as a VMM lays it out: memfd-backed regions, an allocator, gpa/uva translation."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from rngd.protocol.payloads import MemoryRegion

PAGE_SIZE = mmap.PAGESIZE

#: Where QEMU-like VMM mappings live in our pretend VMM's address space. Deliberately unlike
#: any guest-physical address, so a back-end that confuses the two reads the wrong place.
UVA_BASE = 0x7F00_0000_0000


class GuestMemoryError(Exception):
    """An address outside guest memory, or an allocation that does not fit."""


@dataclass(eq=False)
class GuestRegion:
    """One region: its SET_MEM_TABLE description and the memfd (and mapping) behind it.

    The memfd is ``mmap_offset + memory_size`` bytes long; the region is its tail, as QEMU does
    for RAM above the PCI hole, so a back-end that ignores ``mmap_offset`` sees other bytes.
    """

    spec: MemoryRegion
    fd: int
    _map: mmap.mmap
    #: Free spans inside the region, as (offset, size) sorted by offset.
    _free: list[tuple[int, int]] = field(default_factory=list)

    def contains(self, gpa: int, size: int) -> bool:
        start = self.spec.guest_phys_addr
        return start <= gpa and gpa + size <= start + self.spec.memory_size


def default_layout(size: int = 1 << 20) -> list[MemoryRegion]:
    """Two regions of ``size`` bytes: gpa 0 (offset 0 in its memfd) and gpa 4 GiB, which starts
    three pages into its memfd. Their VMM addresses are unrelated to their guest addresses."""
    return [
        MemoryRegion(guest_phys_addr=0x0, memory_size=size, userspace_addr=UVA_BASE, mmap_offset=0),
        MemoryRegion(
            guest_phys_addr=0x1_0000_0000,
            memory_size=size,
            userspace_addr=UVA_BASE + 0x4000_0000,
            mmap_offset=3 * PAGE_SIZE,
        ),
    ]


class GuestMemory:
    """Guest RAM backed by one memfd per region; closes them on `close` (or ``with``).

    Allocation is first-fit with coalescing `free`, round-robin over the regions when no region
    is named, so that consecutive buffers land in different regions and exercise translation.
    """

    def __init__(self, layout: Sequence[MemoryRegion] | None = None) -> None:
        specs = list(default_layout() if layout is None else layout)
        if not specs:
            raise ValueError("guest memory needs at least one region")
        self.regions: list[GuestRegion] = []
        self._next_region = 0
        self._closed = False
        try:
            for i, spec in enumerate(specs):
                fd = os.memfd_create(f"rngd-guest-ram{i}", os.MFD_CLOEXEC)
                try:
                    os.ftruncate(fd, spec.mmap_offset + spec.memory_size)
                    mapping = mmap.mmap(fd, spec.mmap_offset + spec.memory_size)
                except BaseException:
                    os.close(fd)
                    raise
                self.regions.append(GuestRegion(spec, fd, mapping, [(0, spec.memory_size)]))
                # Bytes before the region proper: a back-end that ignores mmap_offset would
                # read these instead of guest memory.
                mapping[: spec.mmap_offset] = b"\xee" * spec.mmap_offset
        except BaseException:
            self.close()
            raise

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for region in self.regions:
            region._map.close()
            os.close(region.fd)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what the VMM tells the back-end -----------------------------------------------------

    @property
    def table(self) -> list[MemoryRegion]:
        return [r.spec for r in self.regions]

    @property
    def fds(self) -> list[int]:
        return [r.fd for r in self.regions]

    def uva(self, gpa: int) -> int:
        """The VMM user-space address of guest-physical ``gpa`` (for SET_VRING_ADDR)."""
        region, offset = self._locate(gpa, 0)
        return region.spec.userspace_addr + offset

    def gpa(self, uva: int) -> int:
        for region in self.regions:
            spec = region.spec
            if spec.userspace_addr <= uva < spec.userspace_addr + spec.memory_size:
                return spec.guest_phys_addr + uva - spec.userspace_addr
        raise GuestMemoryError(f"uva {uva:#x} is not in guest memory")

    # -- allocation --------------------------------------------------------------------------

    def alloc(self, size: int, align: int = 16, *, region: int | None = None) -> int:
        """Reserve ``size`` bytes aligned to ``align`` (a power of two); return their gpa."""
        if size <= 0 or align <= 0 or align & (align - 1):
            raise ValueError(f"bad allocation: size {size}, align {align}")
        if region is None:
            order = [(self._next_region + i) % len(self.regions) for i in range(len(self.regions))]
            self._next_region = (self._next_region + 1) % len(self.regions)
        else:
            order = [region]
        for index in order:
            gpa = self._alloc_in(self.regions[index], size, align)
            if gpa is not None:
                return gpa
        raise GuestMemoryError(f"no room for {size} bytes in guest memory")

    @staticmethod
    def _alloc_in(region: GuestRegion, size: int, align: int) -> int | None:
        base = region.spec.guest_phys_addr
        for i, (offset, span) in enumerate(region._free):
            start = -(-(base + offset) // align) * align - base
            pad = start - offset
            if pad + size > span:
                continue
            pieces = []
            if pad:
                pieces.append((offset, pad))
            if pad + size < span:
                pieces.append((start + size, span - pad - size))
            region._free[i : i + 1] = pieces
            return base + start
        return None

    def free(self, gpa: int, size: int) -> None:
        """Return a span from `alloc` (exactly its gpa and size)."""
        region, offset = self._locate(gpa, size)
        spans = region._free
        spans.append((offset, size))
        spans.sort()
        merged: list[tuple[int, int]] = []
        for start, span in spans:
            if merged and merged[-1][0] + merged[-1][1] > start:
                raise GuestMemoryError(f"double free at gpa {gpa:#x}")
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + span)
            else:
                merged.append((start, span))
        region._free = merged

    def free_bytes(self) -> int:
        return sum(span for r in self.regions for _, span in r._free)

    # -- access ------------------------------------------------------------------------------

    def _locate(self, gpa: int, size: int) -> tuple[GuestRegion, int]:
        if self._closed:
            raise GuestMemoryError("guest memory is closed")
        for region in self.regions:
            if region.contains(gpa, max(size, 1)):
                return region, gpa - region.spec.guest_phys_addr
        raise GuestMemoryError(f"gpa span {gpa:#x}+{size} is not inside one region")

    def view(self, gpa: int, size: int) -> memoryview:
        """A writable view of ``size`` bytes at ``gpa`` (one region). Release it before
        `close`: an exported view keeps the mapping from being closed."""
        region, offset = self._locate(gpa, size)
        start = region.spec.mmap_offset + offset
        return memoryview(region._map)[start : start + size]

    def read(self, gpa: int, size: int) -> bytes:
        region, offset = self._locate(gpa, size)
        start = region.spec.mmap_offset + offset
        return region._map[start : start + size]

    def write(self, gpa: int, data: bytes) -> None:
        region, offset = self._locate(gpa, len(data))
        start = region.spec.mmap_offset + offset
        region._map[start : start + len(data)] = data

    def fill(self, gpa: int, size: int, byte: int = 0) -> None:
        self.write(gpa, bytes([byte]) * size)

    def unpack(self, fmt: str, gpa: int) -> tuple[int, ...]:
        layout = struct.Struct("<" + fmt)
        return tuple(layout.unpack(self.read(gpa, layout.size)))

    def pack(self, fmt: str, gpa: int, *values: int) -> None:
        self.write(gpa, struct.pack("<" + fmt, *values))

    def read_u16(self, gpa: int) -> int:
        return self.unpack("H", gpa)[0]

    def write_u16(self, gpa: int, value: int) -> None:
        self.pack("H", gpa, value & 0xFFFF)

    def read_u32(self, gpa: int) -> int:
        return self.unpack("I", gpa)[0]

    def write_u32(self, gpa: int, value: int) -> None:
        self.pack("I", gpa, value & 0xFFFF_FFFF)

    def raw_file_bytes(self, region: int, offset: int, size: int) -> bytes:
        """Bytes of a region's memfd by file offset, including those before ``mmap_offset``."""
        return self.regions[region]._map[offset : offset + size]
