"""Users' notifications: a task that asks (``notify``) gets an e-mail through a real SMTP server
(aiosmtpd) and a webhook when it ends, and one per failed job if it asks for job errors; each
message once, whatever the number of passes; webhooks only to allowed hosts; bad ``notify``
fields refused at submission with the reason."""
from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from dbkit import start_server, stop_server
from logic_kit import site
from panda_core.client import ApiClient, Refused
from peers import free_port
from server.notifications import NotifySpecError, notify_spec


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802
        length = int(self.headers.get("Content-Length", 0))
        _Hook.received.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_notify_fields_are_checked():
    assert notify_spec({"email": "alice@example.org"}) == {
        "email": ["alice@example.org"], "webhook": None, "on": ["task_end"]}
    for bad, why in (({"email": "alice@example.org\r\nBcc: x@y.org"}, "not an e-mail"),
                     ({"email": ["a@b.org"] * 6}, "at most 5"),
                     ({"webhook": "file:///etc/passwd"}, "http"),
                     ({"email": "a@b.org", "on": ["sometimes"]}, "task_end, job_error"),
                     ({"emails": "a@b.org"}, "unknown key"), ({}, "give 'email'"),
                     ("a@b.org", "a mapping")):
        with pytest.raises(NotifySpecError, match=why):
            notify_spec(bad)


def test_task_end_and_job_errors_by_mail_and_webhook(tmp_path):
    aiosmtpd = pytest.importorskip("aiosmtpd.controller")
    mails = []

    class Inbox:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802
            mails.append(envelope)
            return "250 OK"

    smtp_port = free_port()
    smtp = aiosmtpd.Controller(Inbox(), hostname="127.0.0.1", port=smtp_port)
    smtp.start()
    _Hook.received = []
    hook = http.server.HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    se = tmp_path / "se"
    se.mkdir()
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "N.yaml").write_text(json.dumps(site("N", "SE_N", f"file://{se}")))
    srv = start_server(tmp_path / "srv", site_dir=sites, extra=[
        "--watcher-interval", "0.2", "--ops-interval", "0.3",
        "--notify-smtp", f"127.0.0.1:{smtp_port}", "--notify-mail-from", "panda@example.org",
        "--notify-webhook-allow", f"127.0.0.1:{hook.server_port}",
        "--monitor-url", "http://monitor.example"])
    try:
        user = ApiClient(srv.url, srv.token("user", "alice"))
        with pytest.raises(Refused, match="notify.email"):
            user.submit_task({"name": "bad", "scope": "s", "transformation": "/bin/true",
                              "n_jobs": 1, "notify": {"email": "not an address"}})
        task_id = user.submit_task({
            "name": "note", "scope": "s", "transformation": "/bin/sh",
            "job_parameters": "-c 'test ${SN} = 000001'", "n_jobs": 2, "max_attempts": 1,
            "site": "N", "resources": {"memory_mb": 500, "walltime_s": 300},
            "notify": {"email": ["alice@example.org"],
                       "webhook": f"http://127.0.0.1:{hook.server_port}/panda",
                       "on": ["task_end", "job_error"]}})
        other = user.submit_task({       # a webhook to a host not on the list is never called
            "name": "elsewhere", "scope": "s", "transformation": "/bin/true", "n_jobs": 1,
            "site": "N", "max_attempts": 1, "resources": {"memory_mb": 500, "walltime_s": 300},
            "notify": {"webhook": "http://127.0.0.1:1/internal"}})
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["PANDA_AUTH_TOKEN"] = srv.token("pilot", "p1", site="N")
        res = subprocess.run([sys.executable, "-m", "panda_wms.cli", "pilot", "--server",
                              srv.url, "--site", "N", "--workdir", str(tmp_path / "wd"),
                              "--monitor-interval", "0.2", "--server-backoff", "0.3",
                              "--public-key", str(srv.public_key_file())],
                             env=env, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stderr[-2000:]
        assert user.task_details(task_id)["status"] == "finished"    # job 2 failed (exit 1)
        deadline = time.monotonic() + 30
        while not (len(mails) >= 2 and len(_Hook.received) >= 2):
            assert time.monotonic() < deadline, (mails, _Hook.received)
            time.sleep(0.2)
        time.sleep(1.0)                              # more passes: nothing is sent twice
        texts = [m.content.decode() for m in mails]
        assert len(mails) == 2 and all(m.rcpt_tos == ["alice@example.org"] for m in mails)
        assert all(m.mail_from == "panda@example.org" for m in mails)
        assert any(f"task {task_id} note: finished" in t for t in texts)
        assert any("failed" in t and "job_error" in t for t in texts)
        events = sorted(h["event"] for h in _Hook.received)
        assert events == ["job_error", "task_end"], _Hook.received
        end = next(h for h in _Hook.received if h["event"] == "task_end")
        assert end["link"] == f"http://monitor.example/monitor/tasks/{task_id}"
        assert end["jobs"] == {"finished": 1, "failed": 1}
        assert user.task_details(other)["status"] == "done"
        assert all(h.get("task_id") != other for h in _Hook.received)
    finally:
        stop_server(srv)
        smtp.stop()
        hook.shutdown()
