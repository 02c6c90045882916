"""The one-file pilot: built from the server's own installed code, signed, kept per version.

A worker node needs only ``python3``: the factory's batch script fetches
``/pilot/<version>/panda-pilot.pyz`` and its detached signature ``panda-pilot.pyz.sig`` (64 raw
bytes: Ed25519 by the server's job-signing key over the file's bytes, so ``openssl pkeyutl
-verify -rawin`` checks it too), verifies it with the key the factory wrote into the script,
unpacks it into a per-version cache and runs it (schedulers/bootstrap.py, docs/pilot.md).

The file is a zipapp (``python3 panda-pilot.pyz`` runs it where psutil is not needed) holding
the pilot, ``panda_core``, the copytools and their pure-Python dependencies (stevedore aside:
``panda_core.drivers`` does without it), psutil's ``abi3``
extension (one build for every CPython >= 3.6 of the platform) and a dist-info with the pilot's
entry points, so its monitors and copytools load exactly as from an installed pilot. What it
leaves out: ``cryptography`` (16 MB, compiled: the pilot verifies with ``panda_core.ed25519``)
and ``isal`` (compiled per Python: ``zlib``'s adler32 instead). The version is the package's
version plus a digest of the content, so the same code always gives the same file, byte for
byte, and a server upgraded to new code serves the new version beside the old ones: every
version ever built stays in ``pilot_dir`` until an operator removes it, and a site config may
pin one (``pilots.version``).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import platform
import re
import sys
import threading
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from panda_core import PILOT_VERSION_PATTERN, PYTHON_REQUIRES

log = logging.getLogger(__name__)

FILE_NAME = "panda-pilot.pyz"
SIGNATURE_SUFFIX = ".sig"
MANIFEST = "PANDA_PILOT.json"
VERSION_RE = re.compile(PILOT_VERSION_PATTERN)
#: what the pilot runs: our packages, then the third-party ones they import on a node
OWN_PACKAGES = ("pilot", "panda_core", "copytools")
#: (not stevedore: 5.10 needs Python 3.11; panda_core.drivers loads drivers without it)
THIRD_PARTY = ("pluggy", "requests", "urllib3", "idna", "certifi", "charset_normalizer",
               "psutil")
_SKIP_DIRS = {"__pycache__", "tests", "test", "example", "example2"}
_ZIP_DATE = (2000, 1, 1, 0, 0, 0)        # fixed, so a build is reproducible


class PilotFileError(RuntimeError):
    """The pilot file cannot be built or is not there; the message says why."""


@dataclass(frozen=True)
class PilotFileInfo:
    version: str
    size: int
    sha256: str
    built: str
    platform: str

    def to_dict(self) -> dict:
        return asdict(self)


def platform_tag() -> str:
    """The platform the carried compiled code (psutil's extension) is for."""
    return f"{sys.platform}-{platform.machine()}"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise PilotFileError(f"cannot build the pilot file: package {name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _wanted(path: Path) -> bool:
    """Source and data the pilot needs; compiled code only as a stable-ABI extension."""
    name = path.name
    if name.endswith(".so"):
        return ".abi3." in name
    return name.endswith((".py", ".pem")) or name == "py.typed"


def _files() -> Iterator[tuple[str, Path]]:
    """(name in the archive, file on disk) of everything the pilot file carries, sorted."""
    for package in OWN_PACKAGES + THIRD_PARTY:
        root = _package_dir(package)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            for filename in sorted(filenames):
                path = Path(dirpath) / filename
                if _wanted(path):
                    yield f"{package}/{path.relative_to(root).as_posix()}", path


def _min_python(requires: str | None) -> tuple[int, ...]:
    """The lowest Python a ``Requires-Python`` of the ``>=X.Y`` kind admits ((0,) if none)."""
    match = re.search(r">=\s*(\d+)\.(\d+)", requires or "")
    return (int(match.group(1)), int(match.group(2))) if match else (0,)


def python_requires() -> tuple[int, ...]:
    """The oldest Python the file runs on: the pilot's claim, or newer if a carried package
    needs it (logged: the node's batch script then refuses older Pythons, saying why)."""
    needed = PYTHON_REQUIRES
    names = importlib.metadata.packages_distributions()
    for package in THIRD_PARTY:
        for dist in names.get(package, []):
            try:
                floor = _min_python(importlib.metadata.metadata(dist).get("Requires-Python"))
            except importlib.metadata.PackageNotFoundError:
                continue
            if floor > needed:
                log.warning("pilot file: %s needs Python %s, newer than the pilot's %s",
                            dist, ".".join(map(str, floor)), ".".join(map(str, needed)))
                needed = floor
    return needed


def _entry_points() -> str:
    """entry_points.txt of the pilot's dist-info: every plugin of the installed panda-wms whose
    code the file carries (monitors, copytools, sandbox runtimes...: whatever its group)."""
    try:
        eps = importlib.metadata.distribution("panda-wms").entry_points
    except importlib.metadata.PackageNotFoundError:
        raise PilotFileError("cannot build the pilot file: panda-wms is not installed "
                             "(its entry points name the pilot's plugins)") from None
    groups: dict[str, list[str]] = {}
    for ep in eps:           # in the installed order: it is the monitors' order (docs/pilot.md)
        if ep.value.split(":")[0].split(".")[0] in OWN_PACKAGES:
            groups.setdefault(ep.group, []).append(f"{ep.name} = {ep.value}")
    return "".join(f"[{group}]\n" + "\n".join(lines) + "\n\n" for group, lines in groups.items())


_MAIN = '''"""The one-file pilot (docs/pilot.md): same as `panda pilot`."""
import sys

from pilot.cli import main

sys.exit(main(sys.argv[1:]))
'''


def build(base_version: str | None = None) -> tuple[str, bytes]:
    """(version, bytes of the zipapp) of the installed code; reproducible."""
    if base_version is None:
        try:
            base_version = importlib.metadata.version("panda-wms")
        except importlib.metadata.PackageNotFoundError:
            base_version = "0"
    members: list[tuple[str, bytes]] = [(name, path.read_bytes()) for name, path in _files()]
    members.append(("panda_wms_pilot.dist-info/entry_points.txt", _entry_points().encode()))
    digest = hashlib.sha256()
    for name, data in members:
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    version = f"{base_version}-{digest.hexdigest()[:12]}"
    members.append(("panda_wms_pilot.dist-info/METADATA",
                    f"Metadata-Version: 2.1\nName: panda-wms-pilot\nVersion: "
                    f"{base_version}\n".encode()))
    members.append((MANIFEST, json.dumps({
        "version": version, "platform": platform_tag(),
        "python_requires": ".".join(map(str, python_requires()))}, sort_keys=True).encode()))
    members.append(("__main__.py", _MAIN.encode()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, _ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data, compresslevel=9)
    return version, b"#!/usr/bin/env python3\n" + buf.getvalue()


class PilotFiles:
    """The versions of the pilot file in ``root`` (``<root>/<version>/panda-pilot.pyz`` and
    ``.sig``), signed with ``sign`` (bytes -> 64-byte signature). ``current()`` builds this
    server's own version on first use (so a server whose pilots never ask pays nothing) and
    keeps it; ``default`` names the version a factory is told to run (None: the current one)."""

    def __init__(self, root: str | os.PathLike, sign: Callable[[bytes], bytes],
                 default: str | None = None) -> None:
        self.root = Path(root)
        self._sign = sign
        self._lock = threading.Lock()
        self._current: str | None = None
        if default is not None and not VERSION_RE.fullmatch(default):
            raise PilotFileError(f"not a pilot file version: {default!r}")
        self.default_pin = default

    def path(self, version: str) -> Path:
        if not VERSION_RE.fullmatch(version):
            raise PilotFileError(f"not a pilot file version: {version[:80]!r}")
        return self.root / version / FILE_NAME

    def current(self) -> str:
        """This server's own version, built and signed into ``root`` if it is not there."""
        with self._lock:
            if self._current is None:
                started = time.monotonic()
                version, data = build()
                path = self.path(version)
                sig_path = path.with_name(FILE_NAME + SIGNATURE_SUFFIX)
                signature = self._sign(data)     # Ed25519 is deterministic: same bytes each time
                wrote = False
                for target, content in ((path, data), (sig_path, signature)):
                    try:
                        same = target.read_bytes() == content
                    except FileNotFoundError:
                        same = False
                    if not same:             # absent, or signed by a key since replaced
                        target.parent.mkdir(parents=True, exist_ok=True)
                        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                        tmp.write_bytes(content)
                        os.replace(tmp, target)
                        wrote = True
                if wrote:
                    log.info("pilot file %s built and signed: %d bytes in %.2f s", version,
                             len(data), time.monotonic() - started)
                self._current = version
            return self._current

    def default(self) -> str:
        """The version a factory runs unless its site pins one."""
        if self.default_pin:
            if not self.path(self.default_pin).exists():
                raise PilotFileError(f"the default pilot version {self.default_pin} is not in "
                                     f"{self.root}")
            return self.default_pin
        return self.current()

    def info(self, version: str) -> PilotFileInfo | None:
        path = self.path(version)
        try:
            data = path.read_bytes()
            if not path.with_name(FILE_NAME + SIGNATURE_SUFFIX).exists():
                return None
            stat = path.stat()
        except OSError:
            return None
        plat = ""
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                plat = json.loads(zf.read(MANIFEST)).get("platform", "")
        except (zipfile.BadZipFile, KeyError, ValueError):
            log.warning("pilot file %s has no readable manifest", path)
        return PilotFileInfo(version=version, size=len(data),
                             sha256=hashlib.sha256(data).hexdigest(),
                             built=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stat.st_mtime)),
                             platform=plat)

    def versions(self) -> list[PilotFileInfo]:
        """Every signed version in ``root``, newest first."""
        self.current()
        found = []
        try:
            entries = list(self.root.iterdir())
        except OSError:
            entries = []
        for entry in entries:
            if VERSION_RE.fullmatch(entry.name):
                info = self.info(entry.name)
                if info is not None:
                    found.append(info)
        return sorted(found, key=lambda i: (i.built, i.version), reverse=True)

    def read(self, version: str, signature: bool = False) -> bytes:
        """The file (or its signature); PilotFileError when that version is not here."""
        if version == self.current() or self.path(version).exists():
            path = self.path(version)
            if signature:
                path = path.with_name(FILE_NAME + SIGNATURE_SUFFIX)
            try:
                return path.read_bytes()
            except OSError:
                pass
        raise PilotFileError(f"no pilot file of version {version[:80]!r}")
