"""The per-client request rate limit (server/ratelimit.py): a token bucket per identity, HTTP 429
with Retry-After over it, for the API and the pilot protocol alike.

In process, on a clock the test moves: a client over its limit is refused while another is
served, the bucket refills at its rate, admins and exempt subjects pass, IPv6 callers are
counted by their /64, and a flood of identities keeps the table (and the memory) within its
bound. Against a running ``panda server`` on each database: 429 with Retry-After and a reason
both kinds of callers read, another client served meanwhile, /metrics counting the refusals,
a bounded log, forged tokens and forged X-Real-Ip headers buying no new bucket (and forwarded
addresses honoured behind a proxy), a normal pilot under the default limits never refused, bad
option values refused with a message, and our client waiting as the server asks before it tries
again.
"""
from __future__ import annotations

import gc
import math
import re
import time
import tracemalloc

import pytest
import requests

from panda_core.client import ApiClient, PilotClient, ServerUnreachable
from panda_core.retry import RetryPolicy
from server.auth import Identity
from server.cli import _server_parser
from server.ratelimit import Limit, RateLimiter, RateLimits, client_network
from testkit import start_server, stop_server


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(api=Limit(2, 3), pilot=Limit(10, 20), **kw) -> tuple[RateLimiter, Clock]:
    clock = Clock()
    return RateLimiter(RateLimits(pilot=pilot, api=api, **kw), clock=clock), clock


ALICE = Identity("alice", "user")
BOB = Identity("bob", "user")
API = "/api/v1/task/list"


def test_a_client_over_its_limit_is_refused_while_another_is_served():
    rl, clock = limiter()
    assert [rl.check(API, ALICE, "10.0.0.1") for _ in range(3)] == [None] * 3   # the burst
    refused = rl.check(API, ALICE, "10.0.0.1")
    assert refused is not None and refused.kind == "api"
    assert refused.retry_after_s == 1          # 2/s: the next request in 0.5 s, said as 1 s
    assert "rate limit of 2 requests/s, burst 3" in refused.reason()
    assert rl.check(API, BOB, "10.0.0.1") is None, "another identity from the same address"
    assert rl.check(API, None, "10.0.0.2") is None, "an anonymous caller elsewhere"
    assert rl.check(API, Identity("alice", "pilot"), "10.0.0.1") is None, \
        "a pilot identity has its own limit"


def test_the_bucket_refills_at_its_rate_and_retry_after_says_when():
    rl, clock = limiter(api=Limit(0.1, 2))         # one request every 10 s
    assert rl.check(API, ALICE, None) is None
    assert rl.check(API, ALICE, None) is None
    refused = rl.check(API, ALICE, None)
    assert refused.retry_after_s == 10
    clock.now += 4
    assert rl.check(API, ALICE, None).retry_after_s == 6, "what is left of the wait"
    clock.now += 6
    assert rl.check(API, ALICE, None) is None, "refilled after Retry-After"
    assert rl.check(API, ALICE, None) is not None
    clock.now += 3600
    assert [rl.check(API, ALICE, None) for _ in range(3)][:2] == [None, None], \
        "a long pause refills up to the burst, no further"
    assert rl.check(API, ALICE, None) is not None


def test_refused_requests_take_nothing_from_the_bucket():
    """A client that keeps asking while refused is served again on time: a refusal does not
    push its next request further out."""
    rl, clock = limiter(api=Limit(1, 1))
    assert rl.check(API, ALICE, None) is None
    for _ in range(50):
        clock.now += 0.01
        assert rl.check(API, ALICE, None) is not None
    clock.now += 0.5 + 1e-9
    assert rl.check(API, ALICE, None) is None


def test_admins_and_exempt_subjects_are_not_limited_unless_asked():
    admin = Identity("root", "admin")
    rl, _ = limiter(api=Limit(1, 1), exempt=frozenset({"monitoring-robot"}))
    robot = Identity("monitoring-robot", "user")
    assert all(rl.check(API, who, None) is None for _ in range(100) for who in (admin, robot))
    rl, _ = limiter(api=Limit(1, 1), limit_admins=True)
    assert rl.check(API, admin, None) is None
    assert rl.check(API, admin, None) is not None


