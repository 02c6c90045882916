"""Sending mail: the server's one SMTP client, for alarms to shifters (``monitor/notify.py``)
and tasks' notices to their users (``notifications.py``).

One place for what every message needs: a subject folded onto one line (a title with a newline
in it must neither break the header nor fail the send for ever), STARTTLS that verifies the
server's certificate (smtplib's own default does not), a login when one is configured, and one
failure type, :class:`MailError`, whose text says what went wrong, for the callers' retry logs.
"""
from __future__ import annotations

import smtplib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage


class MailError(Exception):
    """A message the SMTP server did not take (unreachable, refused, a bad address)."""


@dataclass(frozen=True)
class SmtpServer:
    """Where mail goes: ``panda server --alarm-smtp / --notify-smtp HOST[:PORT]``."""
    host: str
    port: int = 25
    timeout_s: float = 10.0
    starttls: bool = False
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, value: str, option: str = "--smtp") -> "SmtpServer":
        """``HOST[:PORT]`` (``[v6]:PORT`` for an IPv6 address); ValueError naming ``option``
        and what is wrong."""
        text = value.strip()
        if text.startswith("["):
            host, bracket, rest = text[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError(f"{option} {value!r}: expected [IPv6]:PORT")
            port_text = rest[1:]
        else:
            host, _, port_text = text.partition(":")
        if not host or any(c.isspace() for c in host) or (port_text and not port_text.isdigit()):
            raise ValueError(f"{option} {value!r}: expected HOST[:PORT], the port a number")
        port = int(port_text) if port_text else 25
        if not 0 < port < 65536:
            raise ValueError(f"{option} {value!r}: the port must be 1..65535")
        return cls(host, port)


def send_mail(server: SmtpServer, *, sender: str, to: Sequence[str], subject: str,
              text: str) -> None:
    """Hand one plain-text message to ``server``; MailError if it was not taken."""
    if not to:
        raise MailError("no recipient")
    try:
        msg = EmailMessage()
        msg["Subject"] = " ".join(subject.split())
        msg["From"] = sender
        msg["To"] = ", ".join(to)
        msg.set_content(text)
        with smtplib.SMTP(server.host, server.port, timeout=server.timeout_s) as smtp:
            if server.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if server.user:
                smtp.login(server.user, server.password or "")
            smtp.send_message(msg)
    except (OSError, smtplib.SMTPException, ValueError) as exc:
        raise MailError(f"{type(exc).__name__}: {exc}") from None
