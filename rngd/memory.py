"""Guest memory: the regions a VMM shares with us, and bounds-checked access to them.

Every access goes through `GuestMemory.span`, which answers with a region's view and an offset
inside it only when the whole span lies in that one region. That is the single place that keeps
guest-controlled addresses from reaching outside what the VMM mapped for us.
"""

from __future__ import annotations

import bisect
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


#: (first address, end address, the region's view, offset of the first address in the view)
_Range = tuple[int, int, memoryview, int]


def _start(r: _Range) -> int:
    return r[0]


class GuestMemory:
    """The mapped regions of one memory table. Closing unmaps them.

    Regions come all at once (SET_MEM_TABLE: `map`) or one by one (ADD_MEM_REG: `add`,
    REM_MEM_REG: `remove`). Nobody may be translating while the table changes: the back-end
    stops the rings first.
    """

    def __init__(self, regions: Sequence[MappedRegion]) -> None:
        self._regions = list(regions)
        self._gpa: list[_Range] = []
        self._uva: list[_Range] = []
        self._gpa_starts: list[int] = []
        self._uva_starts: list[int] = []
        self._index()

    def _index(self) -> None:
        # Two address spaces index the same regions: descriptors hold guest-physical
        # addresses, SET_VRING_ADDR the VMM's own virtual ones. Each is sorted by start (the
        # regions never overlap), so a lookup is a bisection even with hundreds of regions.
        self._gpa = sorted((_range(r, r.spec.guest_phys_addr) for r in self._regions), key=_start)
        self._uva = sorted((_range(r, r.spec.userspace_addr) for r in self._regions), key=_start)
        self._gpa_starts = [r[0] for r in self._gpa]
        self._uva_starts = [r[0] for r in self._uva]

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

    @staticmethod
    def map_region(spec: MemoryRegion, fd: int) -> MappedRegion:
        """Map one region from its fd (the caller's to close), for `add`."""
        return _map_region(spec, fd)

    def add(self, region: MappedRegion) -> None:
        """Take a region mapped with `map_region` (its addresses overlap no other: checked by
        the session)."""
        self._regions.append(region)
        self._index()

    def remove(self, spec: MemoryRegion) -> None:
        """Unmap the region described by `spec` (as it was added)."""
        for i, region in enumerate(self._regions):
            if region.spec == spec:
                del self._regions[i]
                self._index()
                _unmap(region)
                return
        raise GuestMemoryError(f"no region at gpa {spec.guest_phys_addr:#x} to remove")

    @property
    def regions(self) -> list[MemoryRegion]:
        return [r.spec for r in self._regions]

    def span(self, addr: int, length: int, *, vmm: bool = False) -> tuple[memoryview, int]:
        """(region view, offset) of `length` bytes at `addr`, a guest-physical address, or with
        `vmm` a VMM-virtual one (vring addresses). Slice the view to use it, and release the
        slice before `close` (it pins the mapping)."""
        ranges, starts = (self._uva, self._uva_starts) if vmm else (self._gpa, self._gpa_starts)
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0:
            start, end, view, base = ranges[i]
            if addr + length <= end:
                return view, base + addr - start
        raise GuestMemoryError(f"{length} bytes at {addr:#x} are not inside one memory region")

    def close(self) -> None:
        self._gpa.clear()
        self._uva.clear()
        self._gpa_starts.clear()
        self._uva_starts.clear()
        for region in self._regions:
            _unmap(region)
        self._regions.clear()


def _range(region: MappedRegion, start: int) -> _Range:
    return (start, start + region.spec.memory_size, region.view, region.spec.mmap_offset)


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
