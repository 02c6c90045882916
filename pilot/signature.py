"""Check a job spec's Ed25519 signature before anything of the job runs.

The server signs the canonical JSON of the job dict without ``specSignature``
(``json.dumps(job, sort_keys=True, separators=(",", ":"))``); a spec changed on the way, or signed
by another key, is refused with BAD_SIGNATURE. ``cryptography`` is imported here only, lazily.
"""
from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from .errors import BadSignature

SIGNATURE_KEY = "specSignature"


def canonical(job: dict[str, Any]) -> bytes:
    body = {k: v for k, v in job.items() if k != SIGNATURE_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


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
            self._key.verify(sig, canonical(job))
        except InvalidSignature:
            raise BadSignature("job spec signature does not verify: spec altered or wrong "
                               "key") from None
