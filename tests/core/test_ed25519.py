"""The standard library's Ed25519 verifier against RFC 8032's vectors and ``cryptography``."""
from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from panda_core import ed25519
from panda_core.trust import public_key_der

# RFC 8032, section 7.1: tests 1, 2 and 3 (public key, message, signature)
RFC = [
    ("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9"
     "b46bd25bf5f0595bbe24655141438e7a100b"),
    ("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f1"
     "1d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984d"
     "c6594a7c15e9716ed28dc027beceea1ec40a"),
]
L = 2 ** 252 + 27742317777372353535851937790883648493


def _raw(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


@pytest.mark.parametrize("pub,msg,sig", RFC)
def test_rfc8032_vectors(pub, msg, sig):
    pub, msg, sig = bytes.fromhex(pub), bytes.fromhex(msg), bytes.fromhex(sig)
    assert ed25519.verify(pub, sig, msg)
    assert not ed25519.verify(pub, sig, msg + b"x")
    assert ed25519.verify(pub, sig, chunks=[msg[:1], msg[1:]])


def test_agrees_with_cryptography_on_good_and_altered_signatures():
    for i in range(40):
        key = Ed25519PrivateKey.generate()
        msg = os.urandom(i * 7)
        sig = key.sign(msg)
        assert ed25519.verify(_raw(key), sig, msg)
        bad = bytearray(sig)
        bad[i % 64] ^= 1 << (i % 8)
        assert not ed25519.verify(_raw(key), bytes(bad), msg)
        assert not ed25519.verify(_raw(Ed25519PrivateKey.generate()), sig, msg)


def test_malleated_and_malformed_signatures_and_keys():
    key = Ed25519PrivateKey.generate()
    sig = key.sign(b"m")
    s = int.from_bytes(sig[32:], "little")
    assert not ed25519.verify(_raw(key), sig[:32] + (s + L).to_bytes(32, "little"), b"m")
    assert not ed25519.verify(_raw(key), sig[:63], b"m")
    assert not ed25519.verify(_raw(key), b"", b"m")
    with pytest.raises(ed25519.BadKey):
        ed25519.verify(b"\x01" * 31, sig, b"m")
    with pytest.raises(ed25519.BadKey):        # y >= p: not canonical
        ed25519.verify(b"\xff" * 31 + b"\x7f", sig, b"m")
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    assert ed25519.raw_public_key(public_key_der(pem)) == _raw(key)
    with pytest.raises(ed25519.BadKey):
        ed25519.raw_public_key(b"\x30" * 44)


def test_check_key_says_what_verify_says_of_a_key():
    ed25519.check_key(_raw(Ed25519PrivateKey.generate()))
    for bad in (b"\x01" * 31, b"\xff" * 31 + b"\x7f"):
        with pytest.raises(ed25519.BadKey):
            ed25519.check_key(bad)
        with pytest.raises(ed25519.BadKey):
            ed25519.verify(bad, bytes(64), b"")
    # a y whose x is not a square: a 32-byte word that is no point of the curve
    off = next(w for w in (bytes([i]) + bytes(31) for i in range(2, 256)) if not _is_point(w))
    with pytest.raises(ed25519.BadKey, match="not a point"):
        ed25519.check_key(off)


def _is_point(raw: bytes) -> bool:
    try:
        ed25519.verify(raw, bytes(64), b"")
    except ed25519.BadKey:
        return False
    return True


def test_spec_verifier_checks_what_cryptography_signs():
    """The pilot's verifier (panda_core.ed25519 only) on specs signed by ``cryptography``, as
    the server signs them."""
    from pilot.errors import BadSignature
    from pilot.signature import SpecVerifier
    from panda_core.canonical import signed_bytes
    import base64

    key = Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    job = {"PandaID": 7, "jobPars": "x"}
    job["specSignature"] = base64.b64encode(key.sign(signed_bytes(job))).decode()
    verifier = SpecVerifier(pem)
    verifier.verify(job)
    with pytest.raises(BadSignature, match="does not verify"):
        verifier.verify({**job, "jobPars": "rm -rf"})
    with pytest.raises(BadSignature, match="not signed"):
        verifier.verify({"PandaID": 7})
    with pytest.raises(BadSignature, match="does not verify"):
        other = Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        SpecVerifier(other).verify(job)
    with pytest.raises(BadSignature, match="unreadable"):
        SpecVerifier(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
