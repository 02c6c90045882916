"""API methods of bearer tokens: revoke one (by the token itself, or an admin by its ``jti``),
list the revoked ones. Served under ``/api/v1`` (``app.API_MODULES``)."""
from __future__ import annotations

import logging
import time

from .apibase import ADMIN, ApiError, ApiMethods, Context, Forbidden, Param, str_param

log = logging.getLogger(__name__)

api = ApiMethods()
#: a jti revoked without its token is kept this long (longer than any token this server issues)
JTI_ONLY_KEEP_S = 400 * 24 * 3600


@api("auth", "revoke_token", ("POST",), ("pilot", "user", "admin"), params=(
    Param("token", max_length=16384, description="the token to revoke (or give its jti)"),
    Param("jti", description="the token's id"),
    Param("reason", max_length=1000, description="why, for the record")))
def revoke_token(ctx: Context, params: dict) -> dict:
    """``token``: revoke that token (whoever holds a token may end it); ``jti``: an admin
    revokes a token it does not have. Every server process refuses it within seconds."""
    token, jti, reason = (str_param(params, k) for k in ("token", "jti", "reason"))
    if bool(token) == bool(jti):
        raise ApiError("give either 'token' (the token to revoke) or 'jti' (admin)")
    subject = None
    if token:
        try:
            claims = ctx.keys.tokens.verify(token)
        except Exception as exc:  # noqa: BLE001 - TokenError: refused with its reason
            raise ApiError(f"cannot revoke: {exc}") from None
        if claims.jti is None:
            raise ApiError("this token has no jti: it cannot be revoked one by one")
        jti, expires, subject = claims.jti, claims.expires, claims.subject
    else:
        if ctx.identity is None or ctx.identity.role not in ADMIN:
            raise Forbidden("revoking by jti needs the admin role")
        if len(jti) > 255:
            raise ApiError("parameter 'jti' is longer than 255 characters")
        expires = time.time() + JTI_ONLY_KEEP_S
    if reason and len(reason) > 255:
        reason = reason[:255]
    by = ctx.identity.subject if ctx.identity else "anonymous"
    new = ctx.tb.revoked_tokens.revoke(jti, expires, by, subject, reason)
    ctx.keys.tokens.revoked.add(jti)          # this process: at once
    log.info("token %s (%s) revoked by %s%s", jti, subject or "?", by,
             "" if new else " (already revoked)")
    return {"jti": jti, "revoked": True, "already": not new}


@api("auth", "list_revoked", ("GET",), ADMIN)
def list_revoked(ctx: Context, params: dict) -> list[dict]:
    """Revoked tokens that have not expired yet."""
    return ctx.tb.revoked_tokens.list()

