"""Telling users what their tasks did: an email (``server.mail.send_mail``) and/or a
webhook (a JSON POST) when a task ends and, if asked for, when one of its jobs fails.

A task asks in its description (docs/contracts.md)::

    notify: {email: [alice@example.org], webhook: https://hooks.example.org/panda,
             on: [task_end, job_error]}

Each pass (the first server process, with the monitor's operations) looks at the tasks that ended
and the jobs that failed in the last ``window_s``, writes one row per message into
``notifications`` under a unique event key (so several processes, and later passes, never send a
message twice), then claims the pending rows one by one and sends them; a failed send is retried
on later passes, up to ``max_attempts``.

Webhooks go only to hosts on the server's allow list (``panda server --notify-webhook-allow
HOST[:PORT]``): a user's URL must not make the server reach into its own network. Addresses are
checked at submission (``notify_spec``); a header cannot be injected through them.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import re
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from panda_core.states import TaskState

from . import db
from .mail import MailError, SmtpServer, send_mail

log = logging.getLogger(__name__)

EVENTS = ("task_end", "job_error")
ENDED = (str(TaskState.DONE), str(TaskState.FINISHED), str(TaskState.FAILED),
         str(TaskState.ABORTED))
_ADDRESS = re.compile(r"[A-Za-z0-9._%+'-]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}")
MAX_TARGETS = 5


class NotifySpecError(ValueError):
    """A task's ``notify`` that cannot be honoured; the message says why."""


