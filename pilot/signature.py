"""Check a job spec's Ed25519 signature before anything of the job runs.

The server signs ``panda_core.canonical.signed_bytes(job)``; a spec changed on the way, or signed
by another key, is refused with BAD_SIGNATURE. ``cryptography`` is imported here only, lazily.
"""
from __future__ import annotations

import base64
import binascii
from typing import Any

from panda_core.canonical import SIGNATURE_KEY, signed_bytes

from .errors import BadSignature


class SpecVerifier:
    def __init__(self, public_key_pem: str | bytes) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        pem = public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem
        try:
            key = load_pem_public_key(pem)
        except ValueError as exc:
            raise BadSignature(f"server public key unreadable: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise BadSignature("server public key is not an Ed25519 key")
        self._key = key

    def verify(self, job: dict[str, Any]) -> None:
        """Raise BadSignature unless ``job`` carries a valid signature."""
        from cryptography.exceptions import InvalidSignature

        sig_b64 = job.get(SIGNATURE_KEY)
        if not sig_b64:
            raise BadSignature("job spec is not signed")
        try:
            sig = base64.b64decode(str(sig_b64), validate=True)
        except (binascii.Error, ValueError):
            raise BadSignature("job spec signature is not base64") from None
        try:
            self._key.verify(sig, signed_bytes(job))
        except InvalidSignature:
            raise BadSignature("job spec signature does not verify: spec altered or wrong "
                               "key") from None
