"""The monitor as shifters use it: a real server over a database seeded with jobs in every
state and error, every view loaded in headless Chromium (Debian's chromium and chromium-driver,
driven by selenium), drill-downs and plots clicked, what the pages show checked; every ``?json``
view checked against its schema; alarms through the API, by e-mail (a real SMTP server,
aiosmtpd) and a webhook; ``/metrics`` checked by ``promtool``."""
from __future__ import annotations

import datetime as dt
import http.server
import json
import shutil
import subprocess
import threading
import time
import urllib.parse

import jsonschema
import pytest
import requests

from server import db
from server.monitor.schemas import VIEWS
from server.taskbuffer import TaskBuffer
from monitorkit import seed_monitor
from testkit import free_port, start_server, stop_server, wait_for

CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                "--window-size=1400,1000")


@pytest.fixture(scope="module")
def monitor(tmp_path_factory):
    """A server (auth on) over a seeded SQLite database: (server, seeded)."""
    tmp = tmp_path_factory.mktemp("monitor")
    url = f"sqlite:///{tmp / 'panda.db'}"
    engine = db.make_engine(url, pool_size=1)
    db.create_schema(engine)
    seeded = seed_monitor(TaskBuffer(engine), tmp / "se")
    engine.dispose()
    server = start_server(tmp / "server", url, extra=["--watcher-interval", "0",
                                                      "--ops-interval", "0"])
    yield server, seeded
    stop_server(server)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.fail("Debian's chromium and chromium-driver are needed "
                    "(tests/debian-packages.txt)", pytrace=False)
    opts = webdriver.ChromeOptions()
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chrome')}")
    opts.binary_location = binary
    chrome = webdriver.Chrome(options=opts, service=Service(driver))
    chrome.set_page_load_timeout(60)
    yield chrome
    chrome.quit()


def css(browser, selector):
    from selenium.webdriver.common.by import By
    return browser.find_elements(By.CSS_SELECTOR, selector)


def view_paths(s) -> dict[str, str]:
    t1 = s.task_ids[0]
    return {"dash": "/monitor/", "jobs": "/monitor/jobs", "job": f"/monitor/jobs/{s.with_log}",
            "joblog": f"/monitor/jobs/{s.with_log}/logs", "tasks": "/monitor/tasks",
            "task": f"/monitor/tasks/{t1}", "errors": "/monitor/errors",
            "sites": "/monitor/sites", "site": "/monitor/sites/SITE_B",
            "pilots": "/monitor/pilots", "users": "/monitor/users",
            "user": "/monitor/users/alice", "search": "/monitor/search?q=nothing-like-this",
            "alarms": "/monitor/alarms", "incidents": "/monitor/incidents",
            "history": "/monitor/history", "waiting": "/monitor/waiting",
            "plots": "/monitor/plots", "errorcodes": "/monitor/errorcodes"}


#: per view: texts the page must show
EXPECTED = {
    "dash": ["Dashboard", "SITE_A", "SITE_B", "offline", "87.5"],
    "jobs": ["Job attribute summary", "jobdispatcher:100", "lost heartbeat", "AP_MC",
             "MCORE_HIMEM", "last 12 hour(s)"],
    "job": ["State history", "payload stdout", "pilot log", "No errors.", "Debug view"],
    "joblog": ["log/payload.stdout", "log/work/result.txt"],
    "tasks": ["mc.sim", "user.bob.ana"],
    "task": ["Jobs per state", "test.in", "CPU efficiency"],
    "errors": ["By component and code", "stage-in failed", "killed by alice", "By site"],
    "sites": ["SITE_A", "offline", "local"],
    "site": ["offline", "5 pilots failed in a row", "SITE_B pilots fail", "Configuration"],
    "pilots": ["fac-1", "5 pilots failed in a row", "What they submitted"],
    "users": ["alice", "bob"],
    "user": ["User alice", "mc.sim", "SITE_A"],
    "search": ["Nothing matches nothing-like-this"],
    "alarms": ["SITE_B pilots fail", "critical", "acknowledge"],
    "incidents": ["server.watcher", "lost heartbeat", "could not be placed"],
    "history": ["running jobs per site", "Snapshots"],
    "waiting": ["SITE_B is offline", "no online site fits", "inputs not placed"],
    "plots": ["share usage against targets", "queue time"],
    "errorcodes": ["stage-in failed", "jobdispatcher"],
}
#: views whose plots must have drawn (SVG elements with marks in them)
PLOTTED = {"dash": 1, "errors": 2, "task": 3, "history": 3, "plots": 6}


