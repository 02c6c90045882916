"""Identities and signatures: bearer tokens, roles, and the job-spec signing key.

Tokens are ``base64url(claims).base64url(HMAC-SHA256(claims))`` signed with a secret kept in the
server's key directory, so any server process sharing that directory can verify them without a
database round trip. Job specs are signed with Ed25519 (cryptography) so a pilot can check, with
only the public key, that what it is about to run came from this server unchanged.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from panda_core.canonical import signed_bytes

log = logging.getLogger(__name__)

ROLES = ("pilot", "user", "admin")
TOKEN_SECRET_FILE = "token-secret"
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


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only, atomically, never clobbering a racing writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, path)   # fails if another process created it first: keep theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


class KeyStore:
    """The token secret and the job-spec signing key, created on first use in ``key_dir``."""

    def __init__(self, key_dir: str | os.PathLike):
        self.key_dir = Path(key_dir)
        self._verified: dict[str, tuple[float, Identity]] = {}
        secret_path = self.key_dir / TOKEN_SECRET_FILE
        if not secret_path.exists():
            _write_private(secret_path, secrets.token_hex(32).encode())
        self._secret = secret_path.read_bytes().strip()
        key_path = self.key_dir / SIGNING_KEY_FILE
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        if not key_path.exists():
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption())
            _write_private(key_path, pem)
        self._signing_key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        self.public_key_pem = self._signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    # --- tokens -------------------------------------------------------------------------------
    def issue_token(self, subject: str, role: str, site: str | None = None,
                    lifetime_s: int = 30 * 24 * 3600) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
        if not subject:
            raise ValueError("a token needs a subject")
        now = int(time.time())
        claims = {"sub": subject, "role": role, "iat": now, "exp": now + lifetime_s}
        if site:
            claims["site"] = site
        body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        sig = _b64(hmac.new(self._secret, body.encode(), hashlib.sha256).digest())
        return f"{body}.{sig}"

    def verify_token(self, token: str) -> Identity:
        """The identity a token speaks for. Verified tokens are remembered until they expire
        (a pilot sends the same token with every request: the HMAC and JSON decode cost more
        than a dict lookup)."""
        hit = self._verified.get(token)
        if hit is not None and hit[0] >= time.time():
            return hit[1]
        identity, expires = self._verify(token)
        if len(self._verified) >= 10000:
            self._verified.clear()
        self._verified[token] = (expires, identity)
        return identity

    def _verify(self, token: str) -> tuple[Identity, float]:
        try:
            body, sig = token.strip().split(".")
        except ValueError:
            raise AuthError("malformed bearer token") from None
        expected = _b64(hmac.new(self._secret, body.encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(sig, expected):
            raise AuthError("bearer token signature does not verify")
        try:
            claims = json.loads(_unb64(body))
        except (ValueError, json.JSONDecodeError):
            raise AuthError("malformed bearer token") from None
        if claims.get("exp", 0) < time.time():
            raise AuthError("bearer token expired")
        if claims.get("role") not in ROLES:
            raise AuthError("bearer token has no valid role", 60)
        return (Identity(subject=str(claims.get("sub")), role=claims["role"],
                         site=claims.get("site")), float(claims["exp"]))

    # --- job spec signatures ------------------------------------------------------------------
    def sign_job(self, job: dict) -> str:
        """Ed25519 signature (base64) over the job's canonical JSON, without ``specSignature``."""
        return self.sign_canonical(signed_bytes(job))

    def sign_bytes(self, data: bytes) -> bytes:
        """The raw 64-byte Ed25519 signature of ``data`` (the pilot file's detached one)."""
        return self._signing_key.sign(data)

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
