"""The web monitor: read-only HTML pages over the task buffer.

Pages: overview (jobs per site and state), tasks, one task, one job with its history, sites,
and the scheduler status page (factories and their pilots per site). Failures are grouped by
pilot error code with the shared error table's text.
"""
from __future__ import annotations

import html
from collections import Counter

import tornado.web

from panda_core.errorcodes import error_text
from panda_core.states import JobState

from .handlers import BaseHandler

STYLE = """<style>body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;
margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#eef}nav a{margin-right:1em}.finished,.done{color:#070}.failed{color:#b00}
.cancelled,.aborted{color:#777}</style>"""
JOB_STATES = [str(s) for s in JobState]


def _e(v) -> str:
    return html.escape("" if v is None else str(v))


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


class MonitorHandler(BaseHandler):
    def page(self, title: str, body: str) -> None:
        nav = ('<nav><a href="/">overview</a><a href="/monitor/tasks">tasks</a>'
               '<a href="/monitor/sites">sites</a><a href="/monitor/pilots">pilots</a></nav>')
        self.finish(f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}"
                    f"</title>{STYLE}</head><body>{nav}<h1>{_e(title)}</h1>{body}</body></html>")


def _state_cell(status: str) -> str:
    return f'<span class="{_e(status)}">{_e(status)}</span>'


class Overview(MonitorHandler):
    async def get(self) -> None:
        tb = self.state.tb
        load = await self.run(tb.jobs.site_load)
        tasks = await self.run(tb.tasks.find, None, None, 20)
        states = [s for s in JOB_STATES if any(s in c for c in load.values())]
        rows = [[f'<a href="/monitor/sites/{_e(site)}">{_e(site)}</a>']
                + [str(counts.get(s, 0)) for s in states] for site, counts in sorted(load.items())]
        failures = await self.run(self._failures)
        body = "<h2>Jobs per site</h2>" + _table(["site"] + states, rows)
        body += "<h2>Recent tasks</h2>" + _task_table(tasks)
        body += "<h2>Failures by error code</h2>" + _table(
            ["code", "meaning", "jobs"], [[str(c), _e(error_text(c)), str(n)]
                                          for c, n in failures.most_common()])
        self.page("panda-wms monitor", body)

    def _failures(self) -> Counter:
        jobs = self.state.tb.jobs.find(status="failed", limit=100000)
        return Counter(j["pilot_error_code"] or j["dispatcher_error_code"] for j in jobs)


def _task_table(tasks: list[dict]) -> str:
    return _table(["task", "name", "status", "owner", "modified"], [
        [f'<a href="/monitor/tasks/{t["task_id"]}">{t["task_id"]}</a>', _e(t["name"]),
         _state_cell(t["status"]), _e(t["owner"]), _e(t["modified"])] for t in tasks])


class Tasks(MonitorHandler):
    async def get(self) -> None:
        tasks = await self.run(self.state.tb.tasks.find, None, None, 500)
        self.page("Tasks", _task_table(tasks))


class TaskPage(MonitorHandler):
    async def get(self, task_id: str) -> None:
        task = await self.run(self.state.tb.tasks.get, int(task_id))    # unknown: a 404
        jobs = await self.run(lambda: self.state.tb.jobs.find(task_id=int(task_id), limit=100000))
        counts = Counter(j["status"] for j in jobs)
        body = _table(["field", "value"], [[k, _e(task[k])] for k in
                                          ("name", "status", "owner", "priority", "share", "site",
                                           "created", "modified", "error_dialog")])
        body += _table(list(counts), [[str(n) for n in counts.values()]])
        body += _table(["PandaID", "serial", "attempt", "status", "site", "error"], [
            [f'<a href="/monitor/jobs/{j["panda_id"]}">{j["panda_id"]}</a>', str(j["serial"]),
             str(j["attempt_nr"]), _state_cell(j["status"]), _e(j["site"]),
             _e(j["pilot_error_diag"] or j["dispatcher_error_diag"] or "")] for j in jobs[:2000]])
        self.page(f"Task {task_id}", body)


