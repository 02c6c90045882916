"""The one-file pilot's stored versions: signed, kept side by side, re-signed after a key change.

``server/pilotfile.py`` says what a version holds and builds it; this module keeps the versions
in ``pilot_dir`` (``<pilot_dir>/<version>/panda-pilot.pyz`` and ``.sig``) and answers for their
signatures. Every version this server serves has a detached signature that verifies with its
*current* job-signing key, the key the factories pin. When that key was replaced, a stored
version's old signature no longer verifies, and nodes pinned to the new key would refuse it
(bootstrap exit 4). The server then re-signs it, but only if it can vouch for the bytes:

- it built them itself: every file it builds, and every file whose signature it verified with
  its key, is recorded (sha256) in the build records, a folder beside the private key
  (``<key_dir>/pilot-built``; whoever can write there can take the key as well), so a file
  changed after the record is not re-signed;
- or the operator names the old public key (``panda pilotfile resign --previous-key OLD.pem``)
  and the old signature verifies with it.

A version it cannot vouch for is not served (HTTP 409 with the reason; logged) and left out of
the listing, until an operator re-signs it with the old key or deletes its folder.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from panda_core.trust import key_fingerprint

from .pilotfile import FILE_NAME, MANIFEST, SIGNATURE_SUFFIX, VERSION_RE, PilotFileError, build

log = logging.getLogger(__name__)

RECORDS_DIR = "pilot-built"      # in the key dir: the sha256 of every file this server vouches for


class PilotFileUnvouched(PilotFileError):
    """The version is stored, but its signature is not the current key's and this server
    cannot vouch for its bytes: not served until an operator re-signs or removes it."""


@dataclass(frozen=True)
class PilotFileInfo:
    version: str
    size: int
    sha256: str
    built: str
    platform: str                       # the platform of the extension at the file's root
    platforms: list[str] = field(default_factory=list)   # every platform the file serves

    def to_dict(self) -> dict:
        return asdict(self)


class Signer:
    """The job-signing key as the pilot files need it: sign, verify, name (its fingerprint)."""

    def __init__(self, private_key) -> None:
        from cryptography.hazmat.primitives import serialization

        self._key = private_key
        self.public_pem = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.fingerprint = key_fingerprint(self.public_pem)

    @classmethod
    def from_pem_file(cls, path: str | os.PathLike) -> "Signer":
        from cryptography.hazmat.primitives import serialization

        return cls(serialization.load_pem_private_key(Path(path).read_bytes(), None))

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def verify(self, data: bytes, signature: bytes) -> bool:
        return verifies(self._key.public_key(), data, signature)


def verifies(public_key, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s (a cryptography Ed25519 public key) over ``data``."""
    from cryptography.exceptions import InvalidSignature
    try:
        public_key.verify(signature, data)
        return True
    except (InvalidSignature, ValueError):
        return False


