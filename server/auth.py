"""Identities and signatures: bearer tokens, roles, and the job-spec signing key.

Tokens are JWTs on the WLCG profile (``server.tokens``: this server's own, signed with its
ES256 key, and those of trusted external issuers), verified without a database round trip. Job
specs are signed with Ed25519 (cryptography) so a pilot can check, with only the public key,
that what it is about to run came from this server unchanged.
"""
from __future__ import annotations

import base64
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from panda_core.canonical import signed_bytes

from .tokens import ROLES, RevocationList, TokenError, TokenService, TrustedIssuer, write_private

log = logging.getLogger(__name__)

SIGNING_KEY_FILE = "jobspec-ed25519.pem"


class AuthError(Exception):
    """A credential that is missing, malformed, expired or not allowed to do what it asks."""

    def __init__(self, message: str, status_code: int = 50):
        super().__init__(message)
        self.status_code = status_code  # PanDA StatusCode: 50 invalid token, 60 role, 70 denied


@dataclass(frozen=True)
class Identity:
    subject: str          # token subject or certificate DN
    role: str             # pilot | user | admin
    site: str | None = None   # a pilot token may be bound to one site

    def may_act_for_site(self, site: str | None) -> bool:
        return self.role == "admin" or self.site is None or self.site == site


ANONYMOUS = None


class KeyStore:
    """The token service and the job-spec signing key, created on first use in ``key_dir``."""

    def __init__(self, key_dir: str | os.PathLike, issuer: str | None = None,
                 trusted: Iterable[TrustedIssuer] = (), revoked: RevocationList | None = None):
        self.key_dir = Path(key_dir)
        self._verified: dict[str, tuple[float, Identity, str | None]] = {}
        self.tokens = TokenService(self.key_dir, issuer, trusted, revoked)
        key_path = self.key_dir / SIGNING_KEY_FILE
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        if not key_path.exists():
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption())
            write_private(key_path, pem)
        self._signing_key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        self.public_key_pem = self._signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    # --- tokens -------------------------------------------------------------------------------
    def issue_token(self, subject: str, role: str, site: str | None = None,
                    lifetime_s: int = 30 * 24 * 3600) -> str:
        return self.tokens.issue(subject, role, site, lifetime_s)

    def verify_token(self, token: str) -> Identity:
        """The identity a token speaks for. Verified tokens are remembered until they expire
        (a pilot sends the same token with every request: the signature check costs more than
        a dict lookup); the revocation list is asked every time."""
        hit = self._verified.get(token)
        if hit is not None and hit[0] >= time.time():
            if hit[2] is not None and hit[2] in self.tokens.revoked:
                raise AuthError("bearer token revoked")
            return hit[1]
        try:
            claims = self.tokens.verify(token)
        except TokenError as exc:
            raise AuthError(str(exc), exc.status_code) from None
        identity = Identity(subject=claims.subject, role=claims.role, site=claims.site)
        if len(self._verified) >= 10000:
            self._verified.clear()
        self._verified[token] = (claims.expires, identity, claims.jti)
        return identity

    # --- job spec signatures ------------------------------------------------------------------
    def sign_job(self, job: dict) -> str:
        """Ed25519 signature (base64) over the job's canonical JSON, without ``specSignature``."""
        return self.sign_canonical(signed_bytes(job))

    def sign_canonical(self, canonical: bytes) -> str:
        """Ed25519 signature (base64) of a job's canonical bytes (``canonical.signed_bytes``)."""
        return base64.b64encode(self._signing_key.sign(canonical)).decode()


_DN_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
             "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST",
             "domainComponent": "DC", "emailAddress": "emailAddress", "userId": "UID"}


def dn_from_subject(subject) -> str:
    """A verified certificate's subject (ssl's getpeercert() tuples) as a grid-style DN.

    PanDA and the grid write DNs with short names in certificate order: /DC=ch/O=x/CN=name.
    """
    return "".join(f"/{_DN_SHORT.get(k, k)}={v}" for rdn in subject for k, v in rdn)


def identity_from_dn(dn: str, admin_dns: frozenset[str] = frozenset(),
                     pilot_dns: frozenset[str] = frozenset()) -> Identity:
    """Map a verified X.509 client certificate DN to an identity (default role: user)."""
    if dn in admin_dns:
        return Identity(dn, "admin")
    if dn in pilot_dns:
        return Identity(dn, "pilot")
    return Identity(dn, "user")
