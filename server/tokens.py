"""Bearer tokens as the grid issues them: JWTs on the WLCG common JWT profile.

The server signs its own tokens (ES256, a key of its own in the key directory, published as a
JWKS at ``/.well-known/jwks.json``), so any process sharing the key directory, and anyone holding
the JWKS, can verify them without a database round trip. Tokens of configured external issuers
(an OIDC provider such as ATLAS's IAM) are verified against the provider's JWKS, fetched and
refreshed in the background, and their groups are mapped to this server's roles. A token is
revoked by its ``jti`` (``RevocationList``). docs/security.md describes the claims.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

log = logging.getLogger(__name__)

ROLES = ("pilot", "user", "admin")
ROLE_RANK = {role: n for n, role in enumerate(ROLES)}
TOKEN_KEY_FILE = "token-es256.pem"
ISSUER_FILE = "token-issuer"
DEFAULT_ISSUER = "panda-wms"
#: the WLCG profile's audience meaning "any relying party"
ANY_AUDIENCE = "https://wlcg.cern.ch/jwt/v1/any"
WLCG_VERSION = "1.0"
ALGORITHMS = ["ES256", "RS256", "ES384", "RS384", "ES512", "RS512", "PS256", "EdDSA"]
MAX_TOKEN_BYTES = 16384
JWKS_REFRESH_S = 600          # a provider's keys are fetched again this often
JWKS_RETRY_S = 10             # an unknown key id starts a fetch at most this often
LEEWAY_S = 60                 # clock skew allowed on exp, nbf and iat
MAX_DOCUMENT_BYTES = 1 << 20  # a provider's discovery document or JWKS


class TokenError(Exception):
    """A credential that is missing, malformed, expired, revoked or not allowed.
    ``status_code`` is PanDA's: 50 invalid token, 60 role, 70 denied."""

    def __init__(self, message: str, status_code: int = 50):
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class Claims:
    """What a verified token says: who, with which role, until when, under which id."""
    subject: str
    role: str
    site: str | None
    expires: float
    jti: str | None
    issuer: str
    groups: tuple[str, ...] = ()     # the token's groups, without a leading slash


@dataclass
class TrustedIssuer:
    """An external OIDC provider whose tokens this server accepts (one entry of the
    ``--token-issuers`` file). ``roles`` maps a group (``groups`` or ``wlcg.groups``, with or
    without the leading slash) to a role; a token gets the highest role its groups give and is
    refused when none does. ``vo``/``client_id``/``client_secret``: panda-client's login
    document ``/auth/<vo>_auth_config.json`` for this provider."""
    issuer: str
    audience: list[str]
    roles: dict[str, str]
    jwks_uri: str = ""               # "": the provider's openid-configuration names it
    username_claim: str = "preferred_username"
    vo: str = ""
    client_id: str = ""
    client_secret: str = ""
    ca_bundle: str = ""              # verifies the provider's https; "": the system's CAs
    keys: dict[str, Any] = field(default_factory=dict, repr=False)
    fetched: float = 0.0
    tried: float = 0.0

    def oidc_config_url(self) -> str:
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"

    def role_of(self, claims: dict) -> str | None:
        groups: list[str] = []
        for key in ("wlcg.groups", "groups"):
            value = claims.get(key)
            if isinstance(value, list):
                groups += [g for g in value if isinstance(g, str)]
        wanted = {g.strip("/") for g in groups}
        found = [role for group, role in self.roles.items() if group.strip("/") in wanted]
        return max(found, key=ROLE_RANK.__getitem__) if found else None


def token_groups(claims: dict) -> tuple[str, ...]:
    """The groups a token's claims name (``wlcg.groups``, ``groups``), without leading slashes
    and without duplicates; anything not a string is ignored."""
    out: list[str] = []
    for key in ("wlcg.groups", "groups"):
        value = claims.get(key)
        if isinstance(value, list):
            out += [g.strip("/") for g in value if isinstance(g, str) and g.strip("/")]
    return tuple(dict.fromkeys(g[:255] for g in out[:100]))


