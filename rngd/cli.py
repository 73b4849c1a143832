"""Command line: the same options as vhost-device-rng, plus a few an operator needs."""

from __future__ import annotations

import enum
import gc
import logging
import sys
from typing import Annotated

import trio
import typer

from rngd import __version__
from rngd.bandwidth import ShareMode
from rngd.config import DEFAULT_POLL_US, MAX_PERIOD_MS, MAX_POLL_US, ConfigError, DaemonConfig
from rngd.health import HealthMode

PROG = "vhost-device-rng"

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def _version(value: bool) -> None:
    if value:
        print(f"{PROG} (rngd) {__version__}")
        raise typer.Exit()


def _capabilities(value: bool) -> None:
    if value:
        print('{"type": "rng"}')
        raise typer.Exit()


def _octal(value: str) -> int:
    try:
        return int(value, 8)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an octal mode such as 0660") from None


@app.command(
    help="vhost-user VirtIO RNG back-end: serves random bytes from FILENAME to guests "
    "through vhost-user sockets PATH0 .. PATH<count-1>, or through the listening sockets "
    "systemd passes (socket activation, LISTEN_FDS)."
)
def run(
    socket_path: Annotated[
        str | None,
        typer.Option(
            "-s",
            "--socket-path",
            help="Location of the vhost-user Unix sockets; suffixed with 0 .. socket-count-1.",
            show_default=False,
        ),
    ] = None,
    filename: Annotated[
        str,
        typer.Option(
            "-f", "--filename", "--rng-source", help="Random number generator source file."
        ),
    ] = "/dev/urandom",
    socket_count: Annotated[
        int | None,
        typer.Option(
            "-c",
            "--socket-count",
            help="Number of guests (sockets) to serve (default: 1, or the number of sockets "
            "systemd passes).",
            show_default=False,
        ),
    ] = None,
    period: Annotated[
        int,
        typer.Option(
            "-p",
            "--period",
            help=f"Period in ms (1..{MAX_PERIOD_MS}) over which --max-bytes may be delivered.",
        ),
    ] = MAX_PERIOD_MS,
    max_bytes: Annotated[
        int | None,
        typer.Option(
            "-m",
            "--max-bytes",
            help="Most bytes all guests together get per period (default: unlimited).",
        ),
    ] = None,
    share: Annotated[
        ShareMode,
        typer.Option(
            "--share",
            help="How guests share --max-bytes: 'split' gives each socket max-bytes/count "
            "(as vhost-device-rng); 'fair' lets busy guests use what idle ones leave, "
            "in equal shares.",
        ),
    ] = ShareMode.SPLIT,
    socket_mode: Annotated[
        str,
        typer.Option("--socket-mode", help="Permissions of the socket files, in octal."),
    ] = "0600",
    socket_group: Annotated[
        str | None,
        typer.Option("--socket-group", help="Group to own the socket files (with --socket-mode)."),
    ] = None,
    allow_uid: Annotated[
        list[int] | None,
        typer.Option(
            "--allow-uid",
            metavar="UID",
            help="Accept connections only from this user id (SO_PEERCRED); repeat for more. "
            "On top of --socket-mode. Default: anyone the socket file lets in.",
            show_default=False,
        ),
    ] = None,
    health_tests: Annotated[
        HealthMode,
        typer.Option(
            "--health-tests",
            help="Continuous health tests of the source (NIST SP 800-90B repetition count and "
            "adaptive proportion tests, and a start-up test): 'auto' tests every source but "
            "the kernel's CSPRNG (/dev/urandom, /dev/random).",
            case_sensitive=False,
        ),
    ] = HealthMode.AUTO,
    poll_us: Annotated[
        int,
        typer.Option(
            "--poll-us",
            help="After serving a request, look for the guest's next one for this many "
            f"microseconds (0..{MAX_POLL_US}) before sleeping: the guest need not kick nor "
            "wait for a wake-up, for more CPU time. At most one ring per CPU but one polls "
            "at a time; 0 never polls.",
        ),
    ] = DEFAULT_POLL_US,
    log_level: Annotated[
        LogLevel,
        typer.Option("--log-level", help="Log verbosity.", case_sensitive=False),
    ] = LogLevel.INFO,
    fd: Annotated[
        int | None,
        typer.Option(
            "--fd",
            help="Serve this already-connected vhost-user socket instead of --socket-path, "
            "and exit when it disconnects.",
        ),
    ] = None,
    print_capabilities: Annotated[
        bool,
        typer.Option(
            "--print-capabilities",
            callback=_capabilities,
            is_eager=True,
            help="Print the back-end's capabilities as JSON (vhost-user convention) and exit.",
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "-V", "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    try:
        from rngd.daemon import Daemon, block_stop_signals
        from rngd.daemon import run as run_daemon
    except ImportError as exc:
        # A host the ring path is not argued for (byte order, memory model): one line.
        if not str(exc).startswith("rngd's virtqueue"):
            raise
        print(f"{PROG}: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    from rngd.systemd import inherited_sockets

    logging.basicConfig(
        level=log_level.value.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    listen_fds = tuple(inherited.fd for inherited in inherited_sockets())
    config = DaemonConfig(
        socket_path=socket_path or "",
        socket_count=socket_count if socket_count is not None else len(listen_fds) or 1,
        filename=filename,
        period_ms=period,
        max_bytes=max_bytes,
        share=share,
        socket_mode=_octal(socket_mode),
        socket_group=socket_group,
        allow_uids=tuple(allow_uid or ()),
        connected_fd=fd,
        listen_fds=listen_fds,
        health_tests=health_tests,
        poll_us=poll_us,
    )
    block_stop_signals()
    with Daemon(config) as daemon:
        # Everything made so far (the interpreter's, trio's, typer's objects) lives as long as
        # the daemon: keep it out of the collector's full passes, which would otherwise walk all
        # of it now and then in the middle of some guest's request.
        gc.freeze()
        trio.run(run_daemon, daemon)


def main(argv: list[str] | None = None) -> int:
    """Entry point. Every usage or configuration error is one line on stderr and exit 1."""
    try:
        result = app(args=argv, prog_name=PROG, standalone_mode=False)
    except typer.TyperException as exc:
        # Usage errors (a missing option, "abc" for a number): one line, not a help box.
        format_message = getattr(exc, "format_message", None)
        text = format_message() if callable(format_message) else str(exc)
        print(f"{PROG}: error: {text}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except (typer.Abort, KeyboardInterrupt):
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())


def console_main() -> None:
    sys.exit(main())
