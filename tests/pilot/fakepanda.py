"""A small, faithful fake of PanDA's dispatcher for the pilot's tests (127.0.0.1 only).

It speaks the protocol the real server speaks (docs/pilot.md lists what it does not cover): form
POSTs to /server/panda/getJob and updateJob with JSON replies, StatusCode 20 when it has no job,
``tobekilled`` for unknown jobs, Ed25519-signed specs over the canonical JSON bound to the
dispatch (site, pilotID, pilotNonce), the public key at /api/v1/system/get_public_key (and in
``key_file``, for the pilot to pin), signed queuedata at /cache/schedconfig/<site>.all.json,
bearer-token checks. Tests script it: queue jobs, order commands, tamper with a spec, stop it and start it
again on the same port, and read every request it saw.
"""
from __future__ import annotations

import base64
import json
import os
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from panda_core.canonical import QUEUEDATA_SIGNATURE_KEY, queuedata_signed_bytes, signed_bytes
from panda_core.wire import DISPATCH_KEY, Dispatch
from testkit import free_port


class FakePanda:
    def __init__(self, site_config: dict, token: str | None = None) -> None:
        self.site_config = site_config
        self.token = token
        self.key = Ed25519PrivateKey.generate()
        self.pem = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        fd, self.key_file = tempfile.mkstemp(prefix="fakepanda-", suffix=".pem")
        with os.fdopen(fd, "w") as f:
            f.write(self.pem)
        self.jobs: list[dict] = []
        self.tamper: dict = {}                     # PandaID -> fields changed after signing
        self.commands: dict[str, str] = {}         # PandaID -> command for its next updates
        self.debug_views: dict[str, str] = {}      # PandaID -> debugView sent with "debug"
        self.requests: list[tuple[str, str, dict]] = []   # (method, path, form)
        self.known: set[str] = set()
        self.lock = threading.Lock()
        self.port = free_port()
        self.httpd: ThreadingHTTPServer | None = None
        self.unauthorized = 0
        self.garbage: str | None = None            # a getJob reply body that is not JSON

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- control ----------------------------------------------------------------------------
    def add_job(self, job: dict) -> None:
        self.jobs.append(job)

    def start(self) -> "FakePanda":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self, obj: Any, status: int = 200) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if fake.token is None:
                    return True
                if self.headers.get("Authorization") == f"Bearer {fake.token}":
                    return True
                fake.unauthorized += 1
                self._reply({"StatusCode": 50, "errorDialog": "invalid token"}, 403)
                return False

            def do_GET(self):
                path = urllib.parse.urlsplit(self.path).path
                with fake.lock:
                    fake.requests.append(("GET", path, {}))
                if path == "/api/v1/system/get_public_key":
                    return self._reply({"success": True, "message": "", "data": fake.pem})
                prefix = "/cache/schedconfig/"
                if path.startswith(prefix) and path.endswith(".json"):
                    site = path[len(prefix):-len(".json")].removesuffix(".all")
                    if site != fake.site_config["name"]:
                        return self._reply({"error": "unknown site"}, 404)
                    config = fake.site_config
                    sig = fake.key.sign(queuedata_signed_bytes(site, config))
                    return self._reply({"name": site, "panda_wms": config,
                                        "maxrss": config.get("resources", {}).get("memory_mb", 0),
                                        QUEUEDATA_SIGNATURE_KEY: base64.b64encode(sig).decode()})
                self._reply({"error": "not found"}, 404)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode()
                form = dict(urllib.parse.parse_qsl(body, keep_blank_values=True))
                path = urllib.parse.urlsplit(self.path).path
                with fake.lock:
                    fake.requests.append(("POST", path, form))
                if "application/json" not in (self.headers.get("Accept") or ""):
                    return self._reply({"StatusCode": 30, "errorDialog": "JSON only here"}, 400)
                if not self._authorized():
                    return
                if path == "/server/panda/getJob":
                    if fake.garbage is not None:
                        data = fake.garbage.encode()
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                        return
                    return self._reply(fake.get_job(form))
                if path == "/server/panda/updateJob":
                    return self._reply(fake.update_job(form))
                self._reply({"StatusCode": 30, "errorDialog": "unknown method"}, 404)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    # --- protocol -----------------------------------------------------------------------------
    def get_job(self, form: dict) -> dict:
        if form.get("siteName") != self.site_config["name"]:
            return {"StatusCode": 30, "errorDialog": "unknown site"}
        with self.lock:
            remaining = form.get("remainingWalltime")
            for i, job in enumerate(self.jobs):
                if remaining and int(job.get("maxWalltime") or 0) > int(remaining) \
                        and not job.get("_ignore_walltime"):
                    continue
                self.jobs.pop(i)
                break
            else:
                return {"StatusCode": 20, "errorDialog": "no jobs"}
        job = {k: v for k, v in job.items() if not k.startswith("_")}
        job[DISPATCH_KEY] = Dispatch(form["siteName"], form.get("pilotID", ""),
                                     form.get("pilotNonce", ""), int(time.time())).to_wire()
        job["specSignature"] = base64.b64encode(self.key.sign(signed_bytes(job))).decode()
        job.update(self.tamper.get(job["PandaID"], {}))
        self.known.add(str(job["PandaID"]))
        return {"StatusCode": 0, **job}

    def update_job(self, form: dict) -> dict:
        job_id = form.get("jobId", "")
        if job_id not in self.known:
            return {"StatusCode": 0, "command": "tobekilled"}
        reply = {"StatusCode": 0, "command": self.commands.get(job_id, "NULL")}
        if reply["command"] == "debug" and job_id in self.debug_views:
            reply["debugView"] = self.debug_views[job_id]
        return reply

    # --- what the tests read -----------------------------------------------------------------
    def updates(self, job_id: int | str | None = None) -> list[dict]:
        with self.lock:
            return [f for m, p, f in self.requests if p == "/server/panda/updateJob"
                    and (job_id is None or f.get("jobId") == str(job_id))]

    def final(self, job_id: int | str) -> dict | None:
        finals = [u for u in self.updates(job_id) if u.get("state") in ("finished", "failed")]
        return finals[-1] if finals else None

    def wait_for(self, pred, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.05)
        raise TimeoutError("condition not met in time; requests seen: "
                           f"{[(m, p, f.get('state')) for m, p, f in self.requests]}")