def test_every_view_loads_in_chromium(monitor, browser):
    server, s = monitor
    for name, path in view_paths(s).items():
        browser.get(server.url + path)
        text = css(browser, "body")[0].text
        assert "Error" not in browser.title, (name, text[:500])
        for expected in EXPECTED[name]:
            assert expected in text, (name, expected)
        state = css(browser, "#alarm-state")
        assert state and "1 active (1 critical)" in state[0].text, name
        if name in PLOTTED:
            svgs = css(browser, "svg.plot")
            assert len(svgs) >= PLOTTED[name], name
            marks = css(browser, "svg.plot rect.bar, svg.plot rect.cell, svg.plot polyline")
            assert marks, f"{name}: no plot drew"
            assert svgs[0].size["width"] > 100


def test_drill_down_from_a_facet_and_the_error_box(monitor, browser):
    server, s = monitor
    browser.get(server.url + "/monitor/jobs")
    link = next(a for a in css(browser, '.facet[data-facet="jobstatus"] a') if a.text == "failed")
    link.click()
    query = urllib.parse.parse_qs(urllib.parse.urlparse(browser.current_url).query)
    assert query["jobstatus"] == ["failed"]
    states = {td.text for td in css(browser, "#jobtable tbody td:nth-child(5)")}
    assert states == {"failed"}
    next(a for a in css(browser, '.facet[data-facet="computingsite"] a')
         if a.text == "SITE_A").click()
    query = urllib.parse.parse_qs(urllib.parse.urlparse(browser.current_url).query)
    assert query["jobstatus"] == ["failed"] and query["computingsite"] == ["SITE_A"]
    css(browser, "#errors a")[0].click()
    assert "jobdispatchererrorcode=100" in browser.current_url
    rows = css(browser, "#jobtable tbody tr")
    assert len(rows) == 2 and all("lost heartbeat" in r.text for r in rows)


def _click(browser, element):
    browser.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', "
                           "{bubbles: true, cancelable: true, view: window}))", element)


def test_click_a_plot(monitor, browser):
    server, s = monitor
    browser.get(server.url + "/monitor/")
    cell = next(a for a in css(browser, 'svg[data-plot="heatmap"] a')
                if "computingsite=SITE_A" in a.get_dom_attribute("href")
                and "jobstatus=failed" in a.get_dom_attribute("href"))
    _click(browser, cell)
    wait_for(lambda: "/monitor/jobs?" in browser.current_url, "the heat map's drill-down")
    assert {td.text for td in css(browser, "#jobtable tbody td:nth-child(5)")} == {"failed"}
    assert {td.text for td in css(browser, "#jobtable tbody td:nth-child(10)")} == {"SITE_A"}
    browser.get(server.url + "/monitor/errors")
    bar = css(browser, 'svg[data-plot="errors-by-code"] a')[0]
    _click(browser, bar)
    wait_for(lambda: "errorcode=" in browser.current_url, "the error bar's drill-down")
    assert len(css(browser, "#jobtable tbody tr")) == 2       # jobdispatcher:100 twice


def test_job_page_logs_attempts_and_search(monitor, browser):
    server, s = monitor
    browser.get(f"{server.url}/monitor/jobs/{s.with_log}")
    next(a for a in css(browser, "#logs a") if a.text == "payload stdout").click()
    assert "hello from the payload" in css(browser, "#logtext")[0].text
    browser.get(f"{server.url}/monitor/jobs/{s.retry}")
    attempts = css(browser, "#attempts")[0].text
    assert str(s.retried) in attempts and "lost heartbeat (attempt 1)" in attempts
    box = css(browser, "#search")[0]
    box.send_keys(str(s.archived) + "\n")
    wait_for(lambda: browser.current_url.endswith(f"/monitor/jobs/{s.archived}"), "search")
    assert "archived" in css(browser, "#jobkey")[0].text
    box = css(browser, "#search")[0]
    box.send_keys("SITE_A\n")
    wait_for(lambda: browser.current_url.endswith("/monitor/sites/SITE_A"), "site search")
    css(browser, "#search")[0].send_keys("alice\n")
    wait_for(lambda: browser.current_url.endswith("/monitor/users/alice"), "user search")


