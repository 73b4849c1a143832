"""Debian packages of the host's architecture or of another one, downloaded, never installed.

The test guests (rngd/testing/guest.py) and the arm64 test run (scripts/test-arm64) need Debian
packages: for amd64 from the host's own apt index, for arm64 on an amd64 host from an index of
that architecture. `dpkg --add-architecture arm64` would give one, but it changes the host for
good: every later `apt-get update` fetches arm64 lists and every `apt-get install` weighs arm64
packages. So `Apt.for_arch("arm64")` keeps a private apt state instead, under
`.cache/apt-arm64/` in a checkout: its own sources (the host's Debian mirrors and this release's
suites, `Signed-By` Debian's archive keyring), lists, package cache and an empty dpkg status,
passed to `apt-get`/`apt-cache` with `-o`. apt checks the index's signature and each .deb's
SHA256 against it exactly as it does for the host. It is refreshed when a day old.

Packages are unpacked with `dpkg-deb -x` by the callers, never installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

#: Debian's archive keyring (package debian-archive-keyring), which signs every Debian suite.
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
#: A private index older than this is refreshed (kernel security updates come often).
MAX_INDEX_AGE = 24 * 3600.0


class AptError(Exception):
    """apt failed, or knows no such package."""


def _run(cmd: Sequence[str], *, cwd: Path | None = None) -> str:
    try:
        result = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise AptError(f"{cmd[0]} not found: this needs Debian's apt") from exc
    if result.returncode != 0:
        raise AptError(
            f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}"
        )
    return result.stdout


def host_arch() -> str:
    """The host's Debian architecture (amd64, arm64...)."""
    return _run(["dpkg", "--print-architecture"]).strip()


def cache_root() -> Path:
    """`.cache` in a source checkout, else `$XDG_CACHE_HOME/rngd` (or ~/.cache/rngd)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "rngd").is_dir():
        return root / ".cache"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "rngd"


def _host_sources() -> str:
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            texts.append(path.read_text())
    return "\n".join(texts)


def host_mirrors(sources: str | None = None) -> tuple[str, str]:
    """The Debian mirror and the Debian security mirror the host's apt sources use (the
    defaults if they name none), so that a private index fetches from where the host does.
    `sources`: the text of apt's sources files (default: the host's)."""
    sources = _host_sources() if sources is None else sources
    text = "\n".join(line for line in sources.splitlines() if not line.lstrip().startswith("#"))
    main = re.search(r"https?://\S*/debian/?(?=\s|$)", text)
    security = re.search(r"https?://\S*/debian-security/?(?=\s|$)", text)
    return (
        main.group(0).rstrip("/") if main else DEFAULT_MIRROR,
        security.group(0).rstrip("/") if security else DEFAULT_SECURITY_MIRROR,
    )


def host_codename() -> str:
    """This Debian release's codename (bookworm), from /etc/os-release."""
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            if key == "VERSION_CODENAME" and value.strip('"'):
                return value.strip('"')
    raise AptError("no VERSION_CODENAME in /etc/os-release: not a Debian release?")


