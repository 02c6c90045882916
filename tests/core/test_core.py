"""The ground package on its own: the wire format both ways, canonical bytes, the retry policy,
the site-config dataclasses and the protocol client against a tiny HTTP server."""
from __future__ import annotations

import http.server
import json
import threading
import time
from email.utils import formatdate

import pytest

from panda_core.canonical import SIGNATURE_KEY, signed_bytes
from panda_core.client import (MAX_REPLY_BYTES, ApiClient, ClientError, PilotClient,
                               ProtocolError, Refused, ServerUnreachable, retry_after_s,
                               try_again)
from panda_core.errorcodes import CodedError, ErrorCode
from panda_core.replicas import replica_url
from panda_core.retry import Deadline, RetryPolicy
from panda_core.siteconfig import SiteConfig, SiteConfigError
from panda_core.trust import key_fingerprint, normalise_fingerprint
from panda_core.wire import DISPATCH_KEY, NULL, Dispatch, WireError, decode_job, encode_job

# ------------------------------------------------------------------------- the wire format


def _row(**over) -> dict:
    """A server job row as the dispatcher hands it to the encoder."""
    files = [
        {"type": "input", "lfn": "in.1", "scope": "alice", "guid": "g1", "fsize": 11,
         "checksum": "ad:0000abcd", "dataset": "alice.in"},
        {"type": "input", "lfn": "in.2", "scope": "bob", "guid": "g2", "fsize": 22,
         "checksum": "md5:" + "0" * 32, "dataset": "bob.in"},
        {"type": "output", "lfn": "out.1", "scope": "alice", "guid": "go", "fsize": None,
         "checksum": None, "dataset": "alice.out"},
        {"type": "log", "lfn": "log.1.tgz", "scope": "alice", "guid": "gl", "fsize": None,
         "checksum": None, "dataset": "alice.out"},
    ]
    row = {"panda_id": 42, "task_id": 7, "serial": 3, "attempt_nr": 2,
           "prod_source_label": "user", "owner": "alice", "transformation": "/bin/sh",
           "job_pars": "-c 'echo hi'", "walltime_s": 600, "memory_mb": 1000, "disk_mb": 200,
           "cores": 4, "current_priority": 900, "transfer_type": "direct", "files": files}
    row.update(over)
    return row


def test_what_the_server_encodes_the_pilot_decodes():
    raw = encode_job(_row(), "SE_IN", "SE_OUT")
    job = decode_job(json.loads(json.dumps(raw)))      # through JSON, as on the wire
    assert (job.panda_id, job.attempt_nr, job.core_count) == (42, 2, 4)
    assert (job.max_walltime_s, job.max_rss_mb, job.max_disk_mb) == (600, 1000, 200)
    assert [(f.lfn, f.scope, f.guid, f.fsize, f.checksum, f.dataset, f.ddm_endpoint)
            for f in job.inputs] == [
        ("in.1", "alice", "g1", 11, "ad:0000abcd", "alice.in", "SE_IN"),
        ("in.2", "bob", "g2", 22, "md5:" + "0" * 32, "bob.in", "SE_IN")]
    assert job.inputs[0].adler32 == "0000abcd" and job.inputs[1].md5 == "0" * 32
    assert [(f.lfn, f.scope, f.ddm_endpoint) for f in job.outputs] == [
        ("out.1", "alice", "SE_OUT")]
    assert (job.log.lfn, job.log.scope, job.log.guid) == ("log.1.tgz", "alice", "gl")
    assert job.direct_read and job.transformation == "/bin/sh"
    assert raw["outFiles"] == "out.1,log.1.tgz" and raw["destinationSE"] == "SE_OUT"


def test_a_job_without_files_or_log_encodes_nulls_and_decodes_empty():
    raw = encode_job(_row(files=[], transfer_type=None), "SE", "SE")
    assert raw["inFiles"] == "" and raw["logFile"] == NULL and raw["transferType"] == NULL
    job = decode_job(raw)
    assert job.inputs == [] and job.outputs == [] and job.log is None and not job.direct_read