def test_every_json_view_matches_its_schema(monitor):
    server, s = monitor
    for name, path in view_paths(s).items():
        sep = "&" if "?" in path else "?"
        reply = requests.get(f"{server.url}{path}{sep}json", timeout=30)
        assert reply.status_code == 200, (name, reply.text[:300])
        jsonschema.validate(reply.json(), VIEWS[name])
        same = requests.get(server.url + path, headers={"Accept": "application/json"},
                            timeout=30)
        assert same.headers["Content-Type"].startswith("application/json"), name
        assert same.json().keys() == reply.json().keys(), name
    member = requests.get(f"{server.url}/monitor/jobs/{s.with_log}/logs",
                          params={"file": "log/payload.stderr", "json": ""}, timeout=10).json()
    jsonschema.validate(member, VIEWS["joblog"])
    assert member["text"] == "a warning on stderr\n"
    found = requests.get(f"{server.url}/monitor/search", params={"q": "SITE_A", "json": ""},
                         timeout=10).json()
    assert found["found"] == "/monitor/sites/SITE_A"


def test_keyset_pages_in_json_cover_the_selection(monitor):
    server, s = monitor
    url = f"{server.url}/monitor/jobs?json&days=30&display_limit=7&fields=panda_id,status"
    seen = []
    while url:
        data = requests.get(url, timeout=10).json()
        seen += [j["panda_id"] for j in data["jobs"]]
        assert all(set(j) >= {"panda_id", "status"} for j in data["jobs"])
        url = server.url + data["next"] if data["next"] else None
    assert len(seen) == len(set(seen)) == s.n_jobs


@pytest.mark.parametrize("path, reason", [
    ("/monitor/jobs?nosuch=1", "unknown parameter"),
    ("/monitor/jobs?hours=many", "must be an integer"),
    ("/monitor/errors?date_from=2026-13-01", "must be a date"),
    ("/monitor/jobs?before=garbage", "before"),
    ("/monitor/jobs?fields=panda_id,nosuch", "unknown job column"),
    ("/monitor/tasks?status=a&status=b", "given 2 times"),
    ("/monitor/jobs/999999", "no job 999999"),
    ("/monitor/sites/NOWHERE", "unknown site"),
])
def test_bad_requests_get_a_reason(monitor, path, reason):
    server, _ = monitor
    sep = "&" if "?" in path else "?"
    reply = requests.get(f"{server.url}{path}{sep}json", timeout=10)
    assert reply.status_code in (400, 404) and reason in reply.json()["error"]
    page = requests.get(server.url + path, timeout=10)
    assert page.status_code == reply.status_code and reason in page.text


