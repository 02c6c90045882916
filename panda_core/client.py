"""The one client of the server: PanDA's pilot protocol and the ``/api/v1`` JSON API.

On the standard library (urllib): the pilot imports this on every start, and ``requests`` alone
costs ~130 ms to import, more than the rest of the pilot's start. Every part that speaks to the
server uses it: the pilot and ARC push mode (``PilotClient``: ``/server/panda/<method>``, form
POST, JSON reply), the factory, ``panda sites sync`` and the user's commands (``ApiClient``:
``/api/v1/<module>/<method>``, ``{"success", "message", "data"}``).

Failures: ``ServerUnreachable`` when no try reached the server (connection refused or reset,
timeout, HTTP 5xx/408/429 on every try of the policy), ``Refused`` when the server said no, and
``ProtocolError`` when it answered something the protocol does not allow. Every message names the
URL tried; a token is never shown. A retryable answer's ``Retry-After`` (seconds or an HTTP-date)
lengthens the next wait up to the policy's cap (``RetryPolicy.wait_after``); a caller's
``deadline`` bounds every try and wait of a call (``panda_core.retry.Deadline``).
"""
from __future__ import annotations

import email.utils
import json
import logging
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import timezone
from email.message import Message
from pathlib import Path
from typing import Any

from .errorcodes import CodedError, ErrorCode
from .retry import Deadline, RetryPolicy

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:25080"
MAX_REPLY_BYTES = 64 << 20      # a reply is a few kB; a server sending more is broken or hostile


class ClientError(Exception):
    """The server could not be reached, refused the call, or answered nonsense."""


class BadServerUrl(ClientError):
    """The server URL given is not one (a typo, a missing scheme): fix the command line."""


class ServerUnreachable(CodedError, ClientError):
    """No try of the retry policy reached the server; the call may be repeated later."""

    def __init__(self, diag: str) -> None:
        super().__init__(ErrorCode.COMMUNICATION_FAILURE, diag)


class ProtocolError(ClientError):
    """The server answered, but not with what the protocol says (not retried)."""


class Refused(ClientError):
    """The server understood and said no: ``success`` false, or an HTTP 4xx."""

    def __init__(self, message: str, *, url: str, http_status: int, reason: str) -> None:
        super().__init__(message)
        self.url = url
        self.http_status = http_status
        self.reason = reason


def default_url() -> str:
    return os.environ.get("PANDA_URL") or DEFAULT_URL


def load_token(token_file: str | None = None) -> str | None:
    """The bearer token: ``token_file``, else $PANDA_AUTH_TOKEN, else ~/.panda/token."""
    if token_file:
        try:
            return Path(token_file).read_text().strip()
        except OSError as exc:
            raise ClientError(f"cannot read token file {token_file}: {exc.strerror}") from None
    if os.environ.get("PANDA_AUTH_TOKEN"):
        return os.environ["PANDA_AUTH_TOKEN"].strip()
    default = Path(os.environ.get("PANDA_HOME", Path.home() / ".panda")) / "token"
    return default.read_text().strip() if default.is_file() else None