@pytest.mark.parametrize("key,value,code", [
    ("inFiles", "../x", ErrorCode.HOSTILE_FILE_NAME),
    ("scopeIn", "a/b,a/b", ErrorCode.HOSTILE_FILE_NAME),
    ("fsize", "big,1", ErrorCode.BAD_JOB_SPEC),
    ("PandaID", "nan-ish", ErrorCode.BAD_JOB_SPEC),
    ("transformation", NULL, ErrorCode.BAD_JOB_SPEC),
    ("outFiles", "in.1,log.1.tgz", ErrorCode.BAD_JOB_SPEC),    # an output named like an input
])
def test_the_decoder_refuses_with_a_code(key, value, code):
    raw = encode_job(_row(), "SE", "SE")
    raw[key] = value
    with pytest.raises(WireError) as err:
        decode_job(raw)
    assert err.value.code == code and isinstance(err.value, CodedError)


def test_the_decoder_refuses_what_is_not_a_job():
    for raw in (None, [], "PandaID", {}):
        with pytest.raises(WireError):
            decode_job(raw)


def test_signed_bytes_leave_out_the_signature_and_ignore_key_order():
    a = {"b": 1, "a": [1, "é"], SIGNATURE_KEY: "sig"}
    b = {"a": [1, "é"], "b": 1}
    assert signed_bytes(a) == signed_bytes(b) == b'{"a":[1,"\\u00e9"],"b":1}'


# ------------------------------------------------------------------------- retries


def test_retry_waits_grow_to_the_cap_and_are_jittered():
    policy = RetryPolicy(attempts=6, backoff_s=1, max_backoff_s=4, jitter=0.5)
    assert list(policy.waits(rand=lambda: 0.0)) == [1, 2, 4, 4, 4]
    assert list(policy.waits(rand=lambda: 1.0)) == [1.5, 3, 6, 6, 6]
    spread = {round(w, 6) for w in RetryPolicy(attempts=50).waits()}
    assert len(spread) > 10, "waits of many clients must not coincide"
    assert list(RetryPolicy(attempts=1).waits()) == []


# ------------------------------------------------------------------------- site configs


def test_site_config_from_a_partial_dict_gets_the_defaults():
    site = SiteConfig.from_dict({"name": "S", "storage": {"input": {"name": "SE",
                                                                    "url": "file:///se"}}})
    assert site.storage.input.url == "file:///se" and site.storage.output.url == ""
    assert site.copytools.input.name == "cp" and site.limits.heartbeat_s == 1800
    assert SiteConfig.from_dict(site.to_dict()) == site


@pytest.mark.parametrize("data,where", [
    ({}, "name: missing"),
    ({"name": 3}, "name: expected a string"),
    ({"name": "S", "resources": []}, "resources: expected a mapping"),
    ({"name": "S", "limits": {"looping_s": "soon"}}, "limits.looping_s: expected a number"),
    ({"name": "S", "limits": {"looping_s": True}}, "limits.looping_s: expected a number"),
    ({"name": "S", "direct_read": "yes"}, "direct_read: expected true or false"),
    ({"name": "S", "copytools": {"input": {"options": "x"}}}, "copytools.input.options"),
    ("S", "(site): expected a mapping"),
])
def test_site_config_names_the_key_of_a_bad_value(data, where):
    with pytest.raises(SiteConfigError, match=where.replace("(", r"\(").replace(")", r"\)")):
        SiteConfig.from_dict(data)


# ------------------------------------------------------------------------- the client