def test_alarm_api_roles_and_acknowledgement(monitor):
    server, _ = monitor
    api = f"{server.url}/api/v1/alarm"
    pilot = {"Authorization": f"Bearer {server.token('pilot', 'factory-host-2')}"}
    user = {"Authorization": f"Bearer {server.token('user', 'shifter')}"}
    refused = requests.post(f"{api}/raise", json={"key": "k", "title": "t"}, headers=user,
                            timeout=10)
    assert refused.status_code == 403 and "may not" in refused.json()["message"]
    bad = requests.post(f"{api}/raise", json={"key": "k", "title": "t", "severity": "huge"},
                        headers=pilot, timeout=10).json()
    assert not bad["success"] and "severity" in bad["message"]
    raised = requests.post(f"{api}/raise", json={"key": "factory:fac-2:SITE_C",
                                                 "title": "SITE_C pilots are held",
                                                 "site": "SITE_C"}, headers=pilot,
                           timeout=10).json()
    assert raised["success"], raised
    alarm = raised["data"]
    assert alarm["raised_by"] == "factory-host-2" and alarm["state"] == "active"
    page = requests.get(f"{server.url}/monitor/alarms", timeout=10).text
    assert "SITE_C pilots are held" in page and "2 active" in page
    # the page's button: no identity in a plain browser, so a refusal with the reason
    session = requests.Session()
    session.get(f"{server.url}/monitor/alarms", timeout=10)
    xsrf = session.cookies.get("_xsrf")
    anon = session.post(f"{server.url}/monitor/alarms/{alarm['alarm_id']}/ack",
                        data={"_xsrf": xsrf}, timeout=10, allow_redirects=False)
    assert anon.status_code == 403 and "secure connection required" in anon.text
    acked = session.post(f"{server.url}/monitor/alarms/{alarm['alarm_id']}/ack",
                         data={"_xsrf": xsrf}, headers=user, timeout=10,
                         allow_redirects=False)
    assert acked.status_code == 302
    listed = requests.get(f"{api}/list", timeout=10).json()["data"]
    mine = next(a for a in listed if a["alarm_id"] == alarm["alarm_id"])
    assert mine["state"] == "acknowledged" and mine["acknowledged_by"] == "shifter"
    again = requests.post(f"{api}/acknowledge", json={"alarm_id": alarm["alarm_id"]},
                          headers=user, timeout=10).json()
    assert again["success"]
    no_xsrf = requests.post(f"{server.url}/monitor/alarms/{alarm['alarm_id']}/ack",
                            headers=user, timeout=10, allow_redirects=False)
    assert no_xsrf.status_code == 403


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 - the http.server name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_alarms_go_out_by_email_and_webhook(tmp_path):
    aiosmtpd = pytest.importorskip("aiosmtpd.controller")
    mails = []

    class Inbox:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
            mails.append(envelope)
            return "250 OK"

    smtp_port = free_port()
    smtp = aiosmtpd.Controller(Inbox(), hostname="127.0.0.1", port=smtp_port)
    smtp.start()
    hook = http.server.HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    url = f"sqlite:///{tmp_path / 'panda.db'}"
    engine = db.make_engine(url, pool_size=1)
    db.create_schema(engine)
    tb = TaskBuffer(engine)
    seed_monitor(tb, tmp_path / "se")
    engine.dispose()
    server = start_server(tmp_path / "server", url, extra=[
        "--watcher-interval", "0", "--ops-interval", "0.3",
        "--alarm-smtp", f"127.0.0.1:{smtp_port}", "--alarm-mail-to", "shifters@example.org",
        "--alarm-mail-from", "panda@example.org", "--alarm-webhook",
        f"http://127.0.0.1:{hook.server_port}/hook", "--monitor-url", "http://monitor.example",
        "--duration-limit", "activated=12"])
    try:
        wait_for(lambda: len(_Hook.received) >= 2, "alarm webhooks", timeout=30)
        wait_for(lambda: len(mails) >= 2, "alarm e-mails", timeout=30)
        subjects = [m.content.decode() for m in mails]
        assert any("SITE_B pilots fail" in t and "[panda critical]" in t for t in subjects)
        assert any("activated too long at SITE_B" in t and "SITE_B is offline" in t
                   for t in subjects)
        assert all(m.rcpt_tos == ["shifters@example.org"] for m in mails)
        assert all(m.mail_from == "panda@example.org" for m in mails)
        keys = {h["alarm"]["key"] for h in _Hook.received}
        assert {"api:test:SITE_B", "duration:activated:SITE_B"} <= keys
        assert all(h["link"].startswith("http://monitor.example/monitor/alarms?alarm=")
                   for h in _Hook.received)
        time.sleep(1.0)                      # more passes: each alarm goes out once
        assert len(mails) == len({h["alarm"]["alarm_id"] for h in _Hook.received})
        history = requests.get(f"{server.url}/monitor/history?json", timeout=10).json()
        assert history["table"]                 # the first process took its snapshot
    finally:
        stop_server(server)
        smtp.stop()
        hook.shutdown()


def test_metrics_have_latency_errors_and_alarms_and_pass_promtool(monitor):
    server, s = monitor
    requests.get(f"{server.url}/monitor/jobs", timeout=10)
    requests.get(f"{server.url}/monitor/jobs?nosuch=1", timeout=10)
    requests.get(f"{server.url}/api/v1/system/is_alive", timeout=10)
    requests.post(f"{server.url}/server/panda/getJob", data={"siteName": "SITE_A"}, timeout=10)
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    assert 'panda_request_duration_seconds_bucket{endpoint="JobsView",kind="http"' in text
    assert 'panda_request_duration_seconds_count{endpoint="system/is_alive",kind="api"}' in text
    assert 'panda_http_errors_total{code="400",kind="http"}' in text
    assert 'panda_alarms{severity="critical",state="active"} 1.0' in text
    assert 'panda_job_errors_recent{code="1099",component="pilot"} 1.0' in text
    assert "# TYPE panda_dispatch_duration_seconds histogram" in text
    assert "# TYPE panda_watcher_actions_total counter" in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool (Debian's prometheus) is needed (tests/debian-packages.txt)",
                    pytrace=False)
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr


def test_views_stay_correct_as_the_clock_moves(monitor):
    """The default windows are relative to now: a day later only active jobs remain."""
    server, s = monitor
    data = requests.get(f"{server.url}/monitor/jobs?json&date_from="
                        f"{(dt.datetime.utcnow() + dt.timedelta(days=1)):%Y-%m-%d}",
                        timeout=10).json()
    assert {v["value"] for v in data["facets"]["jobstatus"]} <= {
        "defined", "assigned", "activated", "sent", "starting", "running", "holding",
        "transferring"}