@dataclasses.dataclass(frozen=True)
class Apt:
    """apt-get and apt-cache for one architecture: the host's own apt for the host's
    architecture (no options), a private state (`state`, see the module's docstring) for
    another."""

    arch: str
    state: Path | None = None

    @classmethod
    def for_arch(cls, arch: str | None = None, state: Path | None = None) -> Apt:
        """The host's apt for its own architecture (or `arch=None`), else a private one kept
        in `state` (default `.cache/apt-ARCH`), its index fetched or refreshed if need be."""
        native = host_arch()
        if arch is None or arch == native:
            return cls(native)
        apt = cls(arch, state or cache_root() / f"apt-{arch}")
        apt.ensure_index()
        return apt

    @property
    def options(self) -> list[str]:
        """The `-o` options that point apt at the private state ([] for the host's apt)."""
        if self.state is None:
            return []
        s = self.state
        options = [
            f"APT::Architecture={self.arch}",
            f"APT::Architectures::={self.arch}",
            f"Dir::Etc::SourceList={s / 'sources.list'}",
            f"Dir::Etc::SourceParts={s / 'sources.list.d'}",
            f"Dir::Etc::Preferences={s / 'preferences'}",
            f"Dir::Etc::PreferencesParts={s / 'preferences.d'}",
            f"Dir::State::Lists={s / 'lists'}",
            f"Dir::State::status={s / 'status'}",
            f"Dir::Cache={s / 'cache'}",
            # Kept even where the host's apt keeps none (Docker images), or each call would
            # parse the whole index again (seconds).
            f"Dir::Cache::pkgcache={s / 'cache' / 'pkgcache.bin'}",
            f"Dir::Cache::srcpkgcache={s / 'cache' / 'srcpkgcache.bin'}",
            # As root, apt would download as _apt, which cannot write into this cache.
            "APT::Sandbox::User=root",
        ]
        return [arg for option in options for arg in ("-o", option)]

    def _write_config(self) -> None:
        assert self.state is not None
        mirror, security = host_mirrors()
        codename = host_codename()
        for sub in ("sources.list.d", "preferences.d", "lists/partial", "cache/archives/partial"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        for empty in ("sources.list", "preferences", "status"):
            (self.state / empty).touch()
        stanza = "Types: deb\nURIs: {}\nSuites: {}\nComponents: main\nArchitectures: {}\n"
        stanza += f"Signed-By: {KEYRING}\n"
        sources = stanza.format(mirror, f"{codename} {codename}-updates", self.arch)
        sources += "\n" + stanza.format(security, f"{codename}-security", self.arch)
        path = self.state / "sources.list.d" / "debian.sources"
        if not path.is_file() or path.read_text() != sources:
            path.write_text(sources)
            # A new source makes the lists stale.
            (self.state / "updated").unlink(missing_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        assert self.state is not None
        self.state.mkdir(parents=True, exist_ok=True)
        with open(self.state / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def update(self) -> None:
        """`apt-get update` of the private index (the host's is the host's business)."""
        if self.state is None:
            raise AptError("the host's apt index is updated with apt-get update, as root")
        with self._locked():
            self._write_config()
            _run(["apt-get", *self.options, "-q", "update"])
            (self.state / "updated").touch()

    def ensure_index(self, max_age: float = MAX_INDEX_AGE) -> None:
        """Fetch the private index if there is none, refresh it if older than `max_age`
        (keeping the old one if that fails: no network is no reason to stop)."""
        assert self.state is not None
        with self._locked():
            self._write_config()
        stamp = self.state / "updated"
        with contextlib.suppress(OSError):
            if time.time() - stamp.stat().st_mtime < max_age:
                return
        try:
            self.update()
        except AptError as exc:
            if not stamp.is_file():
                raise
            print(f"apt ({self.arch}): keeping the old index: {exc}", file=sys.stderr)

    def show(self, packages: Iterable[str]) -> dict[str, dict[str, str]]:
        """{package: its candidate version's control fields}, in one apt-cache call."""
        names = list(dict.fromkeys(packages))
        if not names:
            return {}
        text = _run(["apt-cache", *self.options, "show", "--no-all-versions", *names])
        found: dict[str, dict[str, str]] = {}
        fields: dict[str, str] = {}
        key = ""
        for line in [*text.splitlines(), ""]:
            if not line:
                if "Package" in fields and "Version" in fields:
                    found.setdefault(fields["Package"], fields)
                fields = {}
                continue
            if line[0].isspace() and key:
                fields[key] += "\n" + line.strip()
                continue
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        missing = [name for name in names if name not in found]
        if missing:
            raise AptError(f"apt-cache knows no candidate for {', '.join(missing)} ({self.arch})")
        return found

    def fields(self, package: str) -> dict[str, str]:
        """The candidate version's control fields of a package."""
        return self.show([package])[package]

    def version(self, package: str) -> str:
        return self.fields(package)["Version"]

    def closure(self, packages: Iterable[str]) -> dict[str, str]:
        """{package: version} of `packages` and all they need (Depends and Pre-Depends),
        taking the first choice of each alternative, as apt itself would."""
        found: dict[str, str] = {}
        todo = set(packages)
        while todo:
            shown = self.show(sorted(todo))
            todo = set()
            for name, fields in shown.items():
                found[name] = fields["Version"]
                for key in ("Pre-Depends", "Depends"):
                    for group in filter(None, (g.strip() for g in fields.get(key, "").split(","))):
                        first = group.split("|")[0].strip()
                        todo.add(re.split(r"[\s(:]", first, maxsplit=1)[0])
            todo -= found.keys()
        return found

    def download(self, package: str, version: str, debs: Path) -> Path:
        """`apt-get download package=version` into `debs` (reused if already there)."""
        return self.download_all({package: version}, debs)[0]

    def download_all(self, packages: Mapping[str, str], debs: Path) -> list[Path]:
        """`apt-get download` of each {package: version} into `debs`, those not there yet in
        one call; the .deb files, in the order given."""

        def cached(package: str, version: str) -> Path | None:
            quoted = version.replace(":", "%3a")
            return next(iter(debs.glob(f"{package}_{quoted}_*.deb")), None)

        debs.mkdir(parents=True, exist_ok=True)
        wanted = [f"{p}={v}" for p, v in packages.items() if cached(p, v) is None]
        if wanted:
            # The host's apt-get download drops privileges to _apt, which can't write to a
            # root-owned folder: download into a world-writable temporary folder, then move.
            with tempfile.TemporaryDirectory(prefix="rngd-apt-") as tmp:
                os.chmod(tmp, 0o777)
                _run(["apt-get", *self.options, "download", "-q", *wanted], cwd=Path(tmp))
                for deb in Path(tmp).glob("*.deb"):
                    shutil.move(str(deb), debs / deb.name)
        paths = []
        for package, version in packages.items():
            path = cached(package, version)
            if path is None:
                raise AptError(f"apt-get download {package}={version} produced no .deb")
            paths.append(path)
        return paths


def unpack(debs: Iterable[Path], root: Path) -> None:
    """`dpkg-deb -x` each package into `root` (no maintainer scripts, no dpkg database)."""
    root.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(root)])
