"""The one-file pilot: what it holds, built from the server's own installed code.

A worker node needs only ``python3``: the factory's batch script fetches
``/pilot/<version>/panda-pilot.pyz`` and its detached signature ``panda-pilot.pyz.sig`` (64 raw
bytes: Ed25519 by the server's job-signing key over the file's bytes, so ``openssl pkeyutl
-verify -rawin`` checks it too), verifies it with the key the factory wrote into the script,
unpacks it into a per-version cache and runs it (schedulers/bootstrap.py, docs/pilot.md).
``server/pilotstore.py`` keeps the versions and their signatures.

The file is a zipapp (``python3 panda-pilot.pyz`` runs it where psutil is not needed) holding
the pilot, ``panda_core``, the copytools and their pure-Python dependencies (stevedore aside:
``panda_core.drivers`` does without it), psutil's ``abi3`` extension (one build for every
CPython >= 3.6 of a platform) for the server's platform at its root and, from the operator's
wheels, for other platforms under ``_platforms/<platform>/`` (the node's bootstrap unpacks its
own), and a dist-info with the pilot's entry points, so its monitors and copytools load exactly
as from an installed pilot. What it leaves out: ``cryptography`` (16 MB, compiled: the pilot
verifies with ``panda_core.ed25519``) and ``isal`` (compiled per Python: ``zlib``'s adler32
instead). The version is the package's version plus a digest of the content and platforms, so
the same code always gives the same file, byte for byte, and a server upgraded to new code
serves the new version beside the old ones.
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
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

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
#: other platforms' compiled code in the file: ``_platforms/<platform>/<path>`` replaces the
#: root's compiled ``<path>`` on a node of that platform (schedulers/bootstrap_node.py)
PLATFORMS_DIR = "_platforms"
#: the package whose compiled extension the file carries, one build per platform
COMPILED = "psutil"


class PilotFileError(RuntimeError):
    """The pilot file cannot be built or is not there; the message says why."""


def platform_tag() -> str:
    """The platform the carried compiled code (psutil's extension) is for."""
    return f"{sys.platform}-{platform.machine()}"


@dataclass(frozen=True)
class PlatformWheel:
    """psutil's abi3 wheel for another platform, as the operator supplied it (``pip download
    --platform manylinux2014_aarch64 --only-binary=:all: psutil==<the server's version>``)."""
    platform: str                                  # as the node names itself: linux-aarch64
    path: Path
    members: tuple[tuple[str, bytes], ...]         # (name in the file, bytes): the extension


#: wheel platform tags of glibc Linux: manylinux1/2010/2014, manylinux_X_Y, plain linux
_LINUX_TAG = re.compile(r"(?:manylinux(?:1|2010|2014|_\d+_\d+)|linux)_([a-z0-9_]+)")


def platform_wheel(path: str | os.PathLike) -> PlatformWheel:
    """Read and check one wheel; PilotFileError says what is wrong with it and what to get."""
    path = Path(path)
    installed = importlib.metadata.version(COMPILED)
    get = (f"get it with 'pip download --no-deps --only-binary=:all: --platform "
           f"manylinux2014_<arch> {COMPILED}=={installed}'")
    parts = path.name[:-len(".whl")].split("-") if path.name.endswith(".whl") else []
    if len(parts) not in (5, 6):
        raise PilotFileError(f"{path}: not a wheel file name ({get})")
    name, version, abi, tags = parts[0], parts[1], parts[-2], parts[-1].split(".")
    if name.lower().replace("-", "_") != COMPILED:
        raise PilotFileError(f"{path}: a wheel of {name}, not of {COMPILED}: the pilot file "
                             f"carries only {COMPILED}'s compiled code")
    if version != installed:
        raise PilotFileError(f"{path}: {COMPILED} {version}, but the server carries {COMPILED} "
                             f"{installed} (its Python code is in the file): {get}")
    if abi != "abi3":
        raise PilotFileError(f"{path}: built for one Python ABI ({abi}), not abi3: only an abi3 "
                             f"build serves every Python of the node ({get})")
    arches = set()
    for tag in tags:
        match = _LINUX_TAG.fullmatch(tag)
        if match is None:
            raise PilotFileError(f"{path}: platform tag {tag!r} is not glibc Linux (musllinux, "
                                 f"macOS and Windows nodes are not served; {get})")
        arches.add(match.group(1))
    if len(arches) != 1:
        raise PilotFileError(f"{path}: platform tags of several machines {sorted(arches)}")
    try:
        with zipfile.ZipFile(path) as zf:
            members = tuple(sorted(
                (f"{COMPILED}/{n.rsplit('/', 1)[1]}", zf.read(n)) for n in zf.namelist()
                if n.startswith(f"{COMPILED}/") and n.count("/") == 1 and n.endswith(".so")))
    except (OSError, zipfile.BadZipFile) as exc:
        raise PilotFileError(f"{path}: cannot read the wheel: {exc}") from None
    if not members or not all(".abi3." in n for n, _ in members):
        raise PilotFileError(f"{path}: no abi3 extension of {COMPILED} in the wheel")
    return PlatformWheel(f"linux-{arches.pop()}", path, members)


def platform_wheels(paths: Iterable[str | os.PathLike]) -> dict[str, PlatformWheel]:
    """The wheels of ``paths`` (files, or folders of ``*.whl``) by platform, checked: one per
    platform, none for the server's own (it carries its installed build)."""
    found: dict[str, PlatformWheel] = {}
    for given in paths:
        given = Path(given)
        files = sorted(given.glob("*.whl")) if given.is_dir() else [given]
        if given.is_dir() and not files:
            raise PilotFileError(f"{given}: no wheel (*.whl) in the folder")
        for file in files:
            if not file.is_file():
                raise PilotFileError(f"{file}: no such wheel file")
            wheel = platform_wheel(file)
            if wheel.platform == platform_tag():
                raise PilotFileError(f"{file}: a wheel for {wheel.platform}, the server's own "
                                     "platform, whose installed build the file carries")
            if wheel.platform in found:
                raise PilotFileError(f"{file}: a second wheel for {wheel.platform} (the first: "
                                     f"{found[wheel.platform].path})")
            found[wheel.platform] = wheel
    return dict(sorted(found.items()))


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


def build(base_version: str | None = None,
          wheels: Iterable[str | os.PathLike] = ()) -> tuple[str, bytes]:
    """(version, bytes of the zipapp) of the installed code, with psutil's extension for the
    platforms of ``wheels`` beside the server's own; reproducible."""
    extra = platform_wheels(wheels)
    if base_version is None:
        try:
            base_version = importlib.metadata.version("panda-wms")
        except importlib.metadata.PackageNotFoundError:
            base_version = "0"
    members: list[tuple[str, bytes]] = [(name, path.read_bytes()) for name, path in _files()]
    members.append(("panda_wms_pilot.dist-info/entry_points.txt", _entry_points().encode()))
    for plat, wheel in extra.items():
        members += [(f"{PLATFORMS_DIR}/{plat}/{name}", data) for name, data in wheel.members]
    platforms = sorted([platform_tag(), *extra])
    digest = hashlib.sha256(json.dumps({"platforms": platforms}).encode())
    for name, data in members:
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    version = f"{base_version}-{digest.hexdigest()[:12]}"
    members.append(("panda_wms_pilot.dist-info/METADATA",
                    f"Metadata-Version: 2.1\nName: panda-wms-pilot\nVersion: "
                    f"{base_version}\n".encode()))
    members.append((MANIFEST, json.dumps({
        "version": version, "platform": platform_tag(),
        "platforms": platforms,
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
