"""Telling people about alarms: an email (``server.mail.send_mail``) and a webhook (a JSON
POST), once per alarm. Alarms are claimed before they are sent (``Alarms.claim_unnotified``),
so several server processes never send the same one twice; a failed send is retried on the
next pass."""
from __future__ import annotations

import json
import logging
import urllib.request
from dataclasses import dataclass

from ..handlers import dumps
from ..mail import MailError, SmtpServer, send_mail
from .alarms import Alarms

log = logging.getLogger(__name__)


@dataclass
class NotifyConfig:
    smtp: SmtpServer | None = None
    mail_from: str = "panda-monitor@localhost"
    mail_to: tuple[str, ...] = ()
    webhook_url: str | None = None
    monitor_url: str | None = None       # the monitor's base URL, for links in the messages
    timeout_s: float = 10.0              # the webhook's (the SMTP server has its own)

    @property
    def enabled(self) -> bool:
        return bool((self.smtp and self.mail_to) or self.webhook_url)


class Notifier:
    def __init__(self, config: NotifyConfig):
        self.config = config

    def link(self, alarm: dict) -> str | None:
        base = self.config.monitor_url
        return f"{base.rstrip('/')}/monitor/alarms?alarm={alarm['alarm_id']}" if base else None

    def email(self, alarm: dict) -> None:
        cfg = self.config
        lines = [alarm["title"], "", alarm.get("message") or "",
                 "", f"key: {alarm['key']}", f"site: {alarm.get('site') or '-'}",
                 f"raised: {alarm['first_raised']:%Y-%m-%d %H:%M:%S} UTC by "
                 f"{alarm.get('raised_by') or alarm['source']}"]
        if self.link(alarm):
            lines += ["", f"acknowledge: {self.link(alarm)}"]
        send_mail(cfg.smtp, sender=cfg.mail_from, to=cfg.mail_to,
                  subject=f"[panda {alarm['severity']}] {alarm['title']}", text="\n".join(lines))

    def webhook(self, alarm: dict) -> None:
        body = dumps({"alarm": {k: alarm[k] for k in (
            "alarm_id", "key", "source", "severity", "title", "message", "site", "state",
            "first_raised", "last_raised", "count")}, "link": self.link(alarm)}).encode()
        req = urllib.request.Request(self.config.webhook_url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.config.timeout_s) as resp:  # noqa: S310
            if resp.status >= 300:
                raise OSError(f"webhook answered HTTP {resp.status}")

    def send(self, alarm: dict) -> list[str]:
        """Send ``alarm`` every configured way; the failures' texts."""
        errors = []
        if self.config.smtp and self.config.mail_to:
            try:
                self.email(alarm)
            except MailError as exc:
                errors.append(f"email: {exc}")
        if self.config.webhook_url:
            try:
                self.webhook(alarm)
            except (OSError, ValueError, json.JSONDecodeError) as exc:
                errors.append(f"webhook: {exc}")
        return errors


def notify_pending(alarms: Alarms, notifier: Notifier) -> int:
    """Send every active alarm not yet notified; returns how many went out."""
    if not notifier.config.enabled:
        return 0
    sent = 0
    for alarm in alarms.claim_unnotified():
        errors = notifier.send(alarm)
        if errors:
            alarms.unclaim(alarm["alarm_id"])
            log.warning("alarm %s: notification failed (%s); will retry", alarm["key"],
                        "; ".join(errors))
        else:
            sent += 1
    return sent
