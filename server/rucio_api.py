"""The part of Rucio's REST API that PanDA's pilot 3 calls through Rucio's own client.

Pilot 3 (3.7) resolves every input of an ``xrdcp``/``gfal`` site with ``rucio.client.Client()``
and ``list_replicas``. This module answers those calls from this server's own catalogue (the
``replicas`` and ``dataset_files`` tables), under ``/rucio/``: ``rucio.cfg``'s ``rucio_host`` and
``auth_host`` are ``<server>/rucio``. The caller authenticates with this server's (or a trusted
issuer's) token as a WLCG bearer token: Rucio's client with ``auth_type = oidc`` finds it in
``BEARER_TOKEN`` / ``BEARER_TOKEN_FILE`` and sends it as ``X-Rucio-Auth-Token``; no Rucio
account or login flow exists here. Errors carry Rucio's ``ExceptionClass`` and
``ExceptionMessage`` (headers and JSON body), so the client raises its own exception classes.
Facts and limits: docs/compat.md ("Rucio's REST API for pilot 3").
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from panda_core import __version__
from panda_core.replicas import BadFileName, check_name, replica_path, replica_url

from .auth import AuthError, Identity
from .handlers import BaseHandler, request_identity

log = logging.getLogger(__name__)

PREFIX = "/rucio"
MAX_DIDS = 10000                 # one list_replicas call; pilot 3 sends one job's inputs


class RucioError(Exception):
    """A refusal in Rucio's terms: its exception class name, an HTTP status, a message."""

    def __init__(self, exc_class: str, status: int, message: str):
        super().__init__(message)
        self.exc_class = exc_class
        self.status = status


@dataclass(frozen=True)
class ReplicaQuery:
    """What ``POST /replicas/list`` asks, checked."""
    dids: tuple[tuple[str, str], ...]
    schemes: tuple[str, ...] | None      # None: every scheme
    rses: frozenset[str] | None          # None: every storage element