def test_pilot_identities_and_anonymous_pilot_reads_have_the_pilot_limit():
    rl, _ = limiter(api=Limit(1, 1), pilot=Limit(1, 5))
    pilot = Identity("factory", "pilot", site="SITE_A")
    assert [rl.check(API, pilot, None) for _ in range(5)] == [None] * 5, \
        "a pilot's API calls: the pilot limit"
    assert rl.check("/server/panda/getJob", pilot, None).kind == "pilot"
    assert rl.check(API, Identity("factory", "pilot", site="SITE_B"), None) is None, \
        "a token bound to another site is another client"
    # anonymous pilots of one NAT address reading queue descriptions: the pilot limit
    assert [rl.check("/cache/schedconfig/X.all.json", None, "192.0.2.7")
            for _ in range(5)] == [None] * 5
    assert rl.check("/cache/schedconfig/X.all.json", None, "192.0.2.7").kind == "pilot"
    assert rl.check("/api/v1/system/is_alive", None, "192.0.2.7") is None, "its own API bucket"
    # a user, and an anonymous caller of the pilot protocol, get no pilot's limit
    assert rl.check("/server/panda/getStatus", ALICE, None) is None
    assert rl.check("/cache/schedconfig/X.all.json", ALICE, None).kind == "api"
    assert rl.check("/server/panda/getStatus", None, "192.0.2.8") is None
    assert rl.check("/server/panda/getStatus", None, "192.0.2.8").kind == "api"


def test_a_kind_with_rate_0_is_not_limited():
    rl, _ = limiter(api=Limit(0, 1))
    assert all(rl.check(API, ALICE, None) is None for _ in range(1000))
    assert "api" not in rl.tables