def load_public_key(path: str | os.PathLike):
    """An Ed25519 public key from a PEM file (``panda token public-key`` of the old key dir);
    ValueError says why it is not one."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


@dataclass(frozen=True)
class Vouched:
    """What ``PilotFiles.check`` found for one stored version."""
    version: str
    servable: bool
    action: str          # "valid" | "re-sign" (judged only) | "re-signed" | "refused"
    reason: str = ""


class PilotFiles:
    """The versions of the pilot file in ``root``, signed by ``signer``. ``current()`` builds
    this server's own version on first use (a server whose pilots never ask pays nothing) from
    its code and the operator's ``wheels`` (psutil for other platforms, server/pilotfile.py);
    ``default`` names the version a factory is told to run (None: the current one);
    ``records`` is the folder of build records (None: none kept, so nothing is re-signed)."""

    def __init__(self, root: str | os.PathLike, signer: Signer, default: str | None = None,
                 records: str | os.PathLike | None = None,
                 wheels: Sequence[str | os.PathLike] = ()) -> None:
        self.root = Path(root)
        self.signer = signer
        self.records = Path(records) if records is not None else None
        self.wheels = tuple(Path(w) for w in wheels)
        self._lock = threading.Lock()
        self._current: str | None = None
        self._checked: dict[str, tuple] = {}      # version -> stat of file and signature
        self._refused: dict[str, tuple] = {}      # logged once per stat
        if default is not None and not VERSION_RE.fullmatch(default):
            raise PilotFileError(f"not a pilot file version: {default!r}")
        self.default_pin = default

    def path(self, version: str) -> Path:
        if not VERSION_RE.fullmatch(version):
            raise PilotFileError(f"not a pilot file version: {version[:80]!r}")
        return self.root / version / FILE_NAME

    def _sig_path(self, version: str) -> Path:
        return self.path(version).with_name(FILE_NAME + SIGNATURE_SUFFIX)

    # --- build records ------------------------------------------------------------------------
    def _record_path(self, version: str) -> Path | None:
        return None if self.records is None else self.records / f"{version}.json"

    def recorded_sha256(self, version: str) -> str | None:
        path = self._record_path(version)
        if path is None:
            return None
        try:
            value = json.loads(path.read_text()).get("sha256")
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None

    def _record(self, version: str, data: bytes, how: str) -> None:
        path = self._record_path(version)
        digest = hashlib.sha256(data).hexdigest()
        if path is None or self.recorded_sha256(version) == digest:
            return
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write(path, json.dumps({"version": version, "sha256": digest, "size": len(data),
                                     "how": how, "recorded": _now()}, sort_keys=True).encode())
        except OSError as exc:       # served all the same; only a later key change suffers
            log.warning("pilot file %s: cannot record it in %s (%s): after a key change it "
                        "will need 'panda pilotfile resign --previous-key'", version,
                        path.parent, exc.strerror or exc)

    # --- the server's own version -------------------------------------------------------------
    def current(self) -> str:
        """This server's own version, built, signed and recorded into ``root`` if it is not."""
        with self._lock:
            if self._current is None:
                started = time.monotonic()
                version, data = build(wheels=self.wheels)
                path = self.path(version)
                signature = self.signer.sign(data)   # Ed25519 is deterministic: same bytes
                wrote = False
                for target, content in ((path, data), (self._sig_path(version), signature)):
                    try:
                        same = target.read_bytes() == content
                    except FileNotFoundError:
                        same = False
                    if not same:             # absent, or signed by a key since replaced
                        target.parent.mkdir(parents=True, exist_ok=True)
                        _write(target, content)
                        wrote = True
                self._record(version, data, "built")
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
            self.check(self.default_pin, raise_refused=True)
            return self.default_pin
        return self.current()

    # --- signatures ---------------------------------------------------------------------------
    def check(self, version: str, previous_keys: Iterable = (),
              raise_refused: bool = False) -> Vouched:
        """Make ``version``'s signature the current key's if this server can vouch for the
        file (see the module's docstring); ``previous_keys``: old public keys the operator
        named. ``raise_refused``: raise PilotFileUnvouched instead of returning a refusal."""
        path, sig_path = self.path(version), self._sig_path(version)
        try:
            stamp = (_stamp(path), _stamp(sig_path) if sig_path.exists() else None)
        except OSError:
            raise PilotFileError(f"no pilot file of version {version[:80]!r}") from None
        if self._checked.get(version) == stamp:
            return Vouched(version, True, "valid")
        data, signature = self.load(version)
        result = self.judge(version, data, signature, tuple(previous_keys))
        if result.action == "re-sign":
            sig_path.parent.mkdir(parents=True, exist_ok=True)
            _write(sig_path, self.signer.sign(data))
            log.warning("pilot file %s: its signature was not the current key's (the "
                        "job-signing key was replaced); %s: re-signed with %s", version,
                        result.reason, self.signer.fingerprint)
            result = Vouched(version, True, "re-signed", result.reason)
            stamp = (stamp[0], _stamp(sig_path))
        if result.servable:
            self._record(version, data, "verified" if result.action == "valid" else "re-signed")
            # the stamps from before the read: bytes changed since are checked next time
            self._checked[version] = stamp
            self._refused.pop(version, None)
            return result
        self._checked.pop(version, None)
        if self._refused.get(version) != stamp:
            self._refused[version] = stamp
            log.error("%s (%s)", result.reason, path.parent)
        if raise_refused:
            raise PilotFileUnvouched(result.reason)
        return result

    def load(self, version: str) -> tuple[bytes, bytes]:
        data = self.path(version).read_bytes()
        try:
            return data, self._sig_path(version).read_bytes()
        except FileNotFoundError:
            return data, b""

    def judge(self, version: str, data: bytes, signature: bytes,
              previous: tuple = ()) -> Vouched:
        """What ``check`` would do, without doing it: ``valid`` (the current key's
        signature), ``re-sign`` (vouched for: the reason says how) or ``refused``."""
        if self.signer.verify(data, signature):
            return Vouched(version, True, "valid")
        digest = hashlib.sha256(data).hexdigest()
        recorded = self.recorded_sha256(version)
        if recorded == digest:
            return Vouched(version, True, "re-sign", "it is the file this server built or "
                           "verified (its sha256 is in the build records)")
        for key in previous:
            if verifies(key, data, signature):
                return Vouched(version, True, "re-sign",
                               "its signature verifies with the previous key given")
        if recorded is not None:
            why = (f"its sha256 {digest[:16]}... is not the {recorded[:16]}... recorded when "
                   "this server built or verified it: the file was changed since")
        elif not signature:
            why = "it has no signature and no build record here"
        else:
            why = ("its signature is not the current key's, and no build record or previous "
                   "key vouches for its content")
        return Vouched(version, False, "refused",
                       f"pilot file {version} is not served: {why}; nothing was signed. If the "
                       "old key signed it: 'panda pilotfile resign --previous-key OLD.pem'; "
                       "else delete the version's folder")

    def check_all(self, previous_keys: Iterable = ()) -> list[Vouched]:
        """``check`` every stored version (the server does it at start; ``panda pilotfile
        resign`` with the operator's old keys)."""
        previous_keys = tuple(previous_keys)
        results = []
        for version in self.stored():
            try:
                results.append(self.check(version, previous_keys))
            except (PilotFileError, OSError) as exc:
                results.append(Vouched(version, False, "refused", str(exc)))
        return results

    # --- reading ------------------------------------------------------------------------------
    def stored(self) -> list[str]:
        """The names of the version folders in ``root`` holding a file (signed or not)."""
        try:
            entries = list(self.root.iterdir())
        except OSError:
            return []
        return sorted(e.name for e in entries
                      if VERSION_RE.fullmatch(e.name) and (e / FILE_NAME).is_file())

    def info(self, version: str) -> PilotFileInfo | None:
        path = self.path(version)
        try:
            data = path.read_bytes()
            stat = path.stat()
        except OSError:
            return None
        manifest = {}
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                manifest = json.loads(zf.read(MANIFEST))
        except (zipfile.BadZipFile, KeyError, ValueError):
            log.warning("pilot file %s has no readable manifest", path)
        plat = str(manifest.get("platform") or "")
        platforms = manifest.get("platforms")
        platforms = [str(p) for p in platforms] if isinstance(platforms, list) else \
            ([plat] if plat else [])
        return PilotFileInfo(version=version, size=len(data),
                             sha256=hashlib.sha256(data).hexdigest(),
                             built=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stat.st_mtime)),
                             platform=plat, platforms=platforms)

    def versions(self) -> list[PilotFileInfo]:
        """Every version served (signed by the current key, or re-signed now), newest first."""
        self.current()
        found = []
        for version in self.stored():
            try:
                if not self.check(version).servable:
                    continue
            except (PilotFileError, OSError):
                continue
            info = self.info(version)
            if info is not None:
                found.append(info)
        return sorted(found, key=lambda i: (i.built, i.version), reverse=True)

    def read(self, version: str, signature: bool = False) -> bytes:
        """The file (or its signature); PilotFileError when that version is not here,
        PilotFileUnvouched when it is but cannot be served."""
        if version == self.current() or self.path(version).exists():
            self.check(version, raise_refused=True)
            path = self._sig_path(version) if signature else self.path(version)
            try:
                return path.read_bytes()
            except OSError:
                pass
        raise PilotFileError(f"no pilot file of version {version[:80]!r}")


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write(target: Path, content: bytes) -> None:
    """Atomically: a neighbour process reading ``target`` sees the old bytes or the new."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, target)
