"""A small client for the server's ``/api/v1`` (what ``panda submit/status/kill`` and the
factory and demo use). Every failure is a ClientError whose message names the URL tried."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:25080"


class ClientError(RuntimeError):
    """The server could not be reached, refused the call, or answered success=false."""


def default_url() -> str:
    return os.environ.get("PANDA_URL") or DEFAULT_URL


def load_token(token_file: str | None = None) -> str | None:
    """The bearer token: --token-file, else $PANDA_AUTH_TOKEN, else ~/.panda/token."""
    if token_file:
        try:
            return Path(token_file).read_text().strip()
        except OSError as exc:
            raise ClientError(f"cannot read token file {token_file}: {exc.strerror}") from None
    if os.environ.get("PANDA_AUTH_TOKEN"):
        return os.environ["PANDA_AUTH_TOKEN"].strip()
    default = Path(os.environ.get("PANDA_HOME", Path.home() / ".panda")) / "token"
    return default.read_text().strip() if default.is_file() else None


class PandaClient:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0):
        import requests

        self.url = (url or default_url()).rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Accept"] = "application/json"
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def call(self, module: str, method: str, http: str = "GET", **params: Any) -> Any:
        """Call ``/api/v1/<module>/<method>``; return ``data`` or raise ClientError."""
        import requests

        url = f"{self.url}/api/v1/{module}/{method}"
        try:
            if http == "GET":
                resp = self.session.get(url, params=params, timeout=self.timeout)
            else:
                resp = self.session.post(url, data=json.dumps(params), timeout=self.timeout,
                                         headers={"Content-Type": "application/json"})
        except requests.ConnectionError:
            raise ClientError(f"cannot reach the PanDA server at {self.url} "
                              f"(tried {url}): is it running?") from None
        except requests.Timeout:
            raise ClientError(f"the PanDA server at {self.url} did not answer {url} within "
                              f"{self.timeout:.0f} s") from None
        try:
            body = resp.json()
        except ValueError:
            raise ClientError(f"{url} answered HTTP {resp.status_code} with a non-JSON body: "
                              f"{resp.text[:200]!r}") from None
        if not isinstance(body, dict) or "success" not in body:
            raise ClientError(f"{url} answered an unexpected reply: {str(body)[:200]}")
        if not body["success"]:
            raise ClientError(f"{module}/{method} refused: {body.get('message') or 'no reason'}")
        self.last_message = body.get("message", "")
        return body.get("data")

    # convenience wrappers -------------------------------------------------------------------
    def is_alive(self) -> bool:
        return bool(self.call("system", "is_alive").get("alive"))

    def submit_task(self, params: dict) -> int:
        return int(self.call("task", "submit", "POST", task_parameters=params))

    def task_details(self, task_id: int) -> dict:
        return self.call("task", "get_details", task_id=task_id)

    def kill_jobs(self, job_ids: list[int]) -> list[bool]:
        return self.call("job", "kill", "POST", job_ids=job_ids)

    def jobs(self, task_id: int) -> list[dict]:
        return self.call("job", "list", task_id=task_id, limit=100000)

    def add_files(self, dataset: str, scope: str, files: list[dict],
                  ddm_endpoint: str | None) -> int:
        return self.call("data", "add_files", "POST", dataset=dataset, scope=scope, files=files,
                         ddm_endpoint=ddm_endpoint)

    def sync_sites(self, configs: list[dict]) -> list[str]:
        return self.call("site", "sync", "POST", sites=configs)
