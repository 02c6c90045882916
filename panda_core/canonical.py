"""The bytes a signature covers: one canonical JSON, written once for signer and verifier.

The server signs, the pilot and ARC push mode verify; both sides must turn the same document into
the same bytes, so both call ``signed_bytes``: sorted keys, no whitespace, the signature field left
out, UTF-8 as ``json`` writes it (non-ASCII escaped).
"""
from __future__ import annotations

import json
from typing import Any

#: the field of a job spec (getJob reply) that carries its Ed25519 signature, base64
SIGNATURE_KEY = "specSignature"


def canonical_json(obj: Any) -> bytes:
    """Sorted-key compact JSON of ``obj``."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def signed_bytes(doc: dict[str, Any], signature_key: str = SIGNATURE_KEY) -> bytes:
    """What the signature of ``doc`` covers: its canonical JSON without the signature field."""
    return canonical_json({k: v for k, v in doc.items() if k != signature_key})