def parse_query(body: bytes) -> ReplicaQuery:
    """The JSON body Rucio's ``ReplicaClient.list_replicas`` sends, or RucioError (400)."""
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise RucioError("InvalidObject", 400, "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise RucioError("InvalidObject", 400, "request body must be a JSON object")
    raw_dids = data.get("dids")
    if not isinstance(raw_dids, list) or not raw_dids:
        raise RucioError("InvalidObject", 400, "'dids' must be a non-empty list of "
                                               "{'scope': ..., 'name': ...}")
    if len(raw_dids) > MAX_DIDS:
        raise RucioError("InvalidObject", 400, f"at most {MAX_DIDS} dids per call")
    dids = []
    for did in raw_dids:
        if not isinstance(did, dict):
            raise RucioError("InvalidObject", 400, "each did must be {'scope': ..., 'name': ...}")
        scope, name = did.get("scope"), did.get("name")
        try:
            dids.append((check_name(scope, "scope"), check_name(name)))
        except BadFileName as exc:
            raise RucioError("InvalidObject", 400, str(exc)) from None
    schemes = data.get("schemes")
    if schemes is not None:
        if not isinstance(schemes, list) or not all(isinstance(s, str) for s in schemes):
            raise RucioError("InvalidObject", 400, "'schemes' must be a list of strings")
        schemes = tuple(s.lower() for s in schemes)
    return ReplicaQuery(tuple(dict.fromkeys(dids)), schemes,
                        parse_rse_expression(data.get("rse_expression")))


def parse_rse_expression(expression: Any) -> frozenset[str] | None:
    """The RSE expressions this server understands: one name or names joined by ``|``.
    Rucio's attribute expressions (``type=DATADISK``, ``\\``, ``&``) are refused, not guessed."""
    if expression in (None, ""):
        return None
    if not isinstance(expression, str) or len(expression) > 1000:
        raise RucioError("InvalidRSEExpression", 400, "'rse_expression' must be a string")
    names = [part.strip() for part in expression.split("|")]
    for name in names:
        if not name or not all(c.isalnum() or c in "_-." for c in name):
            raise RucioError("InvalidRSEExpression", 400,
                             f"rse_expression {expression[:200]!r}: only storage element names "
                             "joined by '|' are supported here")
    return frozenset(names)


def split_checksum(checksum: str | None) -> tuple[str | None, str | None]:
    """The catalogue's ``ad:<hex>`` / ``md5:<hex>`` as Rucio's (adler32, md5)."""
    if not checksum:
        return None, None
    kind, _, value = checksum.partition(":")
    if kind == "ad":
        return value, None
    if kind == "md5":
        return None, value
    return None, None


def replica_pfn(se_url: str, scope: str, name: str) -> str:
    """The replica's URL as pilot 3 itself builds it from ``ddmendpoints.json`` (endpoint +
    path + the deterministic layout): for XRootD the path after the host must start with two
    slashes, one slash is a relative path there, which xrootd refuses ([3010])."""
    parts = urlsplit(se_url)
    if parts.scheme.lower() not in ("root", "xroot"):
        return replica_url(se_url, scope, name)
    root = parts.path.strip("/")
    return (f"{parts.scheme}://{parts.netloc}//{root + '/' if root else ''}"
            f"{replica_path(scope, name)}")


def replica_records(query: ReplicaQuery, catalogue: dict[tuple[str, str], dict],
                    se_urls: dict[str, str]) -> list[dict]:
    """One Rucio replica record per file of ``query`` that has a replica left after the scheme
    and RSE filters; in the order asked. ``catalogue``: ``Data.file_replicas``; ``se_urls``:
    storage element name -> root URL from the site configs (a replica registered without a
    SURL is at the deterministic path below it)."""
    out = []
    for scope, name in query.dids:
        entry = catalogue.get((scope, name))
        if entry is None:
            continue
        pfns: dict[str, dict] = {}
        rses: dict[str, list[str]] = {}
        for endpoint, surl in entry["replicas"]:
            if query.rses is not None and endpoint not in query.rses:
                continue
            if endpoint in se_urls:      # the site's current URL wins over a stale SURL
                surl = replica_pfn(se_urls[endpoint], scope, name)
            if not surl:
                continue
            scheme = urlsplit(surl).scheme.lower() or "file"
            if query.schemes is not None and scheme not in query.schemes:
                continue
            pfns[surl] = {"rse": endpoint, "rse_id": endpoint, "type": "DISK", "domain": "lan",
                          "priority": len(pfns) + 1, "volatile": False,
                          "client_extract": False}
            rses.setdefault(endpoint, []).append(surl)
        if not pfns:
            continue
        adler32, md5 = split_checksum(entry["checksum"])
        out.append({"scope": scope, "name": name, "bytes": entry["fsize"], "adler32": adler32,
                    "md5": md5, "pfns": pfns, "rses": rses,
                    "states": {rse: "AVAILABLE" for rse in rses}})
    return out


def storage_urls(site_configs: list[dict]) -> dict[str, str]:
    """Storage element name -> root URL, from every site's ``storage`` section."""
    out: dict[str, str] = {}
    for config in site_configs:
        for role in ("input", "output"):
            se = (config.get("storage") or {}).get(role) or {}
            if se.get("name") and se.get("url"):
                out.setdefault(se["name"], se["url"])
    return out


class RucioHandler(BaseHandler):
    """Rucio's conventions: the token in ``X-Rucio-Auth-Token``, errors as ExceptionClass."""

    def identity(self) -> Identity:
        token = self.request.headers.get("X-Rucio-Auth-Token", "").strip()
        try:
            if token and token != "None":        # the client sends "None" before it has one
                return self.state.keys.verify_token(token)
            found = request_identity(self.request, self.state)
        except AuthError as exc:
            raise RucioError("CannotAuthenticate", 401, f"invalid token: {exc}") from None
        if found is None:
            raise RucioError("CannotAuthenticate", 401,
                             "no token: send this server's token as X-Rucio-Auth-Token (Rucio's "
                             "client: auth_type = oidc with BEARER_TOKEN_FILE; docs/compat.md)")
        return found

    def refusal(self, exc: BaseException | None) -> tuple[int, str] | None:
        if isinstance(exc, RucioError):
            return exc.status, str(exc)
        return super().refusal(exc)

    def write_error(self, status_code: int, **kwargs) -> None:
        """Every error in Rucio's shape: its client reads ExceptionClass/ExceptionMessage."""
        exc = kwargs["exc_info"][1] if "exc_info" in kwargs else None
        if not isinstance(exc, RucioError):
            status, message = self.refusal(exc) or (
                status_code, "internal server error" if status_code >= 500
                else self._reason or "bad request")
            exc = RucioError("RucioException", status, message)
        self.set_status(exc.status)
        self.set_header("ExceptionClass", exc.exc_class)
        self.set_header("ExceptionMessage", str(exc)[:500].replace("\n", " "))
        self.set_header("Content-Type", "application/octet-stream")
        self.finish(json.dumps({"ExceptionClass": exc.exc_class, "ExceptionMessage": str(exc)}))


class PingHandler(RucioHandler):
    """``GET /ping``: the client's ``ping()``; no token needed, as in Rucio."""

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"version": f"panda-wms {__version__}"}))