def _fail(path: str, why: str) -> ValueError:
    return ValueError(f"{path}: {why}")


def load_issuers(path: str | os.PathLike) -> list[TrustedIssuer]:
    """The trusted issuers of a YAML/JSON file ``{"issuers": [...]}``; ValueError names the key."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not YAML/JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("issuers"), list):
        raise _fail(str(path), "expected a mapping with a list 'issuers'")
    out = []
    text_keys = ("jwks_uri", "username_claim", "vo", "client_id", "client_secret", "ca_bundle")
    for n, entry in enumerate(data["issuers"]):
        where = f"{path}: issuers[{n}]"
        if not isinstance(entry, dict):
            raise _fail(where, "expected a mapping")
        unknown = set(entry) - {"issuer", "audience", "roles", *text_keys}
        if unknown:
            raise _fail(where, f"unknown key(s) {', '.join(sorted(unknown))}")
        issuer = entry.get("issuer")
        if not isinstance(issuer, str) or not issuer.startswith("https://"):
            raise _fail(f"{where}.issuer", "expected the provider's https:// URL")
        audience = entry.get("audience")
        audience = [audience] if isinstance(audience, str) else audience
        if not audience or not all(isinstance(a, str) and a for a in audience):
            raise _fail(f"{where}.audience", "expected this server's audience (text or list)")
        roles = entry.get("roles")
        if not isinstance(roles, dict) or not roles or \
                not all(isinstance(g, str) and r in ROLES for g, r in roles.items()):
            raise _fail(f"{where}.roles", f"expected group: role, roles {', '.join(ROLES)}")
        for key in text_keys:
            if key in entry and not isinstance(entry[key], str):
                raise _fail(f"{where}.{key}", "expected text")
        out.append(TrustedIssuer(issuer=issuer.rstrip("/"), audience=list(audience),
                                 roles=dict(roles),
                                 **{k: entry[k] for k in text_keys if k in entry}))
    return out


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only, atomically, never clobbering a racing writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, path)   # fails if another process created it first: keep theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def jwk_thumbprint(jwk: dict) -> str:
    """RFC 7638 thumbprint of an EC public JWK: the ``kid`` of the server's key."""
    required = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    return _b64(hashlib.sha256(json.dumps(required, separators=(",", ":"),
                                          sort_keys=True).encode()).digest())


class RevocationList:
    """The ``jti`` of every revoked token that has not expired yet. ``load`` reads them from the
    database (the server refreshes it every few seconds, so a revocation made by another process
    takes effect within that time; in the process that revoked, at once)."""

    def __init__(self, load: Callable[[], Iterable[str]] | None = None):
        self._load = load
        self._revoked: frozenset[str] = frozenset()

    def refresh(self) -> None:
        if self._load is not None:
            self._revoked = frozenset(self._load())

    def add(self, jti: str) -> None:
        self._revoked = self._revoked | {jti}

    def __contains__(self, jti: object) -> bool:
        return jti in self._revoked


