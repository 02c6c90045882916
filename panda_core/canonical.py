"""The bytes a signature covers: one canonical JSON, written once for signer and verifier.

The server signs, the pilot and ARC push mode verify; both sides must turn the same document into
the same bytes, so both call ``signed_bytes``: sorted keys, no whitespace, the signature field left
out, UTF-8 as ``json`` writes it (non-ASCII escaped). The queue description's site config is
signed too (``queuedata_signed_bytes``), with the site's name, so one site's signed config cannot
be passed off as another's.
"""
from __future__ import annotations

import json
from typing import Any

#: the field of a job spec (getJob reply) that carries its Ed25519 signature, base64
SIGNATURE_KEY = "specSignature"
#: the field of the queue description (queuedata) that carries the signature of ``panda_wms``
QUEUEDATA_SIGNATURE_KEY = "panda_wms_signature"


def canonical_json(obj: Any) -> bytes:
    """Sorted-key compact JSON of ``obj``."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def signed_bytes(doc: dict[str, Any], signature_key: str = SIGNATURE_KEY) -> bytes:
    """What the signature of ``doc`` covers: its canonical JSON without the signature field."""
    return canonical_json({k: v for k, v in doc.items() if k != signature_key})


def queuedata_signed_bytes(site: str, site_config: dict[str, Any]) -> bytes:
    """What the queue description's signature covers: the site's name and its site config
    (the ``panda_wms`` key our pilot acts on; pilot 3's other keys are not ours to act on)."""
    return canonical_json({"site": site, "panda_wms": site_config})