def check_server_url(url: object) -> None:
    """ClientError saying what is wrong with ``url`` unless it is ``http(s)://host[:port]``
    with an optional path: no traceback for a typo, whatever urllib would make of it."""
    expected = "expected http://host:port or https://host:port"
    if not isinstance(url, str):
        raise BadServerUrl(f"not a server URL: {url!r} ({expected})")
    if not url.strip():
        raise BadServerUrl(f"no server URL given ({expected}; or set $PANDA_URL)")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port                  # ValueError for a port that is not a number
    except ValueError as exc:
        raise BadServerUrl(f"not a server URL: {url!r}: {exc} ({expected})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadServerUrl(f"not a server URL: {url!r} ({expected})")
    if port == 0 or any(c.isspace() for c in url):
        raise BadServerUrl(f"not a server URL: {url!r} ({expected})")
    if parts.query or parts.fragment:
        raise BadServerUrl(f"not a server URL: {url!r}: no ?query or #fragment ({expected})")


def _retryable_http(code: int) -> bool:
    return code >= 500 or code in (408, 429)


#: a Retry-After longer than this many digits is "very long" without being parsed (Python
#: refuses to turn over 4300 digits into an int; any policy's cap is far below 10**9 s anyway)
_RETRY_AFTER_DIGITS = 9


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """The seconds a ``Retry-After`` header asks to wait (RFC 9110: digits, or an HTTP-date),
    or None when there is none or it is not one (nothing to honour; never an exception, what
    a server sends is not trusted). A date in the past is 0; the caller caps long ones."""
    if not value:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(text) if len(text) <= _RETRY_AFTER_DIGITS else float(10 ** _RETRY_AFTER_DIGITS)
    if len(text) > 64:                         # an HTTP-date is 29 characters
        return None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:                    # "-0000": UTC by RFC 5322
        when = when.replace(tzinfo=timezone.utc)
    now = time.time() if now is None else now
    try:
        return max(0.0, when.timestamp() - now)
    except (OverflowError, OSError, ValueError):
        return None


def _retry_after(headers: Message | None) -> float | None:
    return retry_after_s(headers.get("Retry-After")) if headers is not None else None


class Transport:
    """HTTP(S) to one server: bearer token, CA bundle, timeouts and the retry policy."""

    def __init__(self, url: str, token: str | None = None, *, retry: RetryPolicy | None = None,
                 ca_file: str | None = None, ca_dir: str | None = None,
                 user_agent: str = "panda-wms") -> None:
        check_server_url(url)
        self.url = url.rstrip("/")
        self._token = token
        self.retry = retry or RetryPolicy()
        self.user_agent = user_agent
        handlers: list[urllib.request.BaseHandler] = []
        if self.url.startswith("https:"):
            context = ssl.create_default_context(cafile=ca_file, capath=ca_dir)
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:  # never show the token
        return f"{type(self).__name__}({self.url!r})"

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": self.user_agent}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _once(self, req: urllib.request.Request,
              timeout: float) -> tuple[int, bytes, float | None]:
        """(status, body, seconds the reply's Retry-After asks for) of one try."""
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                status, data, headers = resp.status, resp.read(MAX_REPLY_BYTES + 1), resp.headers
        except urllib.error.HTTPError as exc:
            status, data, headers = exc.code, exc.read(MAX_REPLY_BYTES + 1), exc.headers
        if len(data) > MAX_REPLY_BYTES:
            raise ProtocolError(f"{req.full_url}: reply larger than {MAX_REPLY_BYTES} bytes")
        return status, data, _retry_after(headers)

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str | None = None, policy: RetryPolicy | None = None,
                deadline: float | None = None) -> tuple[int, bytes]:
        """(HTTP status, body) of the first try that reached the server and did not get a
        retryable status; ServerUnreachable when every try failed. A retryable reply's
        Retry-After lengthens the wait before the next try (``RetryPolicy.wait_after``).
        ``deadline`` (epoch seconds) bounds the whole call, tries and waits (``Deadline``):
        past it ServerUnreachable says the deadline was reached."""
        policy = policy or self.retry
        bound = Deadline(deadline)
        url = self.url + path
        headers = self.headers()
        if content_type:
            headers["Content-Type"] = content_type
        waits = policy.waits()
        tries = 0
        while True:
            if bound.reached():
                raise ServerUnreachable(self._gave_up(url, tries, bound, "no time left to try"))
            req = urllib.request.Request(url, data=body, headers=headers, method=method)
            asked = None
            tries += 1
            try:
                status, data, asked = self._once(req, bound.timeout(policy.timeout_s))
                if not _retryable_http(status):
                    return status, data
                last = f"HTTP {status}"
                if asked is not None:
                    last += f", Retry-After {asked:.0f} s"
                if status == 429:
                    last += " (too many requests: the server limits this client's rate)"
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                reason = getattr(exc, "reason", None) or exc
                last = str(reason) or type(reason).__name__
            wait = next(waits, None)
            if wait is None:
                suffix = f" after {policy.attempts} attempts" if policy.attempts > 1 else ""
                raise ServerUnreachable(f"cannot reach the server at {url}{suffix}: {last}")
            wait = bound.wait(policy.wait_after(wait, asked), policy.timeout_s)
            if wait is None:
                raise ServerUnreachable(self._gave_up(url, tries, bound, last))
            log.warning("%s %s failed (%s); retrying in %.1f s", method, url, last, wait)
            time.sleep(wait)

    @staticmethod
    def _gave_up(url: str, tries: int, bound: Deadline, last: str) -> str:
        attempts = f" after {tries} attempt{'s' if tries != 1 else ''}" if tries else ""
        return f"cannot reach the server at {url}: {bound.describe()} was reached{attempts}: {last}"


