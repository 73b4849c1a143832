"""Typed payloads of the requests an RNG back-end handles, with their exact wire sizes."""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

from rngd.protocol.codec import Message, MessageError
from rngd.protocol.constants import (
    MAX_CONFIG_SIZE,
    MAX_MEMORY_REGIONS,
    VRING_INDEX_MASK,
    VRING_NOFD_MASK,
)

_STATE = struct.Struct("<II")
_ADDR = struct.Struct("<IIQQQQ")
_MEM_HEADER = struct.Struct("<II")
_REGION = struct.Struct("<QQQQ")
_U64 = struct.Struct("<Q")
_MEM_REG = struct.Struct("<QQQQQ")
_CONFIG_HEADER = struct.Struct("<III")


def _expect_size(message: Message, size: int) -> None:
    if len(message.payload) != size:
        raise MessageError(
            f"{message.name}: payload of {len(message.payload)} bytes, expected {size}"
        )


@dataclass(frozen=True)
class VringState:
    """SET_VRING_NUM / SET_VRING_BASE / GET_VRING_BASE / SET_VRING_ENABLE."""

    index: int
    num: int

    @classmethod
    def decode(cls, message: Message) -> VringState:
        _expect_size(message, _STATE.size)
        return cls(*_STATE.unpack(message.payload))

    def encode(self) -> bytes:
        return _STATE.pack(self.index, self.num)


@dataclass(frozen=True)
class VringAddr:
    """SET_VRING_ADDR: ring addresses in the front-end's (VMM's) virtual address space."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int

    @classmethod
    def decode(cls, message: Message) -> VringAddr:
        _expect_size(message, _ADDR.size)
        return cls(*_ADDR.unpack(message.payload))

    def encode(self) -> bytes:
        return _ADDR.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)


@dataclass(frozen=True)
class VringFd:
    """SET_VRING_KICK / CALL / ERR: a vring index and whether an fd came with it."""

    index: int
    has_fd: bool

    @classmethod
    def decode(cls, message: Message) -> VringFd:
        _expect_size(message, _U64.size)
        (value,) = _U64.unpack(message.payload)
        if value & ~(VRING_INDEX_MASK | VRING_NOFD_MASK):
            raise MessageError(f"{message.name}: reserved bits set in {value:#x}")
        return cls(value & VRING_INDEX_MASK, not value & VRING_NOFD_MASK)

    def encode(self) -> bytes:
        return _U64.pack(self.index | (0 if self.has_fd else VRING_NOFD_MASK))


@dataclass(frozen=True)
class MemoryRegion:
    """One SET_MEM_TABLE region. Its fd travels beside the payload, in the same order."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def encode(self) -> bytes:
        return _REGION.pack(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )


def decode_memory_table(message: Message) -> list[MemoryRegion]:
    """Regions of SET_MEM_TABLE, checked for count, size and overlap (not yet against the fds)."""
    if len(message.payload) < _MEM_HEADER.size:
        raise MessageError(f"{message.name}: payload of {len(message.payload)} bytes is truncated")
    count, _padding = _MEM_HEADER.unpack_from(message.payload)
    if not 1 <= count <= MAX_MEMORY_REGIONS:
        raise MessageError(f"{message.name}: {count} regions (1..{MAX_MEMORY_REGIONS} allowed)")
    # QEMU sends only the regions in use; other front-ends pad to the full table. Accept both.
    if len(message.payload) not in (
        _MEM_HEADER.size + count * _REGION.size,
        _MEM_HEADER.size + MAX_MEMORY_REGIONS * _REGION.size,
    ):
        raise MessageError(
            f"{message.name}: payload of {len(message.payload)} bytes for {count} regions"
        )
    regions = [
        MemoryRegion(*_REGION.unpack_from(message.payload, _MEM_HEADER.size + i * _REGION.size))
        for i in range(count)
    ]
    check_regions(regions)
    return regions


def decode_memory_region(message: Message) -> MemoryRegion:
    """ADD_MEM_REG / REM_MEM_REG: a u64 of padding, then one region (checked on its own)."""
    _expect_size(message, _MEM_REG.size)
    _padding, *fields = _MEM_REG.unpack(message.payload)
    region = MemoryRegion(*fields)
    check_regions([region])
    return region


def encode_memory_region(region: MemoryRegion) -> bytes:
    return _U64.pack(0) + region.encode()


@dataclass(frozen=True)
class ConfigSpace:
    """GET_CONFIG / SET_CONFIG: which bytes of the device's configuration space, and (SET)
    their new contents (GET: as many bytes as the front-end wants back, their values unused)."""

    offset: int
    size: int
    flags: int
    data: bytes

    @classmethod
    def decode(cls, message: Message) -> ConfigSpace:
        if len(message.payload) < _CONFIG_HEADER.size:
            raise MessageError(f"{message.name}: payload of {len(message.payload)} bytes")
        offset, size, flags = _CONFIG_HEADER.unpack_from(message.payload)
        if size > MAX_CONFIG_SIZE:
            raise MessageError(f"{message.name}: {size} bytes (at most {MAX_CONFIG_SIZE})")
        _expect_size(message, _CONFIG_HEADER.size + size)
        return cls(offset, size, flags, message.payload[_CONFIG_HEADER.size :])

    def encode(self) -> bytes:
        return _CONFIG_HEADER.pack(self.offset, self.size, self.flags) + self.data


def encode_memory_table(regions: list[MemoryRegion]) -> bytes:
    return _MEM_HEADER.pack(len(regions), 0) + b"".join(r.encode() for r in regions)


def check_regions(regions: list[MemoryRegion]) -> None:
    """Refuse empty, wrapping or overlapping regions: a translation must have one answer."""
    limit = 1 << 64
    for region in regions:
        if region.memory_size == 0:
            raise MessageError("memory region of size 0")
        for start in (region.guest_phys_addr, region.userspace_addr, region.mmap_offset):
            if start + region.memory_size > limit:
                raise MessageError(f"memory region at {start:#x} wraps the address space")
    for key in ("guest_phys_addr", "userspace_addr"):
        spans = sorted((getattr(r, key), r.memory_size) for r in regions)
        for (start, size), (next_start, _) in itertools.pairwise(spans):
            if start + size > next_start:
                raise MessageError(f"memory regions overlap at {key} {next_start:#x}")
