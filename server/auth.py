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
import re
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
    groups: tuple[str, ...] = ()   # the token's groups (VO/working group checks)

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
                    lifetime_s: int = 30 * 24 * 3600, groups: tuple[str, ...] = ()) -> str:
        return self.tokens.issue(subject, role, site, lifetime_s, groups)

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
        identity = Identity(subject=claims.subject, role=claims.role, site=claims.site,
                            groups=claims.groups)
        if len(self._verified) >= 10000:
            self._verified.clear()
        self._verified[token] = (claims.expires, identity, claims.jti)
        return identity

    # --- job spec signatures ------------------------------------------------------------------
    def sign_job(self, job: dict) -> str:
        """Ed25519 signature (base64) over the job's canonical JSON, without ``specSignature``."""
        return self.sign_canonical(signed_bytes(job))

    @property
    def signing_key(self):
        """The job-signing private key (for ``server.pilotstore.Signer``; never leaves the
        process)."""
        return self._signing_key

    def sign_canonical(self, canonical: bytes) -> str:
        """Ed25519 signature (base64) of a job's canonical bytes (``canonical.signed_bytes``)."""
        return base64.b64encode(self._signing_key.sign(canonical)).decode()


#: the grid's short attribute names and their OIDs (dotted)
_SHORT_OID = {"CN": "2.5.4.3", "O": "2.5.4.10", "OU": "2.5.4.11", "C": "2.5.4.6",
              "L": "2.5.4.7", "ST": "2.5.4.8", "DC": "0.9.2342.19200300.100.1.25",
              "emailAddress": "1.2.840.113549.1.9.1", "UID": "0.9.2342.19200300.100.1.1"}
_OID_SHORT = {oid: short for short, oid in _SHORT_OID.items()}


def _escape_dn_value(value: str) -> str:
    """A value as it stands in a grid-style DN: '/', '+' and '\\' escaped, so no value can
    pass for more attributes (``CN="admin/CN=42"`` is ``/CN=admin\\/CN=42``)."""
    return value.replace("\\", "\\\\").replace("/", "\\/").replace("+", "\\+")


def dn_of_name(name) -> str:
    """A certificate's subject (cryptography's ``x509.Name``) as a grid-style DN: short names in
    certificate order (/DC=ch/O=x/CN=name), the way PanDA writes owners. Values are escaped,
    so two different subjects never give the same string."""
    parts = []
    for rdn in name.rdns:
        attrs = []
        for attr in sorted(rdn, key=lambda a: a.oid.dotted_string):
            short = _OID_SHORT.get(attr.oid.dotted_string, attr.oid.dotted_string)
            attrs.append(f"{short}={_escape_dn_value(str(attr.value))}")
        parts.append("/" + "+".join(attrs))
    return "".join(parts)


_SLASH_RDN = re.compile(r"/((?:[^/\\]|\\.)+)")
_UNESCAPE = re.compile(r"\\(.)")


def parse_dn(text: str):
    """A DN given on the command line (``--admin-dn``) as a structured ``x509.Name``.

    Two spellings: RFC 4514 (``CN=admin,O=org``, last RDN first, as openssl -nameopt RFC2253
    prints it) and the grid's slash form in certificate order (``/O=org/CN=admin``), where a
    '/' or '+' inside a value must be escaped with '\\'. Comparing names, not strings, is what
    keeps ``/O=org/CN=admin/CN=42`` (three attributes) from matching a certificate whose CN is
    ``admin/CN=42``. ValueError names what cannot be read.
    """
    from cryptography import x509
    text = text.strip()
    if not text:
        raise ValueError("an empty DN")
    if not text.startswith("/"):
        try:
            return x509.Name.from_rfc4514_string(text)
        except ValueError as exc:
            raise ValueError(f"DN {text!r} is not RFC 4514: {exc}") from None
    rest = text
    rdns = []
    pos = 0
    for m in _SLASH_RDN.finditer(rest):
        if m.start() != pos:
            break
        pos = m.end()
        attrs = []
        for item in re.split(r"(?<!\\)\+", m.group(1)):
            key, eq, value = item.partition("=")
            oid = _SHORT_OID.get(key)
            if not eq or oid is None:
                raise ValueError(f"DN {text!r}: {item!r} is not ATTRIBUTE=value with a known "
                                 "attribute (C, O, OU, CN, DC, L, ST, UID, emailAddress)")
            attrs.append(x509.NameAttribute(x509.ObjectIdentifier(oid),
                                            _UNESCAPE.sub(r"\1", value)))
        rdns.append(x509.RelativeDistinguishedName(attrs))
    if pos != len(rest) or not rdns:
        raise ValueError(f"DN {text!r}: cannot read it as /ATTR=value/... (escape '/' in a value "
                         "as '\\/', or write it as RFC 4514)")
    return x509.Name(rdns)


def _name_key(name) -> tuple:
    """What makes two names the same: each RDN's set of (attribute, value), in order."""
    return tuple(frozenset((a.oid.dotted_string, str(a.value)) for a in rdn) for rdn in name.rdns)


class DNMatcher:
    """Which configured DNs a certificate's subject is, compared as structured names."""

    def __init__(self, dns=()):
        self._keys = frozenset(_name_key(parse_dn(d) if isinstance(d, str) else d) for d in dns)

    def __contains__(self, name) -> bool:
        return _name_key(name) in self._keys

    def __bool__(self) -> bool:
        return bool(self._keys)


def identity_from_certificate(der: bytes, admin_dns: "DNMatcher", pilot_dns: "DNMatcher"
                              ) -> Identity:
    """The identity of a verified client certificate (DER): its subject as a structured name
    decides the role; the escaped grid-style DN is its subject string (the owner of what it
    submits)."""
    from cryptography import x509
    name = x509.load_der_x509_certificate(der).subject
    dn = dn_of_name(name)
    if name in admin_dns:
        return Identity(dn, "admin")
    if name in pilot_dns:
        return Identity(dn, "pilot")
    return Identity(dn, "user")
