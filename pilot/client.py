"""HTTP client for PanDA's pilot protocol, on the standard library so the pilot starts fast.

``requests`` alone costs ~130 ms to import, more than the rest of the pilot's start: urllib does
what the protocol needs (form POST, JSON reply, bearer token). Every call is retried with
exponential backoff; when the server stays away ``ServerUnreachable`` is raised and the caller
decides what to keep on disk.
"""
from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from .errors import ServerUnreachable

log = logging.getLogger(__name__)


@dataclass
class RetryPolicy:
    attempts: int = 5
    backoff_s: float = 2.0       # first wait; doubles each time
    max_backoff_s: float = 60.0
    timeout_s: float = 30.0      # one request

    def waits(self):
        wait = self.backoff_s
        for _ in range(max(0, self.attempts - 1)):
            yield wait
            wait = min(wait * 2, self.max_backoff_s)


class ProtocolError(Exception):
    """The server answered, but not with what the protocol says (not retried)."""


class PandaClient:
    def __init__(self, server: str, token: str | None = None,
                 retry: RetryPolicy | None = None) -> None:
        self.server = server.rstrip("/")
        self._token = token
        self.retry = retry or RetryPolicy()

    def __repr__(self) -> str:  # never show the token
        return f"PandaClient({self.server!r})"

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "panda-wms-pilot"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _once(self, method: str, url: str, body: bytes | None, timeout: float) -> Any:
        headers = self._headers()
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        req = urllib.request.Request(url, data=body, headers=headers, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = resp.read()
        try:
            return json.loads(data)
        except ValueError:
            raise ProtocolError(f"{url}: reply is not JSON: {data[:200]!r}") from None

    def call(self, method: str, path: str, form: dict[str, Any] | None = None,
             policy: RetryPolicy | None = None) -> Any:
        """One protocol call with retries; raise ServerUnreachable when every attempt failed."""
        policy = policy or self.retry
        url = self.server + path
        body = None
        if form is not None:
            fields = {k: "" if v is None else v for k, v in form.items()}
            body = urllib.parse.urlencode(fields).encode()
        waits = policy.waits()
        last = ""
        while True:
            try:
                return self._once(method, url, body, policy.timeout_s)
            except urllib.error.HTTPError as exc:
                if exc.code < 500 and exc.code not in (408, 429):
                    detail = exc.read()[:300]
                    raise ProtocolError(f"{method} {path}: HTTP {exc.code}: {detail!r}") from None
                last = f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                last = str(getattr(exc, "reason", exc))
            wait = next(waits, None)
            if wait is None:
                raise ServerUnreachable(f"{method} {path} failed after {policy.attempts} "
                                        f"attempts: {last}")
            log.warning("%s %s failed (%s); retrying in %.1f s", method, path, last, wait)
            time.sleep(wait)

    # --- the protocol's calls -------------------------------------------------------------
    def get_job(self, form: dict[str, Any]) -> dict[str, Any] | None:
        """A job dict, or None when the server has no job (StatusCode 20)."""
        reply = self.call("POST", "/server/panda/getJob", form)
        if not isinstance(reply, dict):
            raise ProtocolError("getJob reply is not a JSON object")
        code = status_code(reply)
        if code == 20:
            return None
        if code != 0:
            raise ProtocolError(f"getJob StatusCode {code}: {reply.get('errorDialog', '')}")
        if isinstance(reply.get("jobs"), list):
            return reply["jobs"][0] if reply["jobs"] else None
        return {k: v for k, v in reply.items() if k not in ("StatusCode", "errorDialog")}

    def update_job(self, form: dict[str, Any], policy: RetryPolicy | None = None) -> dict[str, Any]:
        reply = self.call("POST", "/server/panda/updateJob", form, policy)
        if not isinstance(reply, dict):
            raise ProtocolError("updateJob reply is not a JSON object")
        return reply

    def queuedata(self, site: str) -> dict[str, Any]:
        reply = self.call("GET", f"/cache/schedconfig/{urllib.parse.quote(site)}.all.json")
        if not isinstance(reply, dict):
            raise ProtocolError("queuedata is not a JSON object")
        return reply

    def public_key(self) -> str:
        reply = self.call("GET", "/api/v1/system/get_public_key")
        if not isinstance(reply, dict) or not reply.get("success") or not reply.get("data"):
            raise ProtocolError(f"get_public_key failed: {str(reply)[:200]}")
        return str(reply["data"])


def status_code(reply: dict[str, Any]) -> int:
    """PanDA's StatusCode of a reply; a missing or unreadable one is a protocol error."""
    try:
        return int(reply["StatusCode"])
    except (KeyError, TypeError, ValueError):
        raise ProtocolError(f"reply without a readable StatusCode: {str(reply)[:200]}") from None


def server_commands(reply: dict[str, Any]) -> set[str]:
    """The commands in an updateJob reply (``command`` may be a comma list; NULL = none)."""
    raw = str(reply.get("command") or "NULL")
    return {c.strip().lower() for c in raw.split(",") if c.strip() and c.strip().upper() != "NULL"}
