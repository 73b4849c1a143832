"""A vhost-user *front-end* for testing back-ends, as `trio.testing` is for trio code.

It plays both QEMU 7.2 (the VMM: socket, memory table, eventfds) and the Linux virtio-rng
driver (the guest: a split virtqueue in guest memory)::

    async with daemon_in_process(filename=path) as (sock0,):
        async with await Frontend.connect(sock0) as vmm:
            queue = await vmm.start_qemu72(queue_size=4)
            data = await vmm.read_random(4096)          # 64-byte requests, one in flight
            queue.post([16, 16, 32], indirect=True)     # or build requests by hand
            queue.kick()
            (used,) = await queue.wait_used()
            base, queue = await vmm.reboot()            # new memory, new rings, base 0

Pieces: `GuestMemory` (memfd regions, allocator, gpa/uva), `DriverQueue` (the guest's side
of a split ring, with a raw API for hostile-guest tests), `Frontend` (one vhost-user
connection), `daemon_process` / `daemon_in_process` (a back-end to talk to).
`rngd.testing.loadgen`, not imported here, runs a guest in a process of its own
(``python -m rngd.testing.loadgen``) fast enough to load a back-end; `scripts/bench` uses it.
"""

from rngd.testing.daemons import (
    DaemonFailed,
    DaemonProcess,
    daemon_in_process,
    daemon_process,
    open_fd_count,
)
from rngd.testing.driver import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    POISON,
    USED_F_NO_NOTIFY,
    DeviceMisbehaved,
    DriverQueue,
    QueueFull,
    Used,
    need_event,
)
from rngd.testing.frontend import (
    QEMU72_PROTOCOL_FEATURES,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    BackendDisconnected,
    BackendError,
    Frontend,
    Reply,
    connect_when_listening,
    generation_layout,
    new_eventfd,
)
from rngd.testing.guest_memory import (
    PAGE_SIZE,
    UVA_BASE,
    GuestMemory,
    GuestMemoryError,
    GuestRegion,
    default_layout,
)

__all__ = [
    "AVAIL_F_NO_INTERRUPT",
    "DESC_F_INDIRECT",
    "DESC_F_NEXT",
    "DESC_F_WRITE",
    "PAGE_SIZE",
    "POISON",
    "QEMU72_PROTOCOL_FEATURES",
    "STATUS_ACKNOWLEDGE",
    "STATUS_DRIVER",
    "STATUS_DRIVER_OK",
    "STATUS_FEATURES_OK",
    "USED_F_NO_NOTIFY",
    "UVA_BASE",
    "BackendDisconnected",
    "BackendError",
    "DaemonFailed",
    "DaemonProcess",
    "DeviceMisbehaved",
    "DriverQueue",
    "Frontend",
    "GuestMemory",
    "GuestMemoryError",
    "GuestRegion",
    "QueueFull",
    "Reply",
    "Used",
    "connect_when_listening",
    "daemon_in_process",
    "daemon_process",
    "default_layout",
    "generation_layout",
    "need_event",
    "new_eventfd",
    "open_fd_count",
]