@pytest.mark.parametrize("address, network", [
    ("192.0.2.1", "192.0.2.1"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("::ffff:192.0.2.9", "192.0.2.9"),
    ("fe80::1%eth0", "fe80::/64"),
    (None, "?"),
    ("not:an:address:" + "x" * 200, "not:an:address:" + "x" * 49),
])
def test_an_anonymous_client_is_its_ipv4_address_or_its_ipv6_64(address, network):
    assert client_network(address) == network


def test_rotating_ipv6_addresses_in_one_64_is_one_client():
    rl, _ = limiter(api=Limit(1, 3))
    answers = [rl.check(API, None, f"2001:db8:0:7::{i:x}") for i in range(10)]
    assert answers[:3] == [None] * 3 and all(a is not None for a in answers[3:])


def test_an_identity_flood_stays_within_the_bound():
    """An attacker rotating identities (or addresses) fills at most ``max_clients`` buckets; the
    memory stops growing there, and the clients it pushed out lose nothing (a new bucket starts
    full)."""
    rl, clock = limiter(api=Limit(1, 2), max_clients=1000)
    table = rl.tables["api"]
    assert rl.check(API, ALICE, None) is None
    gc.collect()
    tracemalloc.start()
    try:
        for i in range(2000):
            rl.check(API, Identity(f"attacker-{i}", "user"), None)
        first, _ = tracemalloc.get_traced_memory()
        for i in range(2000, 100000):
            rl.check(API, Identity(f"attacker-{i}", "user"), None)
            clock.now += 1e-6
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(table) == 1000
    assert after - first < 64 * 1024, f"the table grew by {after - first} bytes at its bound"
    assert rl.check(API, ALICE, None) is None, "pushed out: a full bucket again"
    # the flood ends: buckets idle long enough to be full again go as new clients arrive
    clock.now += 10
    for i in range(10):
        rl.check(API, Identity(f"returning-{i}", "user"), None)
    assert len(table) == 1000 - 2 * 10 + 10, "two idle buckets go per new client"


def test_the_table_keeps_the_most_recently_seen_clients():
    rl, clock = limiter(api=Limit(1, 1), max_clients=100)
    assert rl.check(API, ALICE, None) is None
    for i in range(500):                     # alice keeps calling amid a flood of others
        clock.now += 0.001
        rl.check(API, Identity(f"x{i}", "user"), None)
        if i % 50 == 0:
            assert rl.check(API, ALICE, None) is not None, "still over her limit"


def test_bad_option_values_are_refused_with_a_message(capsys):
    parser = _server_parser()
    for argv, says in [
        (["--rate-limit-api", "-1"], "--rate-limit-api: must be requests per second from 0.01"),
        (["--rate-limit-api", "nan"], "or 0 for no limit, not 'nan'"),
        (["--rate-limit-pilot", "inf"], "--rate-limit-pilot: must be requests per second"),
        (["--rate-limit-pilot", "lots"], "not 'lots'"),
        (["--rate-limit-api", "0.001"], "from 0.01 to 1000000"),
        (["--rate-limit-api-burst", "0"], "--rate-limit-api-burst: must be a whole number of "
                                          "requests from 1 to 10000000, not '0'"),
        (["--rate-limit-pilot-burst", "2.5"], "not '2.5'"),
        (["--rate-limit-clients", "10"], "--rate-limit-clients: must be a whole number of "
                                         "clients from 100 to 10000000, not '10'"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert says in err, err
        assert "Traceback" not in err
    args = parser.parse_args(["--rate-limit-api", "0", "--rate-limit-exempt", "/O=x/CN=robot",
                              "--rate-limit-exempt", "robot2"])
    assert args.rate_limit_api == 0 and args.rate_limit_exempt == ["/O=x/CN=robot", "robot2"]
    defaults = parser.parse_args([])
    assert RateLimits() == RateLimits(
        pilot=Limit(defaults.rate_limit_pilot, defaults.rate_limit_pilot_burst),
        api=Limit(defaults.rate_limit_api, defaults.rate_limit_api_burst),
        max_clients=defaults.rate_limit_clients), "one set of defaults"


def test_a_limit_refuses_nonsense_when_built_in_code():
    for rate, burst in [(-1, 1), (math.nan, 1), (math.inf, 1), (1, 0)]:
        with pytest.raises(ValueError, match="finite rate >= 0 and a burst >= 1"):
            Limit(rate, burst)


# ----------------------------------------------------------------------------- a real server
API_RATE, API_BURST = 1, 3
PILOT_RATE, PILOT_BURST = 1, 4


@pytest.fixture
def limited(db_url, tmp_path):
    srv = start_server(tmp_path / "server", db_url=db_url, extra=[
        "--watcher-interval", "0", "--archive-interval", "0", "--ops-interval", "0",
        "--rate-limit-api", str(API_RATE), "--rate-limit-api-burst", str(API_BURST),
        "--rate-limit-pilot", str(PILOT_RATE), "--rate-limit-pilot-burst", str(PILOT_BURST),
        "--rate-limit-exempt", "robot"])
    yield srv
    stop_server(srv)


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_over_its_limit_a_client_gets_429_with_retry_after_and_another_is_served(limited):
    alice, bob = limited.token("user", "alice"), limited.token("user", "bob")
    robot = limited.token("user", "robot")
    url = limited.url + "/api/v1/task/list"
    with requests.Session() as s:
        codes = [s.get(url, headers=_bearer(alice), timeout=10).status_code
                 for _ in range(API_BURST)]
        assert codes == [200] * API_BURST
        reply = s.get(url, headers=_bearer(alice), timeout=10)
        assert reply.status_code == 429
        assert reply.headers["Retry-After"] == "1"
        body = reply.json()
        assert body["success"] is False and body["data"] is None
        assert "rate limit of 1 requests/s, burst 3" in body["message"]
        assert body["StatusCode"] == 10, "pilot 3's 'try again later'"
        assert s.get(url, headers=_bearer(bob), timeout=10).status_code == 200
        assert all(s.get(url, headers=_bearer(robot), timeout=10).status_code == 200
                   for _ in range(10)), "an exempt subject"
        assert s.get(url, headers=_bearer(limited.token("admin", "root")),
                     timeout=10).status_code == 200
        # the connection stayed usable: alice is served again on it once her bucket refilled
        time.sleep(1.05)
        assert s.get(url, headers=_bearer(alice), timeout=10).status_code == 200


def test_the_pilot_protocol_is_refused_with_a_reply_pilots_read(limited):
    pilot = limited.token("pilot", "factory", site="SITE_A")
    url = limited.url + "/server/panda/getJob"
    with requests.Session() as s:
        for _ in range(PILOT_BURST):
            r = s.post(url, data={"siteName": "SITE_A"}, headers=_bearer(pilot), timeout=10)
            assert r.status_code == 200
        r = s.post(url, data={"siteName": "SITE_A", "big": "x" * 100000},
                   headers={**_bearer(pilot), "Accept": "application/json"}, timeout=10)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["StatusCode"] == 10 and "pilot calls" in r.json()["errorDialog"]
        # another site's token is another client
        other = limited.token("pilot", "factory", site="SITE_B")
        assert s.post(url, data={"siteName": "SITE_B"}, headers=_bearer(other),
                      timeout=10).status_code == 200


def test_refusals_are_counted_and_logged_at_a_bounded_rate(limited):
    carol = limited.token("user", "carol")
    url = limited.url + "/api/v1/task/list"
    with requests.Session() as s:
        codes = [s.get(url, headers=_bearer(carol), timeout=10).status_code for _ in range(60)]
    assert codes.count(429) >= 50
    metrics = requests.get(limited.url + "/metrics", headers=_bearer(limited.token("admin")),
                           timeout=10).text
    counted = re.search(r'^panda_rate_limited_total\{kind="api"\} (\d+)', metrics, re.M)
    assert counted and int(float(counted.group(1))) >= codes.count(429)
    assert re.search(r'^panda_rate_limit_clients\{kind="api"\} [1-9]', metrics, re.M)
    lines = [line for line in limited.log().splitlines() if "server.ratelimit" in line]
    assert 1 <= len(lines) <= 2, lines
    assert "'carol'" in lines[0] and "answered 429" in lines[0]


def test_bad_credentials_and_anonymous_callers_are_limited_by_address(limited):
    url = limited.url + "/api/v1/system/is_alive"
    forged = {"Authorization": "Bearer not-a-token"}
    with requests.Session() as s:
        codes = [s.get(url, headers=forged, timeout=10).status_code for _ in range(12)]
        assert 403 in codes and 429 in codes, codes
        assert s.get(url, timeout=10).status_code == 429, "the same address, no token"
        assert s.get(url, headers=_bearer(limited.token("user", "dave")),
                     timeout=10).status_code == 200, "an identity is its own client"


def test_a_forged_client_address_buys_no_new_bucket(limited):
    """Without --behind-proxy, X-Real-Ip and X-Forwarded-For are anyone's to write: ignored."""
    url = limited.url + "/api/v1/system/is_alive"
    with requests.Session() as s:
        codes = [s.get(url, timeout=10, headers={"X-Real-Ip": f"198.51.100.{i}",
                                                 "X-Forwarded-For": f"203.0.113.{i}"}
                       ).status_code for i in range(12)]
    assert codes.count(429) >= 12 - API_BURST - 2, codes


def test_behind_a_proxy_each_forwarded_address_is_a_client(db_url, tmp_path):
    srv = start_server(tmp_path / "server", db_url=db_url, extra=[
        "--watcher-interval", "0", "--archive-interval", "0", "--behind-proxy",
        "--rate-limit-api", "1", "--rate-limit-api-burst", "2"])
    try:
        url = srv.url + "/api/v1/system/is_alive"
        with requests.Session() as s:
            def get(address):
                return s.get(url, headers={"X-Real-Ip": address}, timeout=10).status_code
            assert [get("198.51.100.1") for _ in range(3)] == [200, 200, 429]
            assert get("198.51.100.2") == 200, "another client behind the same proxy"
            assert [get("2001:db8:5::1"), get("2001:db8:5::2"), get("2001:db8:5::3")] == \
                [200, 200, 429], "one IPv6 /64"
    finally:
        stop_server(srv)


def test_our_pilot_client_waits_as_the_server_asks(limited):
    token = limited.token("pilot", "waiter", site="SITE_A")
    client = PilotClient(limited.url, token, retry=RetryPolicy(attempts=4, backoff_s=0.05,
                                                               max_backoff_s=5, jitter=0))
    for _ in range(PILOT_BURST):
        client.post("getStatus", {"ids": "1"})
    t0 = time.monotonic()
    client.post("getStatus", {"ids": "1"})       # refused once, then served after Retry-After
    waited = time.monotonic() - t0
    assert waited >= 1.0, "the retry came before the server's Retry-After"
    assert waited < 4


def test_the_cli_client_stops_with_a_reason_rather_than_hammering(limited):
    erin = limited.token("user", "erin")
    client = ApiClient(limited.url, erin)       # one try, as the CLI's commands make
    for _ in range(API_BURST):
        client.list_tasks()
    with pytest.raises(ServerUnreachable) as refused:
        client.list_tasks()
    assert "HTTP 429, Retry-After 1 s (too many requests: the server limits this client's " \
           "rate)" in str(refused.value)
    patient = ApiClient(limited.url, erin, retry=RetryPolicy(attempts=3, backoff_s=0.05,
                                                             jitter=0))
    t0 = time.monotonic()
    assert patient.list_tasks() == []
    assert time.monotonic() - t0 >= 0.9


@pytest.mark.slow
def test_the_default_limits_never_refuse_a_normal_pilot(db_url, tmp_path):
    """50 pilots' worth of calls with one site token, as fast as one connection carries them,
    under ``panda server``'s defaults: not one refused (benchmarks/dispatch.py measures the
    same on PostgreSQL at full speed)."""
    srv = start_server(tmp_path / "server", db_url=db_url,
                       extra=["--watcher-interval", "0", "--archive-interval", "0"])
    try:
        token = srv.token("pilot", "factory", site="SITE_A")
        with requests.Session() as s:
            s.headers.update({**_bearer(token), "Accept": "application/json"})
            statuses, try_again = set(), 0
            for i in range(1500):
                method = ("getJob", "updateJob", "getStatus")[i % 3]
                r = s.post(f"{srv.url}/server/panda/{method}",
                           data={"siteName": "SITE_A", "jobId": "1", "state": "running",
                                 "ids": "1"}, timeout=10)
                statuses.add(r.status_code)
                try_again += r.json().get("StatusCode") == 10
        assert statuses == {200} and try_again == 0, (statuses, try_again)
        assert "server.ratelimit" not in srv.log()
    finally:
        stop_server(srv)