class JobPage(MonitorHandler):
    async def get(self, panda_id: str) -> None:
        job = await self.run(self.state.tb.jobs.get, int(panda_id))
        if job is None:
            raise tornado.web.HTTPError(404)
        history = await self.run(self.state.tb.jobs.history, int(panda_id))
        fields = [k for k in job if k not in ("files",)]
        body = _table(["field", "value"], [[k, _e(job[k])] for k in fields])
        body += "<h2>Files</h2>" + _table(["type", "scope", "lfn", "size", "checksum", "status"], [
            [_e(f["type"]), _e(f["scope"]), _e(f["lfn"]), _e(f["fsize"]), _e(f["checksum"]),
             _e(f["status"])] for f in job["files"]])
        body += "<h2>History</h2>" + _table(["time", "from", "to", "by"], [
            [_e(h["time"]), _e(h["old_status"]), _e(h["new_status"]), _e(h["actor"])]
            for h in history])
        self.page(f"Job {panda_id}", body)


class Sites(MonitorHandler):
    async def get(self, name: str | None = None) -> None:
        sites = await self.run(self.state.tb.sites.all)
        load = await self.run(self.state.tb.jobs.site_load)
        if name:
            site = next((s for s in sites if s["name"] == name), None)
            if site is None:
                raise tornado.web.HTTPError(404)
            import json
            body = f"<pre>{_e(json.dumps(site['config'], indent=2))}</pre>"
            return self.page(f"Site {name}", body)
        rows = [[f'<a href="/monitor/sites/{_e(s["name"])}">{_e(s["name"])}</a>',
                 _e(s["status"]), _e((s["config"].get("scheduler") or {}).get("backend")),
                 _e(", ".join(f"{k}={v}" for k, v in sorted(load.get(s["name"], {}).items())))]
                for s in sites]
        self.page("Sites", _table(["site", "status", "scheduler", "jobs"], rows))


class Pilots(MonitorHandler):
    async def get(self) -> None:
        summary = await self.run(self.state.tb.pilots.summary)
        now = self.state.tb.clock()
        facs = _table(["factory", "alive", "last seen", "identity"], [
            [_e(f["name"]), _alive(now, f["last_seen"]), _e(f["last_seen"]), _e(f["actor"])]
            for f in summary["factories"]])
        states = sorted({s for c in summary["sites"].values() for s in c})
        per_site = _table(["site"] + states, [[_e(site)] + [str(c.get(s, 0)) for s in states]
                                              for site, c in sorted(summary["sites"].items())])
        feeding = _table(["factory", "site", "submitting", "reason", "failures in a row"], [
            [_e(f["name"]), _e(site), "yes" if st.get("submitting", True) else "<b>no</b>",
             _e(st.get("reason") or ""), _e(st.get("consecutive_failures", ""))]
            for f in summary["factories"]
            for site, st in sorted((f.get("site_status") or {}).items())])
        self.page("Scheduler status", "<h2>Factories</h2>" + facs
                  + "<h2>Pilots per site</h2>" + per_site
                  + "<h2>Sites as each factory sees them</h2>" + feeding)


#: a factory that has not reported for this long is shown as not alive
FACTORY_ALIVE_S = 300


def _alive(now, last_seen) -> str:
    if last_seen is None:
        return "no"
    age = (now - last_seen).total_seconds()
    return "yes" if age <= FACTORY_ALIVE_S else f"no (silent {int(age)} s)"


def routes(kw: dict) -> list:
    return [
        (r"/", Overview, kw),
        (r"/monitor/?", Overview, kw),
        (r"/monitor/tasks/?", Tasks, kw),
        (r"/monitor/tasks/(\d+)", TaskPage, kw),
        (r"/monitor/jobs/(\d+)", JobPage, kw),
        (r"/monitor/sites/?", Sites, kw),
        (r"/monitor/sites/([A-Za-z0-9_.\-]+)", Sites, kw),
        (r"/monitor/pilots/?", Pilots, kw),
    ]
