"""One vhost-user connection: the I/O half of the session.

The protocol task reads messages off the socket (with the fds they carry), lets the sans-I/O
`Session` validate and record each, has the `Device` carry out the resulting event, and sends
the reply. Whatever way the connection ends, its nursery (which holds the vrings' tasks) is
cancelled and every resource released before `Connection.run` returns.
"""

from __future__ import annotations

import array
import logging
import os
import socket

import trio

from rngd.bandwidth import Budget
from rngd.device import Device
from rngd.incidents import IncidentLog
from rngd.observe import ConnectionCounters, Peer, describe
from rngd.protocol.codec import Message, MessageError, MessageReader, ProtocolError
from rngd.protocol.constants import (
    MAX_FDS_PER_MESSAGE,
    ProtocolFeatures,
    Request,
    VirtioFeatures,
)
from rngd.protocol.session import REQUESTS_WITH_REPLY, RequestRejected, Session
from rngd.ring import BusyPoll
from rngd.source import EntropySource

log = logging.getLogger(__name__)

_FD_SIZE = array.array("i").itemsize
_ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _FD_SIZE)


class Connection:
    def __init__(
        self,
        sock: trio.socket.SocketType,
        name: str,
        source: EntropySource,
        budget: Budget,
        *,
        peer: Peer | None = None,
        poll: BusyPoll | None = None,
    ) -> None:
        self.sock = sock
        self.name = name
        self.prefix = f"{name}: "
        #: Who connected (SO_PEERCRED at accept), for the log lines.
        self.peer = peer
        self.counters = ConnectionCounters(lambda: source.health_failures)
        #: trio time the connection started being served (see `uptime`).
        self.started = trio.current_time()
        #: How it ended, for the disconnect line.
        self._ending = "closed by rngd"
        #: The connect line is logged (at the first SET_FEATURES).
        self._announced = False
        self.session = Session()
        self.reader = MessageReader()
        self.incident = IncidentLog(log, self.prefix)
        self.source = source
        self.budget = budget
        #: How its rings poll before they sleep (`--poll-us`; None: never).
        self.poll = poll
        #: Memory and vrings, while `run` runs.
        self.device: Device | None = None

    # --- lifetime ---

    async def run(self) -> None:
        """Serve the connection until the VMM hangs up or breaks the protocol.

        Whatever way it ends, every task is cancelled, the memory unmapped and every fd we
        received closed before this returns.
        """
        try:
            async with trio.open_nursery() as nursery:
                self.device = Device(
                    self.session,
                    self.source,
                    self.budget,
                    self.counters,
                    self.incident,
                    nursery,
                    self.prefix,
                    self.poll,
                )
                try:
                    await self._serve()
                except ProtocolError as exc:
                    log.warning("%sdisconnecting: %s", self.prefix, exc)
                    self._ending = "protocol error"
                nursery.cancel_scope.cancel()
        finally:
            self._release()

    def uptime(self) -> float:
        return trio.current_time() - self.started

    def summary(self) -> str:
        """The peer, the time connected and the counters so far, as the log lines give them."""
        counters = self.counters
        return (
            f"{describe(self.peer)} uptime={self.uptime():.1f}s {counters.total()} "
            f"health_failures={counters.health_failures()}"
        )

    def _release(self) -> None:
        device = self.device
        if device is not None and (device.memory_tables > 1 or device.vring_starts > 1):
            log.info(
                "%s%d memory changes and %d vring starts on this connection",
                self.prefix,
                device.memory_tables,
                device.vring_starts,
            )
        self.incident.flush()
        self.reader.close()
        if device is not None:
            # Its vrings' tasks have ended with the nursery.
            device.drop_resources()
        # Every ring has stopped: the counters are final.
        log.info("%sVMM disconnected (%s): %s", self.prefix, self._ending, self.summary())

    async def _serve(self) -> None:
        while True:
            message = await self._receive()
            if message is None:
                self._ending = "hung up"
                return
            reply = await self._dispatch(message)
            if reply is not None:
                try:
                    await self.sock.send(reply)
                except OSError as exc:
                    raise ProtocolError(f"cannot send reply: {exc}") from exc

    async def _receive(self) -> Message | None:
        """The next message, or None at a clean end of stream."""
        while True:
            message = self.reader.next()
            if message is not None:
                return message
            try:
                data, ancdata, flags, _ = await self.sock.recvmsg(
                    self.reader.wanted(), _ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
                )
            except OSError as exc:
                raise ProtocolError(f"receive failed: {exc}") from exc
            fds = _fds_from(ancdata)
            if flags & socket.MSG_CTRUNC:
                for fd in fds:
                    os.close(fd)
                raise ProtocolError("a message carried more fds than any request allows")
            if not data:
                for fd in fds:
                    os.close(fd)
                if self.reader.pending():
                    raise ProtocolError("VMM hung up in the middle of a message")
                return None
            self.reader.feed(data, fds)

    # --- requests ---

    async def _dispatch(self, message: Message) -> bytes | None:
        log.debug(
            "%s%s flags=%#x size=%d fds=%d",
            self.prefix,
            message.name,
            message.flags,
            len(message.payload),
            len(message.fds),
        )
        try:
            event = self.session.handle(message)
            assert self.device is not None
            reply = await self.device.apply(message, event)
            if message.request == Request.SET_FEATURES:
                self._features_set()
            return reply
        except MessageError as exc:
            kind = "refused" if isinstance(exc, RequestRejected) else "malformed"
            self.incident("%s %s: %s", message.name, kind, exc)
            self.counters.malformed += 1
            if message.request in REQUESTS_WITH_REPLY:
                # The VMM waits for an answer we cannot give; hanging up beats a hang.
                raise ProtocolError(f"cannot answer {message.name}") from exc
            return self.session.ack(message, False)
        finally:
            if message.fds:
                self.incident("%s: closing %d unexpected fds", message.name, len(message.fds))
                message.close_fds()

    def _features_set(self) -> None:
        """The one line per connection that says who connected and what was negotiated: at
        the first SET_FEATURES (QEMU sends one at every device start, a guest reboot say)."""
        first, self._announced = not self._announced, True
        session = self.session
        log.log(
            logging.INFO if first else logging.DEBUG,
            "%sVMM connected: %s features=%#x (%s) protocol_features=%#x (%s)",
            self.prefix,
            describe(self.peer),
            session.acked_features,
            VirtioFeatures(session.acked_features).name or "none",
            session.acked_protocol_features,
            ProtocolFeatures(session.acked_protocol_features).name or "none",
        )


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _FD_SIZE
            fds.extend(array.array("i", data[:usable]))
    return fds
