"""The shipped systemd units under a real systemd as PID 1, in a small Debian 12 VM.

Host side (`scripts/systemd-vm`, root): builds a Debian 12 image with `mmdebstrap` (systemd,
udev, Debian's kernel, Python with rngd's dependencies in a venv at /opt/rngd), cached under
`.cache/systemd-vm/<key>` and rebuilt only when its inputs change; then boots it under QEMU with
two disks: the image (read-only, `snapshot=on`) and a small payload disk made per run with this
checkout's rngd wheel, `contrib/systemd/rngd@.socket` and `rngd@.service` as they are, and a
random source file that QEMU's own `virtio-rng-pci` also serves (so the VM has a `/dev/hwrng`
whose bytes are known). The VM's console is the host's view: the checks print `RNGD-VM` lines
there, which the host parses; it exits 1 unless every check passed.

VM side (`python -m rngd.testing.systemd_vm inside PAYLOAD`, started by a unit of the image
after pip installed the wheel): installs the two units unchanged, enables instances of them,
and checks through `rngd.testing.Frontend`:

- `test`: the units as shipped (`/dev/urandom`). Socket activation, a read through
  /run/rngd/test.sock0, `systemctl status` (STATUS= with the guest count), the sandbox in
  effect (/proc/PID/status), `systemd-analyze security`, a clean `systemctl stop`.
- `hw`: a drop-in as the service's comment says for `/dev/hwrng` (PrivateDevices=no,
  DevicePolicy=closed, DeviceAllow=/dev/hwrng r, a group that can read it); the bytes read
  through rngd are the source file's, in order (`match_stream`).
- `acl`, `aclhost`: `--allow-uid 1000` with PrivateUsers=yes as shipped, and with
  PrivateUsers=no; a VMM of uid 1000 (and root) connects to each.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

from rngd.testing.qemu import QemuError, choose_accel

#: Bump when the image's recipe changes (forces a rebuild).
IMAGE_VERSION = "1"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "linux-image-amd64",
    "initramfs-tools",
    "python3",
    "python3-venv",
    "kmod",
    "procps",
)
#: rngd's venv in the image; the units run /usr/local/bin/vhost-device-rng, a link into it.
VENV = "/opt/rngd"
#: The uid of a VMM user of the image, in group kvm (the socket unit's SocketGroup=).
VMM_UID = 1000
SOURCE_BYTES = 4 << 20
READ_BYTES = 64 * 1024
MARK = "RNGD-VM"
IMAGE_SIZE = "2G"
QEMU = "qemu-system-x86_64"
#: Every check the VM must report as passed.
CHECKS = (
    "install",
    "status",
    "sandbox",
    "read",
    "security",
    "hwrng",
    "allow-uid",
    "stop",
    "journal-hw",
    "journal-acl",
    "journal-aclhost",
)
MASKED = (
    "serial-getty@ttyS0.service",
    "getty@tty1.service",
    "getty-static.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "fstrim.timer",
    "e2scrub_all.timer",
)

#: Runs at boot in the image: installs the payload's wheel, then hands over to `inside`.
VMTEST_SH = f"""#!/bin/sh
say() {{ echo "{MARK} $*" > /dev/console; }}
mkdir -p /mnt/payload
if ! mount -o ro /dev/vdb /mnt/payload; then
    say "FAIL payload cannot mount /dev/vdb"; say "DONE"; systemctl poweroff; exit 1
fi
if ! env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin {VENV}/bin/pip install -q --no-index \\
        --no-deps /mnt/payload/rngd-*.whl > /dev/console 2>&1; then
    say "FAIL install pip could not install the payload's wheel"; say "DONE"
    systemctl poweroff; exit 1
fi
exec {VENV}/bin/python -m rngd.testing.systemd_vm inside /mnt/payload
"""

VMTEST_UNIT = """[Unit]
Description=rngd checks under systemd (rngd.testing.systemd_vm)
After=multi-user.target
Wants=multi-user.target

[Service]
Type=exec
ExecStart=/usr/local/sbin/rngd-vmtest
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=default.target
"""

#: /dev/hwrng is root's alone on Debian; the hw instance reads it through this group.
HWRNG_GROUP = "hwrng"
HWRNG_UDEV_RULE = f'KERNEL=="hw_random", GROUP="{HWRNG_GROUP}", MODE="0640"\n'

#: Drop-ins: the shipped units stay as they are; these instances change what their comments say.
DROP_INS = {
    "hw": f"""[Service]