class ValidateHandler(RucioHandler):
    """``GET /auth/validate``: who the token speaks for."""

    def get(self) -> None:
        who = self.identity()
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"account": who.subject, "identity": who.subject,
                                "role": who.role}))


class LoginHandler(RucioHandler):
    """Rucio's login calls (``/auth/userpass``, ``/auth/x509``, ``/auth/oidc``, ...): none
    here, the answer says what to do instead (the client raises CannotAuthenticate)."""

    def get(self, method: str) -> None:
        raise RucioError("CannotAuthenticate", 401,
                         f"Rucio login '{method[:40]}' is not offered by this server: use its "
                         "token as a WLCG bearer token (auth_type = oidc, BEARER_TOKEN_FILE)")


class WhoAmIHandler(RucioHandler):
    """``GET /accounts/whoami``: the account is the token's subject."""

    def get(self) -> None:
        who = self.identity()
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"account": who.subject, "account_type": "USER",
                                "status": "ACTIVE", "role": who.role}))


class ListReplicasHandler(RucioHandler):
    """``POST /replicas/list``: replicas of files from the catalogue, newline-delimited JSON."""

    async def post(self) -> None:
        self.identity()
        if self.request.headers.get("Accept", "").startswith("application/metalink4+xml"):
            raise RucioError("UnsupportedOperation", 406,
                             "metalink replies are not supported here: ask for JSON")
        query = parse_query(self.request.body)
        catalogue = await self.run(self.state.tb.data.file_replicas, list(query.dids))
        sites = await self.run(self.state.tb.sites.all)
        records = replica_records(query, catalogue, storage_urls([s["config"] for s in sites]))
        log.debug("rucio list_replicas: %d dids, %d with replicas", len(query.dids), len(records))
        self.set_header("Content-Type", "application/x-json-stream")
        self.finish("".join(json.dumps(r) + "\n" for r in records))


def routes(kw: dict) -> list:
    return [
        (PREFIX + r"/ping/?", PingHandler, kw),
        (PREFIX + r"/auth/validate/?", ValidateHandler, kw),
        (PREFIX + r"/auth/([A-Za-z0-9_]{1,40})/?", LoginHandler, kw),
        (PREFIX + r"/accounts/whoami/?", WhoAmIHandler, kw),
        (PREFIX + r"/replicas/list/?", ListReplicasHandler, kw),
    ]