def _json(url: str, status: int, data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        raise ProtocolError(f"{url}: the reply (HTTP {status}) is not JSON: "
                            f"{data[:200]!r}") from None


class PilotClient(Transport):
    """PanDA's pilot protocol as pilot 3 speaks it: form POST, ``Accept: application/json``."""

    #: why the last getJob got no job, as the server said (its errorDialog)
    no_job_reason: str = ""

    def post(self, method: str, form: dict[str, Any], policy: RetryPolicy | None = None,
             deadline: float | None = None) -> dict[str, Any]:
        """The reply object of ``/server/panda/<method>``; HTTP 4xx is a ProtocolError.
        ``deadline``: as for ``Transport.request``."""
        path = f"/server/panda/{method}"
        body = urllib.parse.urlencode({k: "" if v is None else v for k, v in form.items()})
        status, data = self.request("POST", path, body.encode(),
                                    "application/x-www-form-urlencoded", policy, deadline)
        if status != 200:
            raise ProtocolError(f"POST {path}: HTTP {status}: {data[:300]!r}")
        reply = _json(self.url + path, status, data)
        if not isinstance(reply, dict):
            raise ProtocolError(f"{method} reply is not a JSON object")
        return reply

    def get_job(self, form: dict[str, Any],
                deadline: float | None = None) -> dict[str, Any] | None:
        """A job dict, or None when the server has no job (StatusCode 20). A "try again"
        (StatusCode 10) is asked again under the retry policy, then is ServerUnreachable;
        ``deadline`` bounds all of it, as for ``Transport.request``."""
        waits = self.retry.waits()
        bound = Deadline(deadline)
        while try_again(code := status_code(reply := self.post("getJob", form,
                                                                deadline=deadline))):
            wait = next(waits, None)
            if wait is None:
                raise ServerUnreachable(f"getJob at {self.url}: the server says try again: "
                                        f"{reply.get('errorDialog', '')}")
            wait = bound.wait(wait, self.retry.timeout_s)
            if wait is None:
                raise ServerUnreachable(f"getJob at {self.url}: the server says try again and "
                                        f"{bound.describe()} is reached: "
                                        f"{reply.get('errorDialog', '')}")
            log.warning("getJob: the server says try again (%s); retrying in %.1f s",
                        reply.get("errorDialog", ""), wait)
            time.sleep(wait)
        if code == 20:
            self.no_job_reason = str(reply.get("errorDialog") or "")
            return None
        if code != 0:
            raise ProtocolError(f"getJob StatusCode {code}: {reply.get('errorDialog', '')}")
        if isinstance(reply.get("jobs"), list):
            return reply["jobs"][0] if reply["jobs"] else None
        return {k: v for k, v in reply.items() if k not in ("StatusCode", "errorDialog")}

    def update_job(self, form: dict[str, Any], policy: RetryPolicy | None = None,
                   deadline: float | None = None) -> dict[str, Any]:
        return self.post("updateJob", form, policy, deadline)

    def queuedata(self, site: str) -> dict[str, Any]:
        path = f"/cache/schedconfig/{urllib.parse.quote(site)}.all.json"
        status, data = self.request("GET", path)
        if status != 200:
            raise ProtocolError(f"GET {path}: HTTP {status}: {data[:300]!r}")
        reply = _json(self.url + path, status, data)
        if not isinstance(reply, dict):
            raise ProtocolError("queuedata is not a JSON object")
        return reply

    def public_key(self) -> str:
        status, data = self.request("GET", "/api/v1/system/get_public_key")
        reply = _json(self.url + "/api/v1/system/get_public_key", status, data)
        if not isinstance(reply, dict) or not reply.get("success") or not reply.get("data"):
            raise ProtocolError(f"get_public_key failed: {str(reply)[:200]}")
        return str(reply["data"])


#: the StatusCode of a transient server-side failure of the pilot protocol (the database lost its
#: connection, a deadlock, a timeout): the caller keeps what it sent and tries again later. Every
#: other non-zero StatusCode is a refusal: asking again gets the same answer (docs/protocol.md).
STATUS_TRY_AGAIN = 10


def try_again(code: Any) -> bool:
    """Is ``code`` (a StatusCode, as a number or its text) "try again later", as opposed to a
    refusal?"""
    return str(code).strip() == str(STATUS_TRY_AGAIN)


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


class ApiClient(Transport):
    """``/api/v1``: typed query parameters on GET, a JSON body on POST.

    One try by default: a person waiting at a prompt wants "is it running?" at once, and a
    daemon (the factory) tries again next cycle."""

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 timeout: float = 30.0, retry: RetryPolicy | None = None, **kw: Any) -> None:
        super().__init__(url or default_url(), token,
                         retry=retry or RetryPolicy(attempts=1, timeout_s=timeout), **kw)
        self.last_message = ""

    def call(self, module: str, method: str, http: str = "GET", **params: Any) -> Any:
        """``data`` of ``/api/v1/<module>/<method>``; Refused when the server said no."""
        path = f"/api/v1/{module}/{method}"
        if http == "GET":
            query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None},
                                           doseq=True)
            status, data = self.request("GET", path + (f"?{query}" if query else ""))
        else:
            status, data = self.request(http, path, json.dumps(params).encode(),
                                        "application/json")
        url = self.url + path
        body = _json(url, status, data)
        if not isinstance(body, dict) or "success" not in body:
            raise ProtocolError(f"{url} answered an unexpected reply: {str(body)[:200]}")
        if not body["success"] or status != 200:
            reason = str(body.get("message") or "no reason given")
            raise Refused(f"{module}/{method} refused (HTTP {status}): {reason}", url=url,
                          http_status=status, reason=reason)
        self.last_message = body.get("message", "")
        return body.get("data")

    # the calls the commands, the factory and the demo make ------------------------------------
    def pilot_files(self) -> dict:
        """``/pilot/``: the one-file pilot's versions (``default``, ``versions``)."""
        status, data = self.request("GET", "/pilot/")
        reply = _json(self.url + "/pilot/", status, data)
        if status != 200 or not isinstance(reply, dict) or not isinstance(reply.get("default"), str):
            raise ProtocolError(f"{self.url}/pilot/: HTTP {status}: no pilot file versions: "
                                f"{data[:200]!r}")
        return reply

    def is_alive(self) -> bool:
        return bool(self.call("system", "is_alive").get("alive"))

    def submit_task(self, params: dict) -> int:
        return int(self.call("task", "submit", "POST", task_parameters=params))

    def task_details(self, task_id: int) -> dict:
        return self.call("task", "get_details", task_id=task_id)

    def kill_jobs(self, job_ids: list[int]) -> list[bool]:
        return self.call("job", "kill", "POST", job_ids=job_ids)

    def set_debug_mode(self, job_id: int, view: str | None) -> dict:
        """Debug mode on with ``view`` (``tail [NAME]``, ``ls``, ``ps``, ``du``), off with None."""
        return self.call("job", "set_debug_mode", "POST", job_id=job_id, mode=view is not None,
                         view=view)

    def debug_view(self, job_id: int) -> dict:
        return self.call("job", "get_debug_view", job_id=job_id)

    def jobs(self, task_id: int) -> list[dict]:
        return self.call("job", "list", task_id=task_id, limit=100000)

    def add_files(self, dataset: str, scope: str, files: list[dict],
                  ddm_endpoint: str | None) -> int:
        return self.call("data", "add_files", "POST", dataset=dataset, scope=scope, files=files,
                         ddm_endpoint=ddm_endpoint)

    def sync_sites(self, configs: list[dict]) -> list[str]:
        return self.call("site", "sync", "POST", sites=configs)

    # the console commands (panda jobs, tasks, job, retry, kill --task) -------------------------
    def list_jobs(self, **filters: Any) -> list[dict]:
        """``job/list``: task_id, site, status (comma list), owner, since (ISO), limit, newest."""
        return self.call("job", "list", **filters)

    def list_tasks(self, owner: str | None = None, limit: int = 100) -> list[dict]:
        return self.call("task", "list", owner=owner, limit=limit)

    def job_details(self, job_id: int) -> dict:
        """One job with its files, its timed state history and its error (``job/get_details``)."""
        return self.call("job", "get_details", job_id=job_id)

    def kill_task(self, task_id: int) -> str:
        """Kill a task's jobs and abort it; the server's message (how many were killed)."""
        self.call("task", "kill", "POST", task_id=task_id)
        return self.last_message

    def task_command(self, command: str, task_id: int, **options: Any) -> str:
        """``task/finish`` (option ``soft``), ``task/pause``, ``task/resume``: PanDA's
        finishTask, pauseTask, resumeTask; the server's message (what it did)."""
        self.call("task", command, "POST", task_id=task_id, **options)
        return self.last_message

    def retry_jobs(self, job_ids: list[int]) -> dict[str, Any]:
        """Per job id: its new attempt's PandaID, or why it was not retried."""
        return self.call("job", "retry", "POST", job_ids=job_ids)

    def retry_task(self, task_id: int) -> str:
        """Run the failed and cancelled jobs of an ended task again (PanDA's retryTask); the
        server's message (how many)."""
        self.call("task", "retry", "POST", task_id=task_id)
        return self.last_message