def notify_spec(value) -> dict | None:
    """The normalised ``notify`` of a task description: {email: [...], webhook: url|None,
    on: [...]}; NotifySpecError names what is wrong."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise NotifySpecError("field 'notify': a mapping with 'email', 'webhook' and 'on'")
    unknown = sorted(set(value) - {"email", "webhook", "on"})
    if unknown:
        raise NotifySpecError(f"field 'notify': unknown key(s) {', '.join(unknown)} "
                              "(known: email, webhook, on)")
    emails = value.get("email") or []
    if isinstance(emails, str):
        emails = [emails]
    if not isinstance(emails, list) or not all(isinstance(e, str) for e in emails):
        raise NotifySpecError("field 'notify.email': an address or a list of addresses")
    if len(emails) > MAX_TARGETS:
        raise NotifySpecError(f"field 'notify.email': at most {MAX_TARGETS} addresses")
    for e in emails:
        if not _ADDRESS.fullmatch(e):
            raise NotifySpecError(f"field 'notify.email': {e[:80]!r} is not an e-mail address")
    webhook = value.get("webhook")
    if webhook is not None:
        parts = urlsplit(webhook) if isinstance(webhook, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname \
                or len(webhook) > 500 or any(c in webhook for c in "\r\n\0 "):
            raise NotifySpecError("field 'notify.webhook': an http(s) URL of at most 500 "
                                  "characters")
    on = value.get("on", ["task_end"])
    if isinstance(on, str):
        on = [on]
    if not isinstance(on, list) or not on or any(o not in EVENTS for o in on):
        raise NotifySpecError(f"field 'notify.on': a list of {', '.join(EVENTS)}")
    if not emails and webhook is None:
        raise NotifySpecError("field 'notify': give 'email' or 'webhook' (or both)")
    return {"email": emails, "webhook": webhook, "on": sorted(set(on))}


@dataclass
class NotificationConfig:
    smtp: SmtpServer | None = None
    mail_from: str = "panda@localhost"
    webhook_allow: tuple[str, ...] = ()      # "host:port" entries (default ports implied)
    monitor_url: str | None = None
    window_s: float = 3600.0
    max_attempts: int = 5
    timeout_s: float = 10.0                  # the webhook's (the SMTP server has its own)

    def webhook_allowed(self, url: str) -> str | None:
        """None if ``url`` may be called, else why not."""
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if f"{parts.hostname}:{port}" in self.webhook_allow or parts.hostname in \
                self.webhook_allow:
            return None
        return (f"webhook host {parts.hostname}:{port} is not on this server's allow list "
                "(panda server --notify-webhook-allow)")


class Notifications:
    def __init__(self, tb, config: NotificationConfig):
        self.tb = tb
        self.config = config

    # -- what is to be said ----------------------------------------------------------------
    def collect(self) -> int:
        """Rows for the events of the last window that asked for a message; returns how many
        new ones were written."""
        now = self.tb.clock()
        since = now - dt.timedelta(seconds=self.config.window_s)
        t, j = db.tasks.c, db.jobs.c
        with db.read(self.tb.engine) as conn:
            tasks = conn.execute(select(t.task_id, t.name, t.status, t.owner, t.params)
                                 .where(t.modified >= since, t.status.in_(ENDED))).all()
            failed = conn.execute(
                select(j.panda_id, j.task_id, j.site, j.attempt_nr, j.pilot_error_code,
                       j.pilot_error_diag, j.exe_error_code, j.dispatcher_error_code,
                       j.dispatcher_error_diag, j.ddm_error_code, j.ddm_error_diag)
                .where(j.status == "failed", j.state_changed >= since)).all()
            asked = {r.task_id: r for r in tasks if (r.params or {}).get("notify")}
            job_tasks = {r.task_id for r in failed} - set(asked)
            if job_tasks:
                for r in conn.execute(select(t.task_id, t.name, t.status, t.owner, t.params)
                                      .where(t.task_id.in_(sorted(job_tasks)))):
                    if (r.params or {}).get("notify"):
                        asked[r.task_id] = r
        new = 0
        for r in tasks:
            spec = _spec(asked.get(r.task_id))
            if spec and "task_end" in spec["on"]:
                counts = self.tb.tasks.job_counts(r.task_id)
                subject = f"[panda] task {r.task_id} {r.name}: {r.status}"
                body = {"event": "task_end", "task_id": r.task_id, "name": r.name,
                        "status": r.status, "owner": r.owner, "jobs": counts,
                        "link": self._link(f"/monitor/tasks/{r.task_id}")}
                new += self._queue(f"task:{r.task_id}:end", r.task_id, None, "task_end", spec,
                                   subject, body)
        for f in failed:
            spec = _spec(asked.get(f.task_id))
            if spec and "job_error" in spec["on"]:
                task = asked[f.task_id]
                codes = {k: v for k, v in (("pilot", f.pilot_error_code),
                                           ("exe", f.exe_error_code),
                                           ("dispatcher", f.dispatcher_error_code),
                                           ("ddm", f.ddm_error_code)) if v}
                diag = f.pilot_error_diag or f.dispatcher_error_diag or f.ddm_error_diag or ""
                subject = f"[panda] job {f.panda_id} of task {f.task_id} {task.name} failed"
                body = {"event": "job_error", "task_id": f.task_id, "panda_id": f.panda_id,
                        "site": f.site, "attempt": f.attempt_nr, "error_codes": codes,
                        "diag": diag[:2000], "link": self._link(f"/monitor/jobs/{f.panda_id}")}
                new += self._queue(f"job:{f.panda_id}:error", f.task_id, f.panda_id,
                                   "job_error", spec, subject, body)
        return new

    def _link(self, path: str) -> str | None:
        base = self.config.monitor_url
        return base.rstrip("/") + path if base else None

    def _queue(self, key: str, task_id: int, panda_id: int | None, kind: str, spec: dict,
               subject: str, body: dict) -> int:
        targets = [("email", e) for e in spec["email"]]
        if spec.get("webhook"):
            targets.append(("webhook", spec["webhook"]))
        new = 0
        now = self.tb.clock()
        for channel, target in targets:
            try:
                with self.tb.engine.begin() as conn:
                    conn.execute(insert(db.notifications).values(
                        event_key=f"{key}:{channel}:{target}"[:255], task_id=task_id,
                        panda_id=panda_id, kind=kind, channel=channel, target=target,
                        subject=subject[:512], body=json.dumps(body, default=str),
                        state="pending", attempts=0, created=now))
                new += 1
            except IntegrityError:
                pass                       # written before (another process, another pass)
        return new

    # -- saying it -------------------------------------------------------------------------
    def deliver(self) -> int:
        """Send every pending message this process can claim; returns how many went out."""
        n = db.notifications.c
        with db.read(self.tb.engine) as conn:
            pending = conn.execute(select(db.notifications).where(n.state == "pending")
                                   .order_by(n.notification_id).limit(200)).all()
        sent = 0
        for row in pending:
            with self.tb.engine.begin() as conn:
                claimed = conn.execute(update(db.notifications).where(
                    n.notification_id == row.notification_id, n.state == "pending")
                    .values(state="sending", attempts=row.attempts + 1)).rowcount
            if not claimed:
                continue                   # another process has it
            refused = self.config.webhook_allowed(row.target) if row.channel == "webhook" \
                else None
            error = refused or self._send(row)
            if error is None:
                state, sent = "sent", sent + 1
            else:
                state = "failed" if refused or row.attempts + 1 >= self.config.max_attempts \
                    else "pending"
                log.warning("notification %s to %s: %s%s", row.event_key, row.target, error,
                            "" if state == "pending" else " (giving up)")
            with self.tb.engine.begin() as conn:
                conn.execute(update(db.notifications).where(
                    n.notification_id == row.notification_id).values(
                    state=state, last_error=error, sent=self.tb.clock() if error is None
                    else None))
        return sent

    def _send(self, row) -> str | None:
        body = json.loads(row.body)
        try:
            if row.channel == "email":
                if not self.config.smtp:
                    return "no SMTP server configured (panda server --notify-smtp)"
                send_mail(self.config.smtp, sender=self.config.mail_from, to=[row.target],
                          subject=row.subject, text=_text(body))
            else:
                req = urllib.request.Request(row.target, data=row.body.encode(), method="POST",
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=self.config.timeout_s) as resp:  # noqa: S310
                    if resp.status >= 300:
                        return f"webhook answered HTTP {resp.status}"
        except MailError as exc:
            return str(exc)
        except (OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def process(self) -> int:
        self.collect()
        return self.deliver()


def _spec(task) -> dict | None:
    if task is None:
        return None
    try:
        return notify_spec((task.params or {}).get("notify"))
    except NotifySpecError:
        return None


def _text(body: dict) -> str:
    lines = [f"{k}: {v}" for k, v in body.items() if k not in ("link",) and v not in (None, "")]
    if body.get("link"):
        lines += ["", body["link"]]
    return "\n".join(lines) + "\n"
