"""``server.mail``: the one SMTP client (alarms and task notices both send through it), against
a real SMTP server (aiosmtpd) on 127.0.0.1."""
from __future__ import annotations

import ssl

import pytest

from peers import free_port, make_test_ca
from server.mail import MailError, SmtpServer, send_mail

aiosmtpd = pytest.importorskip("aiosmtpd.controller")


class _Inbox:
    def __init__(self) -> None:
        self.mails = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
        self.mails.append(envelope)
        return "250 OK"


@pytest.fixture
def inbox():
    box = _Inbox()
    port = free_port()
    ctl = aiosmtpd.Controller(box, hostname="127.0.0.1", port=port)
    ctl.start()
    yield SmtpServer("127.0.0.1", port, timeout_s=5), box
    ctl.stop()


def test_a_message_goes_out_with_its_subject_on_one_line(inbox):
    smtp, box = inbox
    send_mail(smtp, sender="panda@example.org", to=["a@example.org", "b@example.org"],
              subject="[panda critical] site X\r\nBcc: eve@example.org down", text="body\n")
    (mail,) = box.mails
    assert mail.mail_from == "panda@example.org"
    assert mail.rcpt_tos == ["a@example.org", "b@example.org"]      # no Bcc smuggled in
    content = mail.content.decode()
    assert "Subject: [panda critical] site X Bcc: eve@example.org down\r\n" in content
    assert "\r\nBcc:" not in content and "body" in content


def test_every_failure_is_one_mail_error_that_says_why(inbox):
    smtp, box = inbox
    with pytest.raises(MailError, match="no recipient"):
        send_mail(smtp, sender="p@x.org", to=[], subject="s", text="t")
    with pytest.raises(MailError, match="ValueError"):              # a header that is not one
        send_mail(smtp, sender="p@x.org", to=["a@x.org\nBcc: e@x.org"], subject="s", text="t")
    with pytest.raises(MailError, match="ConnectionRefused"):
        send_mail(SmtpServer("127.0.0.1", free_port(), timeout_s=2), sender="p@x.org",
                  to=["a@x.org"], subject="s", text="t")
    assert box.mails == []


def test_starttls_checks_the_servers_certificate(tmp_path):
    """smtplib's own STARTTLS default accepts any certificate; ours verifies it."""
    ca = make_test_ca(tmp_path)                 # a CA this host does not trust
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(ca.cert, ca.key)
    box, port = _Inbox(), free_port()
    ctl = aiosmtpd.Controller(box, hostname="127.0.0.1", port=port, tls_context=ctx)
    ctl.start()
    try:
        with pytest.raises(MailError, match="CERTIFICATE_VERIFY_FAILED"):
            send_mail(SmtpServer("127.0.0.1", port, timeout_s=5, starttls=True),
                      sender="p@x.org", to=["a@x.org"], subject="s", text="t")
        assert box.mails == []
    finally:
        ctl.stop()


@pytest.mark.parametrize("value,host,port", [
    ("mail.example.org", "mail.example.org", 25), ("127.0.0.1:2525", "127.0.0.1", 2525),
    ("[::1]:587", "::1", 587), ("[::1]", "::1", 25)])
def test_an_smtp_server_is_host_and_port(value, host, port):
    assert SmtpServer.parse(value) == SmtpServer(host, port)


@pytest.mark.parametrize("value,why", [
    ("mail:smtp", "the port a number"), ("mail:99999", "1..65535"), ("mail:0", "1..65535"),
    (":25", "expected HOST"), ("", "expected HOST"), ("a b:25", "expected HOST"),
    ("mail:-1", "the port a number"), ("[::1", r"\[IPv6\]"), ("[::1]25", r"\[IPv6\]")])
def test_a_bad_smtp_server_is_refused_naming_the_option(value, why):
    with pytest.raises(ValueError, match=f"--alarm-smtp.*{why}"):
        SmtpServer.parse(value, "--alarm-smtp")
