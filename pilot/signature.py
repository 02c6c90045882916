"""Check what the pilot acts on before it acts: the job spec and the queue description.

The server signs ``panda_core.canonical.signed_bytes(job)`` and, in the queue description, its
site config (``queuedata_signed_bytes``). The key that checks them never comes from the job
channel alone: it is pinned at deployment (``--public-key`` PEM file, or
``--public-key-fingerprint``: then the key the server serves must have that fingerprint).
A spec changed on the way, signed by another key, or bound to another dispatch (site, pilot,
nonce) is refused with BAD_SIGNATURE. Verification is ``panda_core.ed25519``'s (standard
library, ~2 ms a signature), the code the node's batch script already trusts the pilot file
itself with: importing ``cryptography`` instead cost ~30 ms on the way to every pilot's first
payload (measured, installed and one-file), more than a pilot's verifications of a whole slot,
and a one-file pilot would have picked up whatever ``cryptography`` the node's Python has.
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


def _raw_key(pem: bytes) -> bytes:
    """The pinned PEM's 32 key bytes, known to be a point of the curve (BadSignature if not)."""
    try:
        raw = ed25519.raw_public_key(public_key_der(pem))
        ed25519.check_key(raw)
    except ValueError as exc:
        raise BadSignature(f"server public key unreadable: {exc}") from None
    return raw


class SpecVerifier:
    """Checks signatures by one server key (a PEM); BadSignature for a key that is none."""

    def __init__(self, public_key_pem: str | bytes) -> None:
        pem = public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem
        self._raw = _raw_key(pem)

    def _check(self, sig_b64: Any, data: bytes, what: str) -> None:
        if not sig_b64:
            raise BadSignature(f"{what} is not signed")
        try:
            sig = base64.b64decode(str(sig_b64), validate=True)
        except (binascii.Error, ValueError):
            raise BadSignature(f"{what} signature is not base64") from None
        if not ed25519.verify(self._raw, sig, data):
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
    (``fetch_key``) must have. The verifier is built on first use, so a pilot that gets no job
    never fetches the key. ``check_queuedata`` verifies, once, the queue
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