class _Peer(http.server.BaseHTTPRequestHandler):
    """Answers whatever the test put in ``replies`` (status, body bytes[, extra headers]),
    records requests and when they came (``times``, monotonic)."""
    replies: list[tuple] = []
    seen: list[tuple[str, str, bytes, dict]] = []
    times: list[float] = []

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).times.append(time.monotonic())
        type(self).seen.append((self.command, self.path, body, dict(self.headers)))
        status, data, *extra = type(self).replies.pop(0) if type(self).replies else (200, b"{}")
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (extra[0] if extra else {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def peer():
    _Peer.replies, _Peer.seen, _Peer.times = [], [], []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Peer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", _Peer
    srv.shutdown()


def test_a_url_that_is_not_a_url_is_a_clear_error():
    for url in ("notaurl", "ftp://h/", "http://", 17):
        with pytest.raises(ClientError, match="not a server URL"):
            ApiClient(url)


def test_the_api_client_drops_none_repeats_lists_and_sends_the_token(peer):
    url, p = peer
    p.replies = [(200, b'{"success": true, "message": "ok", "data": [1]}')]
    client = ApiClient(url, "secret-token")
    assert client.call("job", "list", task_id=3, site=None, ids=[1, 2]) == [1]
    method, path, _, headers = p.seen[0]
    assert (method, path) == ("GET", "/api/v1/job/list?task_id=3&ids=1&ids=2")
    assert headers["Authorization"] == "Bearer secret-token"
    assert "secret-token" not in repr(client) and client.last_message == "ok"


def test_the_api_client_says_refused_unreachable_and_not_json_apart(peer):
    url, p = peer
    p.replies = [(403, b'{"success": false, "message": "no such method"}'),
                 (200, b"<html>proxy</html>")]
    with pytest.raises(Refused) as err:
        ApiClient(url).call("x", "y", "POST", a=1)
    assert (err.value.http_status, err.value.reason) == (403, "no such method")
    assert err.value.url == f"{url}/api/v1/x/y"
    with pytest.raises(ProtocolError, match="is not JSON"):
        ApiClient(url).call("x", "y")
    with pytest.raises(ServerUnreachable, match="cannot reach the server at http://127.0.0.1:1/"):
        ApiClient("http://127.0.0.1:1").is_alive()


def test_the_pilot_client_retries_server_errors_then_gives_up(peer):
    url, p = peer
    p.replies = [(503, b"busy"), (200, b'{"StatusCode": 20}')]
    client = PilotClient(url, retry=RetryPolicy(attempts=3, backoff_s=0.01))
    assert client.get_job({"siteName": "S"}) is None
    assert [s[0:2] for s in p.seen] == [("POST", "/server/panda/getJob")] * 2
    assert p.seen[0][2] == b"siteName=S"
    p.replies = [(500, b"")] * 3
    t0 = time.monotonic()
    with pytest.raises(ServerUnreachable, match="3 attempts: HTTP 500") as err:
        client.update_job({"jobId": 1, "state": "running"})
    assert err.value.code == ErrorCode.COMMUNICATION_FAILURE and time.monotonic() - t0 < 5


def test_the_pilot_client_refuses_a_reply_without_a_status_or_too_big(peer, monkeypatch):
    url, p = peer
    p.replies = [(200, b'{"no": "status"}'), (200, b"x" * 200)]
    client = PilotClient(url, retry=RetryPolicy(attempts=1))
    with pytest.raises(ProtocolError, match="StatusCode"):
        client.get_job({})
    monkeypatch.setattr("panda_core.client.MAX_REPLY_BYTES", 100)
    with pytest.raises(ProtocolError, match="larger than"):
        client.get_job({})
    assert MAX_REPLY_BYTES > 1 << 20
    assert replica_url("file:///se/", "s", "f").startswith("file:///se/s/")


def test_the_pilot_client_asks_again_while_the_server_says_try_again(peer):
    url, p = peer
    p.replies = [(200, b'{"StatusCode": 10, "errorDialog": "deadlock; try again"}'),
                 (200, b'{"StatusCode": 20}')]
    client = PilotClient(url, retry=RetryPolicy(attempts=2, backoff_s=0.01))
    assert client.get_job({"siteName": "S"}) is None
    p.replies = [(200, b'{"StatusCode": 10, "errorDialog": "deadlock; try again"}')] * 2
    with pytest.raises(ServerUnreachable, match="try again"):
        client.get_job({"siteName": "S"})
    assert try_again(10) and try_again("10") and not try_again(30) and not try_again(None)


def test_retry_after_is_read_as_seconds_or_an_http_date_and_never_raises():
    now = 1_800_000_000.0
    assert retry_after_s("5") == 5.0 and retry_after_s(" 120 ") == 120.0
    assert retry_after_s(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30)
    assert retry_after_s(formatdate(now - 30, usegmt=True), now=now) == 0.0   # in the past
    assert retry_after_s(formatdate(now + 7, localtime=False), now=now) == pytest.approx(7)
    assert retry_after_s("9" * 5000) >= 1e9          # more digits than int() takes: "very long"
    for junk in (None, "", "-5", "1.5", "inf", "nan", "soon", "\u0665", "Fri, 99 Foo 2026",
                 "Fri, 31 Dec 99999 23:59:59 GMT", "x" * 10_000):
        assert retry_after_s(junk) is None, junk


def test_a_retry_waits_as_long_as_the_server_asks_within_the_policys_cap():
    policy = RetryPolicy(backoff_s=1, max_backoff_s=10, jitter=0.5)
    assert policy.wait_after(1.0, None) == 1.0 and policy.wait_after(1.0, 0.5) == 1.0
    assert policy.wait_after(1.0, 4, rand=lambda: 0.0) == 4.0
    assert policy.wait_after(1.0, 4, rand=lambda: 1.0) == 6.0     # spread upward like the rest
    assert policy.wait_after(1.0, 1e12, rand=lambda: 0.0) == 10.0   # capped
    for hostile in (-5.0, 0.0, float("nan"), float("inf"), float("-inf")):
        assert policy.wait_after(1.0, hostile) == 1.0


def test_the_client_honours_the_servers_retry_after(peer):
    url, p = peer
    p.replies = [(503, b'{"success": false}', {"Retry-After": "1"}),
                 (200, b'{"success": true, "message": "", "data": {"alive": true}}')]
    client = ApiClient(url, retry=RetryPolicy(attempts=2, backoff_s=0.01, jitter=0))
    assert client.is_alive()
    assert 1.0 <= p.times[1] - p.times[0] < 2.5, "the retry came before the server's Retry-After"


def test_a_hostile_retry_after_cannot_stall_or_crash_the_client(peer):
    url, p = peer
    far = formatdate(time.time() + 10 ** 7, usegmt=True)
    hostile = ["-5", "soon", "1e999", "Fri, 31 Dec 99999 23:59:59 GMT", "9" * 5000, far]
    p.replies = [(503, b"busy", {"Retry-After": v}) for v in hostile]
    p.replies.append((200, b'{"StatusCode": 20}'))
    client = PilotClient(url, retry=RetryPolicy(attempts=7, backoff_s=0.01, max_backoff_s=0.2,
                                                jitter=0))
    t0 = time.monotonic()
    assert client.get_job({"siteName": "S"}) is None
    assert time.monotonic() - t0 < 3
    gaps = [b - a for a, b in zip(p.times, p.times[1:])]
    assert len(gaps) == 6
    assert all(g < 0.15 for g in gaps[:4]), "nonsense is ignored: the policy's own wait"
    assert all(g >= 0.2 for g in gaps[4:]), "a long Retry-After is honoured up to the cap"
    p.replies = [(429, b"slow down", {"Retry-After": "3600"})] * 2
    with pytest.raises(ServerUnreachable, match="2 attempts: HTTP 429, Retry-After 3600 s"):
        PilotClient(url, retry=RetryPolicy(attempts=2, backoff_s=0.01, max_backoff_s=0.05)
                    ).update_job({"jobId": 1})


def test_a_deadline_cuts_the_wait_so_the_last_try_ends_by_it():
    no_deadline = Deadline(None)
    assert no_deadline.wait(50.0, 30.0) == 50.0 and no_deadline.timeout(30.0) == 30.0
    bound = Deadline(time.time() + 10)
    assert bound.timeout(30.0) <= 10.0 and bound.timeout(2.0) == 2.0
    assert bound.wait(1.0, 2.0) == 1.0 and not bound.last_try      # room for both: untouched
    cut = bound.wait(600.0, 2.0)                                     # a Retry-After of 600 s
    assert 7.5 < cut <= 8.0 and bound.last_try, "cut to leave a whole try before the deadline"
    assert bound.wait(0.01, 0.01) is None, "no try after the one a cut wait led to"
    assert Deadline(time.time() + 3).wait(1.0, 30.0) == 0.0, "a try longer than what is left"
    past = Deadline(time.time() - 1)
    assert past.reached() and past.wait(1.0, 1.0) is None and past.timeout(30.0) == 0.0


def test_a_retry_after_longer_than_the_deadline_is_cut_to_one_last_try_before_it(peer):
    url, p = peer
    p.replies = [(503, b"busy", {"Retry-After": "3600"})] * 5
    client = PilotClient(url, retry=RetryPolicy(attempts=5, backoff_s=0.01, max_backoff_s=7200,
                                                timeout_s=0.5, jitter=0))
    t0 = time.monotonic()
    with pytest.raises(ServerUnreachable, match=r"the deadline \d\d:\d\d:\d\d UTC was reached "
                       r"after 2 attempts: HTTP 503, Retry-After 3600 s"):
        client.update_job({"jobId": 1}, deadline=time.time() + 2.0)
    took = time.monotonic() - t0
    assert len(p.times) == 2 and took < 2.3, "the call ended by its deadline"
    assert 1.3 < p.times[1] - p.times[0] < 1.8, \
        "the last try came as late as still leaves it its whole timeout before the deadline"


def test_many_503s_stop_at_the_deadline_not_at_the_policys_last_attempt(peer):
    url, p = peer
    p.replies = [(503, b"busy")] * 1000
    client = ApiClient(url, retry=RetryPolicy(attempts=1000, backoff_s=0.05, max_backoff_s=0.1,
                                              timeout_s=0.3, jitter=0))
    t0 = time.monotonic()
    with pytest.raises(ServerUnreachable, match="was reached after .* attempts: HTTP 503"):
        client.request("GET", "/x", deadline=time.time() + 1.0)
    assert time.monotonic() - t0 < 1.3
    assert 5 <= len(p.times) <= 25, "retries kept their waits up to the deadline, no busy loop"
    assert all(b - a >= 0.04 for a, b in zip(p.times, p.times[1:-1])), p.times


def test_a_hung_server_times_out_at_the_deadline_not_after_the_policys_timeout():
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)            # connections are accepted by the kernel, never answered
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        client = PilotClient(url, retry=RetryPolicy(attempts=5, backoff_s=0.1, timeout_s=20))
        t0 = time.monotonic()
        with pytest.raises(ServerUnreachable, match="was reached after 1 attempt: timed out"):
            client.update_job({"jobId": 1}, deadline=time.time() + 0.8)
        assert 0.7 < time.monotonic() - t0 < 1.5
    finally:
        listener.close()


def test_get_job_and_its_try_again_loop_stop_at_the_deadline(peer):
    url, p = peer
    client = PilotClient(url, retry=RetryPolicy(attempts=50, backoff_s=0.2, jitter=0,
                                                timeout_s=0.2))
    p.replies = [(200, b'{"StatusCode": 10, "errorDialog": "database busy"}')] * 50
    t0 = time.monotonic()
    with pytest.raises(ServerUnreachable, match=r"try again and the deadline .* is reached: "
                       "database busy"):
        client.get_job({"siteName": "S"}, deadline=time.time() + 1.0)
    assert time.monotonic() - t0 < 1.3 and 3 <= len(p.times) <= 6
    p.replies = [(503, b"busy", {"Retry-After": "3600"})] * 5
    with pytest.raises(ServerUnreachable, match="was reached after 2 attempts"):
        client.get_job({"siteName": "S"}, deadline=time.time() + 0.5)


def test_a_call_past_its_deadline_is_not_tried(peer):
    url, p = peer
    with pytest.raises(ServerUnreachable, match="was reached: no time left to try"):
        PilotClient(url).update_job({"jobId": 1}, deadline=time.time() - 5)
    assert p.seen == []


# ------------------------------------------------------------------------- trust
def test_a_key_fingerprint_is_the_sha256_of_the_keys_der():
    import hashlib

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public = Ed25519PrivateKey.generate().public_key()
    pem = public.public_bytes(serialization.Encoding.PEM,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    der = public.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    fingerprint = key_fingerprint(pem)
    assert fingerprint == "sha256:" + hashlib.sha256(der).hexdigest() == key_fingerprint(
        pem.decode())
    spaced = "SHA256:" + ":".join(fingerprint[7 + i:9 + i] for i in range(0, 64, 2)).upper()
    assert normalise_fingerprint(spaced) == fingerprint
    for bad in ("sha256:1234", "md5:" + "0" * 64, ""):
        with pytest.raises(ValueError):
            normalise_fingerprint(bad)
    for bad in (b"no key here", b"-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----"):
        with pytest.raises(ValueError):
            key_fingerprint(bad)


def test_a_dispatch_binding_matches_site_pilot_and_nonce_not_time():
    bound = Dispatch("S", "wn:1", "n1", 100)
    raw = {DISPATCH_KEY: bound.to_wire()}
    assert Dispatch.of(raw) == bound and bound.matches(Dispatch("S", "wn:1", "n1", 999))
    for other in (Dispatch("T", "wn:1", "n1"), Dispatch("S", "wn:2", "n1"),
                  Dispatch("S", "wn:1", "n2")):
        assert not bound.matches(other)
    assert Dispatch.of({}) is None and Dispatch.of({DISPATCH_KEY: {"site": "S"}}) is None


def test_site_config_trust_lists_are_lists_of_strings():
    base = {"name": "S"}
    site = SiteConfig.from_dict({**base, "trust": {"copytool_programs": ["/usr/bin/xrdcp"],
                                                   "payload_env": ["A", "B_*"]}})
    assert site.trust.copytool_programs == ["/usr/bin/xrdcp"]
    assert site.to_dict()["trust"]["payload_env"] == ["A", "B_*"]
    with pytest.raises(SiteConfigError, match="trust.payload_env: expected a list of strings"):
        SiteConfig.from_dict({**base, "trust": {"payload_env": "A"}})