ExecStart=
ExecStart=/usr/local/bin/vhost-device-rng --filename /dev/hwrng
PrivateDevices=no
DevicePolicy=closed
DeviceAllow=/dev/hwrng r
SupplementaryGroups={HWRNG_GROUP}
""",
    "acl": f"""[Service]
ExecStart=
ExecStart=/usr/local/bin/vhost-device-rng --filename /dev/urandom --allow-uid {VMM_UID}
""",
    "aclhost": f"""[Service]
ExecStart=
ExecStart=/usr/local/bin/vhost-device-rng --filename /dev/urandom --allow-uid {VMM_UID}
PrivateUsers=no
""",
}


class VmError(Exception):
    """The image could not be built or the VM could not be run."""


def _say(message: str) -> None:
    print(f"systemd-vm: {message}", file=sys.stderr, flush=True)


def _run(cmd: Sequence[str], **kwargs: object) -> None:
    _say("+ " + " ".join(cmd))
    try:
        subprocess.run(list(cmd), check=True, **kwargs)  # type: ignore[call-overload]
    except (OSError, subprocess.CalledProcessError) as exc:
        raise VmError(f"{cmd[0]} failed: {exc}") from exc


# --- host: the image -------------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path(__file__).resolve().parents[2] / ".cache" / "systemd-vm"


def _checkout() -> Path:
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise VmError("run from a source checkout (pyproject.toml not found)")
    return root


def _dependency_versions() -> dict[str, str]:
    """rngd's run-time dependencies as installed here: they go into the image's venv."""
    return {name: importlib.metadata.version(name) for name in ("trio", "typer")}


def _image_key() -> str:
    blob = json.dumps(
        {
            "version": IMAGE_VERSION,
            "suite": SUITE,
            "packages": PACKAGES,
            "deps": _dependency_versions(),
            "vmtest": VMTEST_SH,
            "unit": VMTEST_UNIT,
            "udev": HWRNG_UDEV_RULE,
            "masked": MASKED,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Image:
    disk: Path
    kernel: Path
    initrd: Path


def build_image(cache: Path, *, force: bool = False) -> Image:
    """The cached image, built first if its inputs changed (root, network: a few minutes)."""
    key = _image_key()
    out = cache / key
    image = Image(out / "disk.img", out / "vmlinuz", out / "initrd.img")
    if not force and (out / "ok").is_file():
        return image
    if os.geteuid() != 0:
        raise VmError("building the image needs root (mmdebstrap, chroot)")
    for tool in ("mmdebstrap", "mke2fs"):
        if shutil.which(tool) is None:
            raise VmError(f"{tool} not found: apt-get install mmdebstrap e2fsprogs")
    cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="build-", dir=cache) as tmp:
        work = Path(tmp)
        wheels = work / "wheels"
        _run(
            [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), str(_checkout())],
            stdout=subprocess.DEVNULL,
        )
        for own in wheels.glob("rngd-*.whl"):
            own.unlink()  # rngd itself comes with each run's payload
        (work / "rngd-vmtest").write_text(VMTEST_SH)
        (work / "rngd-vmtest.service").write_text(VMTEST_UNIT)
        (work / "hwrng.rules").write_text(HWRNG_UDEV_RULE)
        clean = "env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin"
        hooks = [
            f'mkdir -p "$1/tmp/wheels" && cp {wheels}/*.whl "$1/tmp/wheels/"',
            f'chroot "$1" {clean} python3 -m venv {VENV}',
            f'chroot "$1" {clean} {VENV}/bin/pip install -q --no-index --find-links /tmp/wheels '
            + " ".join(_dependency_versions()),
            'rm -rf "$1/tmp/wheels"',
            f'ln -sf {VENV}/bin/vhost-device-rng "$1/usr/local/bin/vhost-device-rng"',
            f'install -m 755 {work}/rngd-vmtest "$1/usr/local/sbin/rngd-vmtest"',
            f'install -m 644 {work}/rngd-vmtest.service "$1/etc/systemd/system/"',
            f'install -m 644 {work}/hwrng.rules "$1/etc/udev/rules.d/60-rngd-hwrng.rules"',
            f'chroot "$1" groupadd --system {HWRNG_GROUP}',
            f'chroot "$1" useradd --uid {VMM_UID} --user-group --groups kvm --no-create-home vmm',
            'chroot "$1" systemctl enable rngd-vmtest.service',
            # The console is the checks' output, not a login prompt; and nothing else runs
            # (getty-static waits 20 s for a D-Bus the image does not have).
            'chroot "$1" systemctl mask ' + " ".join(MASKED),
            'echo rngd-vm > "$1/etc/hostname"',
            f'cp "$1"/boot/vmlinuz-* {work}/vmlinuz && cp "$1"/boot/initrd.img-* {work}/initrd.img',
        ]
        cmd = [
            "mmdebstrap",
            "--variant=apt",
            "--include=" + ",".join(PACKAGES),
            *(f"--customize-hook={hook}" for hook in hooks),
            SUITE,
            str(work / "root"),
            MIRROR,
        ]
        _run(cmd, env={k: v for k, v in os.environ.items() if not k.startswith("PIP_")})
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        _run(["mke2fs", "-q", "-t", "ext4", "-L", "rngd-vm", "-d", str(work / "root"),
              str(image.disk), IMAGE_SIZE])  # fmt: skip
        shutil.move(work / "vmlinuz", image.kernel)
        shutil.move(work / "initrd.img", image.initrd)
    (out / "ok").write_text(f"{key}\n")
    for old in cache.iterdir():
        if old.is_dir() and old != out:
            shutil.rmtree(old, ignore_errors=True)
    _say(f"image {key} built in {time.monotonic() - started:.0f} s")
    return image


def build_payload(workdir: Path) -> tuple[Path, Path]:
    """The payload disk (wheel, units, source) and the source file QEMU's virtio-rng serves."""
    root = _checkout()
    staging = workdir / "payload"
    staging.mkdir()
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(staging), str(root)],
        stdout=subprocess.DEVNULL,
    )
    for unit in ("rngd@.socket", "rngd@.service"):
        shutil.copyfile(root / "contrib" / "systemd" / unit, staging / unit)
    source = workdir / "source.bin"
    source.write_bytes(os.urandom(SOURCE_BYTES))
    shutil.copyfile(source, staging / "source.bin")
    disk = workdir / "payload.img"
    _run(["mke2fs", "-q", "-t", "ext4", "-d", str(staging), str(disk), "64M"])
    return disk, source


