"""Guest memory: the regions a VMM shares with us, and bounds-checked access to them.

Every access goes through `GuestMemory.translate`, which answers with a region and an offset
inside it only when the whole span lies in that one region. That is the single place that keeps
guest-controlled addresses from reaching outside what the VMM mapped for us.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass

from rngd.protocol.payloads import MemoryRegion

log = logging.getLogger(__name__)


class GuestMemoryError(Exception):
    """An address or span that is not inside guest memory (or memory that cannot be mapped)."""


@dataclass(eq=False)
class MappedRegion:
    spec: MemoryRegion
    map: mmap.mmap
    #: One long-lived export of the mapping; every view we hand out is a slice of it, so that
    #: closing needs to release only this one (see GuestMemory.close).
    view: memoryview


class GuestMemory:
    """The mapped regions of one memory table. Closing unmaps them."""

    def __init__(self, regions: Sequence[MappedRegion]) -> None:
        self._regions = list(regions)

    @classmethod
    def map(cls, specs: Sequence[MemoryRegion], fds: Sequence[int]) -> GuestMemory:
        """Map each region from its fd. The fds stay the caller's to close.

        The fd's size is checked first: touching a page of a mapping past the end of its file
        raises SIGBUS, which would kill the whole daemon, not just this connection.
        """
        mapped: list[MappedRegion] = []
        try:
            for spec, fd in zip(specs, fds, strict=True):
                mapped.append(_map_region(spec, fd))
        except BaseException:
            for region in mapped:
                _unmap(region)
            raise
        return cls(mapped)

    @property
    def regions(self) -> list[MemoryRegion]:
        return [r.spec for r in self._regions]

    def _find(self, addr: int, length: int, key: str) -> tuple[MappedRegion, int]:
        for region in self._regions:
            start = int(getattr(region.spec, key))
            if start <= addr and addr + length <= start + region.spec.memory_size:
                return region, region.spec.mmap_offset + addr - start
        raise GuestMemoryError(f"{length} bytes at {addr:#x} are not inside one memory region")

    def gpa(self, addr: int, length: int) -> tuple[mmap.mmap, int]:
        """(mapping, offset) for `length` bytes at guest-physical `addr`."""
        region, offset = self._find(addr, length, "guest_phys_addr")
        return region.map, offset

    def uva(self, addr: int, length: int) -> tuple[mmap.mmap, int]:
        """(mapping, offset) for `length` bytes at VMM-virtual `addr` (vring addresses)."""
        region, offset = self._find(addr, length, "userspace_addr")
        return region.map, offset

    def uva_view(self, addr: int, length: int) -> memoryview:
        """A writable view at VMM-virtual `addr`; release it before `close` (it pins the map)."""
        region, offset = self._find(addr, length, "userspace_addr")
        return region.view[offset : offset + length]

    def gpa_span(self, addr: int, length: int) -> tuple[memoryview, int]:
        """(the region's whole view, offset) for `length` bytes at guest-physical `addr`:
        a checked translation to keep and slice later, with no new export made now."""
        region, offset = self._find(addr, length, "guest_phys_addr")
        return region.view, offset

    def gpa_view(self, addr: int, length: int) -> memoryview:
        """A writable view of guest memory; release it promptly (it pins the mapping)."""
        region, offset = self._find(addr, length, "guest_phys_addr")
        return region.view[offset : offset + length]

    def close(self) -> None:
        for region in self._regions:
            _unmap(region)
        self._regions.clear()


def _map_region(spec: MemoryRegion, fd: int) -> MappedRegion:
    length = spec.mmap_offset + spec.memory_size
    try:
        size = os.fstat(fd).st_size
    except OSError as exc:
        raise GuestMemoryError(f"cannot stat memory fd: {exc}") from exc
    if length > size:
        raise GuestMemoryError(
            f"region needs {length:#x} bytes of its fd (offset {spec.mmap_offset:#x} + size "
            f"{spec.memory_size:#x}) but the fd has {size:#x}"
        )
    try:
        mapping = mmap.mmap(
            fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
    except (OSError, ValueError, OverflowError) as exc:
        raise GuestMemoryError(f"cannot map memory region: {exc}") from exc
    return MappedRegion(spec, mapping, memoryview(mapping))


def _unmap(region: MappedRegion) -> None:
    try:
        region.view.release()
        region.map.close()
    except BufferError:
        # A view is still alive somewhere (a traceback frame, say). The mapping and its fd are
        # freed when the last view goes; never crash a disconnect over it.
        log.debug("guest memory still referenced; unmapping when the last view is freed")
