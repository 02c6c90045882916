"""Key fingerprints: how a deployment pins the server's job-signing key out of band.

A fingerprint is ``sha256:`` and the hex SHA-256 of the key's DER SubjectPublicKeyInfo (the
bytes inside the PEM armour), so it is computed from the PEM with the standard library alone:
the factory hands it to every pilot on the command line, and a pilot that was given only the
fingerprint takes the key its one-file batch script verified the pilot file with, or fetches it
from the server, and refuses either unless the fingerprint matches.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re

from .ed25519 import SPKI_PREFIX

_PEM = re.compile(r"-----BEGIN PUBLIC KEY-----\s*([A-Za-z0-9+/=\s]+?)\s*-----END PUBLIC KEY-----")
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")


def public_key_der(pem: str | bytes) -> bytes:
    """The DER SubjectPublicKeyInfo inside a PEM public key; ValueError if ``pem`` holds none."""
    text = pem.decode("ascii", "replace") if isinstance(pem, bytes) else pem
    match = _PEM.search(text)
    if match is None:
        raise ValueError("not a PEM public key (no BEGIN/END PUBLIC KEY block)")
    try:
        der = base64.b64decode("".join(match.group(1).split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the PEM public key is not valid base64") from None
    return der


def key_fingerprint(pem: str | bytes) -> str:
    """``sha256:<hex>`` of a PEM public key; ValueError if ``pem`` holds none."""
    return "sha256:" + hashlib.sha256(public_key_der(pem)).hexdigest()


def normalise_fingerprint(text: str) -> str:
    """A fingerprint as written by a person (any case, hex with or without colons) in the one
    form ``key_fingerprint`` gives; ValueError if it is not a SHA-256 fingerprint."""
    value = text.strip().lower()
    if value.startswith("sha256:"):
        value = "sha256:" + value[len("sha256:"):].replace(":", "")
    if not _FINGERPRINT.fullmatch(value):
        raise ValueError(f"not a key fingerprint: {text[:80]!r} (expected sha256:<64 hex digits>)")
    return value


def raw_key_pem(raw: bytes) -> str:
    """The PEM of an Ed25519 public key given as its 32 raw bytes (as the one-file pilot's
    batch script carries it); ValueError for any other length."""
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, not {len(raw)}")
    body = base64.b64encode(SPKI_PREFIX + bytes(raw)).decode()
    return f"-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n"
