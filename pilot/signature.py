"""Check what the pilot acts on before it acts: the job spec and the queue description.

The server signs ``panda_core.canonical.signed_bytes(job)`` and, in the queue description, its
site config (``queuedata_signed_bytes``). The key that checks them never comes from the job
channel alone: it is pinned at deployment (``--public-key`` PEM file, or
``--public-key-fingerprint``: then the key the server serves must have that fingerprint).
A spec changed on the way, signed by another key, or bound to another dispatch (site, pilot,
nonce) is refused with BAD_SIGNATURE. ``cryptography`` is imported here only, lazily; where it
is not installed (the one-file pilot does not carry it: 16 MB, compiled per platform) the
standard library's ``panda_core.ed25519`` verifies, ~3 ms a signature.
"""
from __future__ import annotations

import base64
import binascii
from typing import Any, Callable

from panda_core.canonical import SIGNATURE_KEY, queuedata_signed_bytes, signed_bytes
from panda_core import ed25519
from panda_core.trust import key_fingerprint, public_key_der
from panda_core.wire import Dispatch

from .errors import BadSignature


class NotOurDispatch(BadSignature):
    """A validly signed spec that was dispatched to another pilot or another getJob (a replay):
    the job is not this pilot's, so the pilot neither runs it nor reports on it."""


def _stdlib_key(pem: bytes) -> Callable[[bytes, bytes], bool]:
    """A verify(signature, data) function of the standard library's Ed25519."""
    try:
        raw = ed25519.raw_public_key(public_key_der(pem))
        ed25519.verify(raw, bytes(64), b"")          # the point must decode
    except ValueError as exc:
        raise BadSignature(f"server public key unreadable: {exc}") from None
    return lambda sig, data: ed25519.verify(raw, sig, data)


def _cryptography_key(pem: bytes) -> Callable[[bytes, bytes], bool]:
    """A verify(signature, data) function of ``cryptography``'s Ed25519."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem)
    except ValueError as exc:
        raise BadSignature(f"server public key unreadable: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BadSignature("server public key is not an Ed25519 key")

    def check(sig: bytes, data: bytes) -> bool:
        try:
            key.verify(sig, data)
        except InvalidSignature:
            return False
        return True
    return check


class SpecVerifier:
    def __init__(self, public_key_pem: str | bytes, *, stdlib: bool | None = None) -> None:
        """``stdlib``: True forces ``panda_core.ed25519``, False ``cryptography``; None takes
        ``cryptography`` where it is installed."""
        pem = public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem
        if stdlib is None:
            import importlib.util
            stdlib = importlib.util.find_spec("cryptography") is None
        self.backend = "stdlib" if stdlib else "cryptography"
        self._verify = _stdlib_key(pem) if stdlib else _cryptography_key(pem)

    def _check(self, sig_b64: Any, data: bytes, what: str) -> None:
        if not sig_b64:
            raise BadSignature(f"{what} is not signed")
        try:
            sig = base64.b64decode(str(sig_b64), validate=True)
        except (binascii.Error, ValueError):
            raise BadSignature(f"{what} signature is not base64") from None
        if not self._verify(sig, data):
            raise BadSignature(f"{what} signature does not verify: {what} altered or wrong "
                               "key")

    def verify(self, job: dict[str, Any]) -> None:
        """Raise BadSignature unless ``job`` carries a valid signature."""
        self._check(job.get(SIGNATURE_KEY), signed_bytes(job), "job spec")

    def verify_queuedata(self, site: str, site_config: dict[str, Any],
                         signature: Any) -> None:
        """Raise BadSignature unless ``signature`` (the queue description's
        ``panda_wms_signature``) covers this site config of ``site``."""
        self._check(signature, queuedata_signed_bytes(site, site_config), "queue description")


def check_dispatch(job: dict[str, Any], expected: Dispatch) -> None:
    """Raise NotOurDispatch unless the (verified) spec was dispatched to this pilot's getJob."""
    got = Dispatch.of(job)
    if got is None:
        raise NotOurDispatch("job spec carries no dispatch binding (site, pilot, nonce)")
    if not got.matches(expected):
        raise NotOurDispatch(
            f"job spec was dispatched to site {got.site!r}, pilot {got.pilot_id!r}, nonce "
            f"{got.nonce[:12]!r}..., not to this getJob (site {expected.site!r}, pilot "
            f"{expected.pilot_id!r}): a replayed or redirected spec")


class Trust:
    """The pilot's pinned server key and what it checks with it.

    The key is a PEM pinned at deployment, or a fingerprint that the key the server serves
    (``fetch_key``) must have. The verifier is built on first use, so ``cryptography`` is only
    imported once there is something to check. ``check_queuedata`` verifies, once, the queue
    description the pilot acts on (a local ``--queuedata`` file is the site's own: ``local``)."""

    def __init__(self, fetch_key: Callable[[], str], queuedata: dict[str, Any], site: str, *,
                 pem: bytes | None = None, fingerprint: str | None = None,
                 local: bool = False) -> None:
        if pem is None and fingerprint is None:
            raise ValueError("the server's key must be pinned: a PEM or its fingerprint")
        self._fetch_key, self._queuedata, self._site = fetch_key, queuedata, site
        self.pem, self.fingerprint = pem, fingerprint
        self._verifier: SpecVerifier | None = None
        self._site_checked = local

    def verifier(self) -> SpecVerifier:
        if self._verifier is None:
            pem = self.pem if self.pem is not None else self._fetch_key()
            if self.fingerprint is not None:
                try:
                    served = key_fingerprint(pem)
                except ValueError as exc:
                    raise BadSignature(f"the server's key is unreadable: {exc}") from None
                if served != self.fingerprint:
                    raise BadSignature(f"the server's key {served} is not the pinned key "
                                       f"{self.fingerprint}")
            self._verifier = SpecVerifier(pem)
        return self._verifier

    def check_queuedata(self) -> None:
        """Raise BadSignature unless the queue description is the server's, signed."""
        if self._site_checked:
            return
        from .site import queuedata_site_config

        config, signature = queuedata_site_config(self._queuedata, self._site)
        self.verifier().verify_queuedata(self._site, config, signature)
        self._site_checked = True