def vm_command(image: Image, payload: Path, source: Path, *, accel: str) -> list[str]:
    return [
        QEMU,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-accel",
        accel,
        "-m",
        "1024",
        "-smp",
        "2",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        "root=/dev/vda rw console=ttyS0 systemd.show_status=1",
        "-drive",
        f"file={image.disk},format=raw,if=virtio,snapshot=on",
        "-drive",
        f"file={payload},format=raw,if=virtio,readonly=on",
        "-object",
        f"rng-random,id=rng0,filename={source}",
        "-device",
        "virtio-rng-pci,rng=rng0",
        "-serial",
        "stdio",
        "-no-reboot",
    ]


@dataclasses.dataclass
class Results:
    passed: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)
    info: list[str] = dataclasses.field(default_factory=list)
    done: bool = False

    def feed(self, line: str) -> None:
        at = line.find(f"{MARK} ")
        if at < 0:
            return
        kind, _, rest = line[at + len(MARK) + 1 :].strip().partition(" ")
        if kind == "ok" and rest.split(" ", 1)[0] in self.names():
            self.failed.append(f"{rest.split(' ', 1)[0]} reported twice")
        if kind == "ok":
            self.passed.append(rest)
        elif kind == "FAIL":
            self.failed.append(rest)
        elif kind == "INFO":
            self.info.append(rest)
        elif kind == "DONE":
            self.done = True

    def names(self) -> set[str]:
        return {result.split(" ", 1)[0] for result in self.passed}

    def missing(self) -> list[str]:
        return [name for name in CHECKS if name not in self.names()]

    @property
    def ok(self) -> bool:
        return self.done and not self.failed and not self.missing()