class TokenService:
    """Issues this server's tokens and verifies its own and the trusted issuers' tokens."""

    def __init__(self, key_dir: str | os.PathLike, issuer: str | None = None,
                 trusted: Iterable[TrustedIssuer] = (), revoked: RevocationList | None = None):
        self.key_dir = Path(key_dir)
        issuer_path = self.key_dir / ISSUER_FILE
        if issuer:
            if not issuer_path.exists() or issuer_path.read_text().strip() != issuer:
                self.key_dir.mkdir(parents=True, exist_ok=True)
                issuer_path.write_text(issuer + "\n")
        elif issuer_path.exists():
            issuer = issuer_path.read_text().strip()
        self.issuer = (issuer or DEFAULT_ISSUER).rstrip("/")
        self.audience = [self.issuer, ANY_AUDIENCE]
        key_path = self.key_dir / TOKEN_KEY_FILE
        if not key_path.exists():
            pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption())
            write_private(key_path, pem)
        self._key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self._key.public_key()))
        self.kid = jwk_thumbprint(public)
        self.public_jwk = {**public, "kid": self.kid, "use": "sig", "alg": "ES256"}
        self.trusted = {t.issuer: t for t in trusted}
        if self.issuer in self.trusted:
            raise ValueError(f"trusted issuer {self.issuer} is this server's own issuer")
        self.revoked = revoked or RevocationList()

    # --- what the server publishes ------------------------------------------------------------
    def jwks(self) -> dict:
        return {"keys": [self.public_jwk]}

    def openid_configuration(self, base_url: str) -> dict:
        """Enough of OIDC discovery for a relying party to find the keys."""
        return {"issuer": self.issuer, "jwks_uri": f"{base_url}/.well-known/jwks.json",
                "id_token_signing_alg_values_supported": ["ES256"],
                "claims_supported": ["iss", "sub", "aud", "exp", "iat", "nbf", "jti", "scope",
                                     "wlcg.ver", "groups", "name", "preferred_username"]}

    def auth_config(self, vo: str) -> dict | None:
        """panda-client's login document for ``vo``: where its device-code flow goes."""
        for t in self.trusted.values():
            if t.vo and t.vo == vo:
                return {"vo": vo, "client_id": t.client_id, "client_secret": t.client_secret,
                        "audience": t.audience[0], "oidc_config_url": t.oidc_config_url()}
        return None

    # --- issuing -------------------------------------------------------------------------------
    def issue(self, subject: str, role: str, site: str | None = None,
              lifetime_s: int = 30 * 24 * 3600, groups: tuple[str, ...] = ()) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
        if not subject or not isinstance(subject, str):
            raise ValueError("a token needs a subject")
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": subject, "aud": self.issuer, "iat": now,
                  "nbf": now, "exp": now + int(lifetime_s), "jti": str(uuid.uuid4()),
                  "scope": f"panda:{role}", "wlcg.ver": WLCG_VERSION,
                  "groups": [f"panda/{role}", *(g.strip("/") for g in groups)], "role": role,
                  # what panda-client's get_user_name_from_token() and prun read
                  "name": subject, "preferred_username": subject}
        if site:
            claims["site"] = site
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self.kid})

    # --- verifying -----------------------------------------------------------------------------
    def verify(self, token: str) -> Claims:
        if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES or not token.isascii():
            raise TokenError("malformed bearer token")
        token = token.strip()
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise TokenError("malformed bearer token") from None
        issuer = unverified.get("iss")
        if not isinstance(issuer, str):
            raise TokenError("bearer token names no issuer")
        issuer = issuer.rstrip("/")
        if issuer == self.issuer:
            claims = self._decode(token, self._key.public_key(), ["ES256"], self.audience,
                                  unverified.get("iss"))
            role = claims.get("role")
            if role not in ROLES:
                raise TokenError("bearer token has no valid role", 60)
            subject, site = claims.get("sub"), claims.get("site")
        elif issuer in self.trusted:
            trusted = self.trusted[issuer]
            key = self._provider_key(trusted, header.get("kid"))
            claims = self._decode(token, key, ALGORITHMS, trusted.audience,
                                  unverified.get("iss"))
            role = trusted.role_of(claims)
            if role is None:
                raise TokenError(f"no group of this token has a role here (issuer {issuer})", 60)
            subject = claims.get(trusted.username_claim) or claims.get("sub")
            site = None
        else:
            raise TokenError(f"bearer token of an issuer this server does not trust: "
                             f"{issuer[:200]!r}")
        if not isinstance(subject, str) or not subject:
            raise TokenError("bearer token names no subject")
        if site is not None and not isinstance(site, str):
            raise TokenError("bearer token has a malformed site")
        jti = claims.get("jti")
        if jti is not None and not isinstance(jti, str):
            raise TokenError("bearer token has a malformed jti")
        if jti is not None and jti in self.revoked:
            raise TokenError("bearer token revoked")
        return Claims(subject=subject, role=role, site=site, expires=float(claims["exp"]),
                      jti=jti, issuer=issuer, groups=token_groups(claims))

    @staticmethod
    def _decode(token: str, key: Any, algorithms: list[str], audience: list[str],
                issuer: str) -> dict:
        try:
            return jwt.decode(token, key, algorithms=algorithms, audience=audience,
                              issuer=issuer, leeway=LEEWAY_S,
                              options={"require": ["exp", "iat", "sub", "iss"]})
        except jwt.ExpiredSignatureError:
            raise TokenError("bearer token expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenError("bearer token not valid yet") from None
        except jwt.InvalidAudienceError:
            raise TokenError("bearer token is for another audience") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(f"bearer token lacks the claim {exc.claim!r}") from None
        except jwt.InvalidSignatureError:
            raise TokenError("bearer token signature does not verify") from None
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise TokenError(f"bearer token refused: {type(exc).__name__}") from None

    # --- the providers' keys -------------------------------------------------------------------
    def _provider_key(self, trusted: TrustedIssuer, kid: Any) -> Any:
        key = trusted.keys.get(kid) if isinstance(kid, str) else None
        if key is None and kid is None and len(trusted.keys) == 1:
            key = next(iter(trusted.keys.values()))
        if key is not None:
            if time.time() - trusted.fetched > JWKS_REFRESH_S:
                self._refresh_soon(trusted)
            return key
        # a key we do not know (the provider rotated, or a forger's): fetch again, in the
        # background and at most every JWKS_RETRY_S, and refuse this request meanwhile
        self._refresh_soon(trusted)
        raise TokenError(f"bearer token signed with a key {trusted.issuer} does not publish "
                         "(yet): try again shortly")

    def _refresh_soon(self, trusted: TrustedIssuer) -> None:
        now = time.time()
        if now - trusted.tried < JWKS_RETRY_S:
            return
        trusted.tried = now
        threading.Thread(target=self.refresh_keys, args=(trusted,), daemon=True,
                         name=f"jwks {trusted.issuer}").start()

    def refresh_all(self) -> None:
        """Fetch every trusted provider's keys now (at start; failures are logged)."""
        for trusted in self.trusted.values():
            self.refresh_keys(trusted)

    @staticmethod
    def refresh_keys(trusted: TrustedIssuer, timeout_s: float = 10) -> bool:
        verify: str | bool = trusted.ca_bundle or True

        def fetch_json(url: str) -> Any:
            """A provider's JSON document, at most MAX_DOCUMENT_BYTES (a hostile or broken
            provider cannot fill the server's memory)."""
            with requests.get(url, timeout=timeout_s, verify=verify, stream=True) as resp:
                resp.raise_for_status()
                body = resp.raw.read(MAX_DOCUMENT_BYTES + 1, decode_content=True)
            if len(body) > MAX_DOCUMENT_BYTES:
                raise ValueError(f"{url}: larger than {MAX_DOCUMENT_BYTES} bytes")
            return json.loads(body)

        try:
            uri = trusted.jwks_uri or fetch_json(trusted.oidc_config_url())["jwks_uri"]
            if not isinstance(uri, str) or not uri.startswith("https://"):
                raise ValueError(f"jwks_uri {str(uri)[:200]!r} is not an https URL")
            keys = {}
            for entry in fetch_json(uri)["keys"]:
                if not isinstance(entry, dict) or entry.get("use", "sig") != "sig" \
                        or "kid" not in entry:
                    continue
                try:
                    keys[entry["kid"]] = jwt.PyJWK(entry).key
                except jwt.PyJWTError as exc:
                    log.warning("%s: skipping key %s: %s", trusted.issuer, entry.get("kid"), exc)
        except (requests.RequestException, ValueError, KeyError, TypeError,
                AttributeError) as exc:
            log.warning("cannot fetch the keys of token issuer %s: %s", trusted.issuer, exc)
            return False
        trusted.keys, trusted.fetched = keys, time.time()
        log.info("token issuer %s: %d key(s)", trusted.issuer, len(keys))
        return True