def run_vm(cmd: Sequence[str], *, timeout: float, echo: bool) -> tuple[Results, list[str]]:
    """Boot, collect the console until QEMU exits (or `timeout`), parse the RNGD-VM lines."""
    _say("+ " + " ".join(cmd))
    results = Results()
    lines: list[str] = []
    with subprocess.Popen(
        list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as proc:
        assert proc.stdout is not None
        booted = time.monotonic()
        deadline = booted + timeout
        timer = _Killer(proc, deadline)
        try:
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                lines.append(line)
                if echo:
                    print(line, flush=True)
                elif line.startswith(MARK):
                    print(f"{time.monotonic() - booted:5.0f} s  {line}", flush=True)
                results.feed(line)
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
        code = proc.wait()
    if timer.fired:
        results.failed.append(f"timeout the VM ran for more than {timeout:.0f} s")
    elif code != 0:
        results.failed.append(f"qemu exited with {code}")
    return results, lines


class _Killer:
    """Kills QEMU at a deadline, from a thread (the console loop blocks on reads)."""

    def __init__(self, proc: subprocess.Popen[bytes], deadline: float) -> None:
        self.fired = False
        self._done = threading.Event()

        def watch() -> None:
            if not self._done.wait(max(0.0, deadline - time.monotonic())):
                self.fired = True
                proc.kill()

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self._done.set()
        self._thread.join()


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["inside"]:
        return inside(Path(args_list[1]))
    parser = argparse.ArgumentParser(
        prog="systemd-vm",
        description="Boot a Debian 12 VM with systemd as PID 1 and check rngd's shipped units "
        "there (socket activation, STATUS=, /dev/hwrng, --allow-uid, stop, security).",
    )
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--rebuild", action="store_true", help="rebuild the image")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--timeout", type=float, default=900.0, help="for the VM run, seconds")
    parser.add_argument("--echo", action="store_true", help="print the whole console")
    parser.add_argument(
        "--accel",
        default="auto",
        choices=("auto", "kvm", "tcg"),
        help="auto (the default): KVM if the test guest boots with it, else TCG",
    )
    args = parser.parse_args(args_list)
    started = time.monotonic()
    try:
        image = build_image(args.cache_dir or default_cache_dir(), force=args.rebuild)
        if args.build_only:
            print(f"image {image.disk}")
            return 0
        with tempfile.TemporaryDirectory(prefix="rngd-systemd-vm-") as tmp:
            payload, source = build_payload(Path(tmp))
            accel = choose_accel(args.accel, QEMU, log=_say)
            cmd = vm_command(image, payload, source, accel=accel)
            results, lines = run_vm(cmd, timeout=args.timeout, echo=args.echo)
    except (VmError, QemuError) as exc:
        print(f"systemd-vm: error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    if not results.done and not args.echo:
        print("\n".join(lines[-60:]))
    print(
        f"systemd-vm: {len(results.passed)} passed, {len(results.failed)} failed"
        f"{'' if results.done else ', no DONE line'} in {elapsed:.0f} s"
    )
    for failure in results.failed:
        print(f"systemd-vm: FAILED: {failure}")
    if results.missing():
        print(f"systemd-vm: FAILED: no result from {', '.join(results.missing())}")
    return 0 if results.ok else 1


# --- VM side -----------------------------------------------------------------------------------


class _Checks:
    """Prints each check's result on the console (and stdout, the journal)."""

    def __init__(self) -> None:
        self.failed = 0
        self._console: TextIO
        try:
            self._console = open("/dev/console", "w")  # noqa: SIM115
        except OSError:
            self._console = sys.stdout

    def line(self, text: str) -> None:
        # The console only: the unit also sends stdout there, and each line must come once.
        self._console.write(f"{MARK} {text}\n")
        self._console.flush()

    def info(self, text: str) -> None:
        for part in text.splitlines() or [""]:
            self.line(f"INFO {part}")

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        if not ok:
            self.failed += 1
        self.line(f"{'ok' if ok else 'FAIL'} {name}{' ' + detail if detail else ''}")
        return ok

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Any exception inside is that check's failure, and the next ones still run."""
        try:
            yield
        except Exception as exc:  # reported, then on to the next check
            self.check(name, False, f"{type(exc).__name__}: {exc}")


def _sh(*cmd: str, check: bool = False) -> str:
    result = subprocess.run(list(cmd), capture_output=True, text=True, check=False, timeout=120)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {result.returncode}: {result.stderr.strip()}")
    return result.stdout + result.stderr


def _show(unit: str, prop: str) -> str:
    return _sh("systemctl", "show", "-P", prop, unit).strip()


def _until(what: str, predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    """Polls `predicate` (it reads state that changes when the daemon acts)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


async def _read_through(path: str, nbytes: int) -> bytes:
    from rngd.testing.frontend import connect_when_listening

    vmm = await connect_when_listening(path, timeout=60)
    async with vmm:
        await vmm.start_qemu72(queue_size=4)
        return await vmm.read_random(nbytes)


async def _probe(path: str) -> tuple[bool, str]:
    """As a VMM: connect and ask GET_FEATURES. True if answered, False if hung up on."""
    import trio

    from rngd.testing.frontend import BackendError, connect_when_listening

    with trio.fail_after(60):
        vmm = await connect_when_listening(path, timeout=60)
        async with vmm:
            try:
                features = await vmm.get_features()
            except (BackendError, OSError, EOFError) as exc:
                return False, f"refused ({type(exc).__name__})"
            return True, f"accepted features={features:#x}"


def _probe_as(uid: int, path: str) -> tuple[bool, str]:
    """`_probe` in a child process of user `uid` with its groups (kvm may connect): forked,
    so that it needs no Python start-up of its own (seconds under TCG)."""
    import grp
    import pwd

    import trio

    user = pwd.getpwuid(uid)
    groups = [g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 2
        try:
            os.close(read_end)
            os.setgroups(groups)
            os.setgid(user.pw_gid)
            os.setuid(uid)
            accepted, said = trio.run(_probe, path)
            os.write(write_end, said.encode())
            code = 0 if accepted else 3
        except BaseException as exc:
            os.write(write_end, f"{type(exc).__name__}: {exc}".encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        said = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 3):
        raise RuntimeError(f"probe as uid {uid} failed ({code}): {said}")
    return code == 0, said


def _journal(unit: str) -> str:
    return _sh("journalctl", "--no-pager", "-o", "cat", "-u", unit)


def _sandbox(pid: str) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    fields["uid_map"] = " ".join(Path(f"/proc/{pid}/uid_map").read_text().split())
    return fields


def inside(payload: Path) -> int:
    import trio

    from rngd.testing.guest import match_stream

    checks = _Checks()
    try:
        checks.info(f"systemd {_sh('systemctl', '--version').splitlines()[0]}")
        with checks.step("install"):
            for unit in ("rngd@.socket", "rngd@.service"):
                shutil.copyfile(payload / unit, Path("/etc/systemd/system") / unit)
            for instance, text in DROP_INS.items():
                drop = Path(f"/etc/systemd/system/rngd@{instance}.service.d")
                drop.mkdir(parents=True, exist_ok=True)
                (drop / "vmtest.conf").write_text(text)
            _sh("systemctl", "daemon-reload", check=True)
            sockets = [f"rngd@{name}.socket" for name in ("test", "hw", "acl", "aclhost")]
            _sh("systemctl", "enable", "--now", *sockets, check=True)
            checks.check(
                "install",
                all(_show(s, "ActiveState") == "active" for s in sockets)
                and _show("rngd@test.service", "ActiveState") == "inactive",
                "units unchanged, rngd@{test,hw,acl,aclhost}.socket enabled and listening, "
                "no service started before a VMM connects",
            )

        service = "rngd@test.service"
        with checks.step("read"):

            async def read_and_look() -> tuple[bytes, bytes]:
                from rngd.testing.frontend import connect_when_listening

                vmm = await connect_when_listening("/run/rngd/test.sock0", timeout=60)
                async with vmm:
                    await vmm.start_qemu72(queue_size=4)
                    first = await vmm.read_random(READ_BYTES)
                    await trio.to_thread.run_sync(look_while_connected)
                    second = await vmm.read_random(READ_BYTES)
                return first, second

            def look_while_connected() -> None:
                _until(
                    "STATUS= shows the guest",
                    lambda: _show(service, "StatusText") == "1 of 2 guests connected",
                )
                status = _sh("systemctl", "status", "--no-pager", "--lines=0", service)
                checks.info(status)
                checks.check(
                    "status",
                    'Status: "1 of 2 guests connected"' in status,
                    "systemctl status shows STATUS=: 1 of 2 guests connected",
                )
                pid = _show(service, "MainPID")
                box = _sandbox(pid)
                checks.info(
                    f"sandbox: NoNewPrivs={box['NoNewPrivs']} Seccomp={box['Seccomp']} "
                    f"CapEff={box['CapEff']} uid_map={box['uid_map']}"
                )
                checks.check(
                    "sandbox",
                    box["NoNewPrivs"] == "1"
                    and box["Seccomp"] == "2"
                    and int(box["CapEff"], 16) == 0
                    and not box["uid_map"].startswith("0 0 4294967295"),
                    "no new privileges, a seccomp filter, no capabilities, a private user "
                    "namespace",
                )

            first, second = trio.run(read_and_look)
            checks.check(
                "read",
                len(first) == len(second) == READ_BYTES
                and first != second
                and len(set(first)) > 200,
                f"2 x {READ_BYTES} B through /run/rngd/test.sock0 (socket-activated rngd, "
                "/dev/urandom), checked by the driver model",
            )
            _until("STATUS= back to 0", lambda: _show(service, "StatusText").startswith("0 of"))

        with checks.step("security"):
            text = _sh("systemd-analyze", "security", "--no-pager", service)
            found = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", text)
            checks.info(found.group(0) if found else text[-500:])
            checks.check(
                "security",
                found is not None and float(found.group(1)) <= 0.5,
                f"systemd-analyze security: {found.group(1)} {found.group(2)}" if found else "",
            )
            for variant in ("hw", "aclhost"):
                text = _sh("systemd-analyze", "security", "--no-pager", f"rngd@{variant}.service")
                found = re.search(r"Overall exposure level for \S+: [0-9.]+ \w+", text)
                checks.info(found.group(0) if found else text[-300:])

        with checks.step("hwrng"):
            current = Path("/sys/class/misc/hw_random/rng_current").read_text().strip()
            got = trio.run(_read_through, "/run/rngd/hw.sock0", READ_BYTES)
            source = (payload / "source.bin").read_bytes()
            offset, skipped = match_stream(source, got, max_gap=256 * 1024)
            checks.check(
                "hwrng",
                len(got) == READ_BYTES and current.startswith("virtio_rng"),
                f"{READ_BYTES} B through /run/rngd/hw.sock0 from /dev/hwrng ({current}) are the "
                f"source file's, in order (from offset {offset}, {skipped} B skipped)",
            )

        with checks.step("allow-uid"):
            root_acl, root_said = _probe_as(0, "/run/rngd/acl.sock0")
            vmm_acl, vmm_said = _probe_as(VMM_UID, "/run/rngd/acl.sock0")
            root_host, _ = _probe_as(0, "/run/rngd/aclhost.sock0")
            vmm_host, vmm_host_said = _probe_as(VMM_UID, "/run/rngd/aclhost.sock0")
            seen = re.findall(r"uid=(\d+)", _journal("rngd@acl.service"))
            checks.info(f"acl (PrivateUsers=yes): root {root_said}; uid {VMM_UID} {vmm_said}")
            checks.info(f"acl: peer uids rngd logged: {sorted(set(seen))}")
            checks.info(f"aclhost (PrivateUsers=no): uid {VMM_UID} {vmm_host_said}")
            checks.check(
                "allow-uid",
                # What docs/security.md says: under PrivateUsers=yes a VMM of uid 1000 reaches rngd
                # as 65534 and is refused; with PrivateUsers=no it is let in.
                not root_acl and not root_host and not vmm_acl and "65534" in seen and vmm_host,
                f"--allow-uid {VMM_UID}: root refused; uid {VMM_UID} "
                f"{'accepted' if vmm_acl else 'refused'} with PrivateUsers=yes (rngd saw "
                f"uid {'/'.join(sorted(set(seen))) or '?'}), "
                f"{'accepted' if vmm_host else 'refused'} with PrivateUsers=no",
            )

        with checks.step("stop"):
            _sh("systemctl", "stop", "rngd@test.socket", service, check=True)
            result = {p: _show(service, p) for p in ("Result", "ExecMainCode", "ExecMainStatus")}
            log = _journal(service)
            checks.check(
                "stop",
                result == {"Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"}
                and "Traceback" not in log
                and not Path("/run/rngd/test.sock0").exists(),
                f"systemctl stop: {result}, no traceback, socket files removed",
            )

        for name in ("hw", "acl", "aclhost"):
            log = _journal(f"rngd@{name}.service")
            checks.check(f"journal-{name}", "Traceback" not in log, "no traceback")
    except Exception as exc:
        checks.check("inside", False, f"{type(exc).__name__}: {exc}")
    finally:
        checks.line(f"DONE failed={checks.failed}")
        _sh("systemctl", "poweroff", "--no-block")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
