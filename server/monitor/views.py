"""The monitor's handlers: thin, one per view, over ``handlers.BaseHandler``.

Each view's ``build`` reads its parameters (``params.Args``: a bad one is a 400 with the reason)
and calls the query modules, in the thread pool; the same dict is the JSON reply (``?json`` or
``Accept: application/json``) and the template's data. Templates are Tornado's own (autoescaped,
no extra dependency, ``templates/``); every page shows the alarm state.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import tornado.web
from sqlalchemy import select

from .. import db
from ..apibase import ApiError
from ..auth import AuthError
from ..handlers import BaseHandler, dumps
from ..taskbuffer import Conflict, NotFound
from . import (analyzer, dash, errorcatalog, errorsview, history, incidents, jobpage, jobsview,
               logfiles, plots, plotsview, sitesview, tasksview, usersview)
from .alarms import Alarms
from .params import Args, ParamError, read_window
from .selection import ALL_STATES, FACETS, FIELDS_BY_NAME, read_job_selection

PACKAGE = Path(__file__).resolve().parent
TEMPLATES = PACKAGE / "templates"
STATIC = PACKAGE / "static"


@dataclass
class Page:
    data: dict                                   # the JSON reply, also the template's data
    html: dict = field(default_factory=dict)     # what only the page needs (plots, links)
    redirect: str | None = None


def fmt_t(value) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}" if isinstance(value, dt.datetime) else ""


def fmt_s(seconds) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def url(path: str, **params) -> str:
    items = {k: v for k, v in params.items() if v is not None}
    return path + ("?" + urllib.parse.urlencode(items) if items else "")


class MonitorHandler(BaseHandler):
    template = ""
    nav = ""

    def get_template_path(self) -> str:
        return str(TEMPLATES)

    def wants_json(self) -> bool:
        accept = self.request.headers.get("Accept", "")
        return "json" in self.request.query_arguments or accept.strip() in (
            "application/json", "text/json")

    async def get(self, *path: str) -> None:
        args = Args.from_request(self.request)
        try:
            page = await self.page(args, *path)
        except ParamError as exc:
            return self.fail(400, str(exc))
        except NotFound as exc:
            return self.fail(404, str(exc))
        if page.redirect:
            return self.redirect(page.redirect)
        self.set_header("Cache-Control", "no-cache")
        if self.wants_json():
            self.set_header("Content-Type", "application/json")
            return self.finish(dumps(page.data))
        self.render(self.template, d=page.data, h={**page.html, **self.html_extra()}, args=args,
                    q=lambda **kw: self.request.path + "?" + args.query(drop=("json",), **kw))

    def html_extra(self) -> dict:
        """What the page needs from the handler itself (on the event loop, not in the pool)."""
        return {}

    async def page(self, args: Args, *path: str) -> Page:
        """The view's data: ``build`` in the thread pool (a view may run its queries side by
        side instead)."""
        return await self.run(self._page, args, *path)

    def _page(self, args: Args, *path: str) -> Page:
        page = self.build(args, *path)
        if not page.redirect:
            args.finish()
            page.data["alarms"] = Alarms(self.state.tb).counts()
        return page

    def build(self, args: Args, *path: str) -> Page:
        raise NotImplementedError

    def get_template_namespace(self) -> dict:
        ns = super().get_template_namespace()
        ns.update(fmt_t=fmt_t, fmt_s=fmt_s, url=url, nav=self.nav, states=ALL_STATES,
                  dumps=lambda v: json.dumps(v, indent=2, default=str, sort_keys=True))
        return ns

    def fail(self, status: int, message: str) -> None:
        self.set_status(status)
        if self.wants_json():
            self.set_header("Content-Type", "application/json")
            return self.finish(dumps({"error": message}))
        self.render("error.html", status=status, message=message, d={"alarms": None},
                    h={}, args=None, q=None)

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs["exc_info"][1] if "exc_info" in kwargs else None
        refusal = self.refusal(exc)
        status, message = refusal or (status_code, "internal server error"
                                      if status_code >= 500 else self._reason)
        self.clear()
        self.fail(status, message)

    @property
    def tb(self):
        return self.state.tb


def _facet_links(facets: dict[str, list[dict]], args: Args, path: str) -> dict:
    """Each facet value's drill-down link: this URL plus ``&field=value``."""
    return {name: [{**v, "link": path + "?" + args.query(drop=("json",), **{name: v["value"]})}
                   for v in values] for name, values in facets.items()}


# ---------------------------------------------------------------------- dashboard
class DashView(MonitorHandler):
    template, nav = "dash.html", "dash"

    def build(self, args: Args) -> Page:
        sel = read_job_selection(args, self.tb.clock())
        region = args.text("region")
        data = dash.dashboard(self.tb, sel, region)
        data["selection"] = sel.summary()
        cells = {(r["site"], s): r["states"][s] for r in data["sites"] for s in ALL_STATES}
        heat = plots.heat_map(
            "jobs per site and state", [r["site"] for r in data["sites"]], ALL_STATES, cells,
            link=lambda site, s: url("/monitor/jobs", computingsite=site, jobstatus=s,
                                     **_window_params(args)), name="heatmap")
        return Page(data, {"heat": heat, "window": sel.window.label, "win": _window_params(args)})


def _window_params(args: Args) -> dict:
    return {k: args.raw[k][-1] for k in ("hours", "days", "date_from", "date_to")
            if k in args.raw}


# ---------------------------------------------------------------------- jobs
class JobsView(MonitorHandler):
    template, nav = "jobs.html", "jobs"

    async def page(self, args: Args) -> Page:
        """The facets, the error box, the table and the alarm state: four independent
        statements, run side by side on the pool's connections."""
        tb = self.tb
        now = tb.clock()
        sel = read_job_selection(args, now)
        page = jobsview.read_page(args)
        args.finish()
        (facets, total), errors, (rows, nxt), alarms = await asyncio.gather(
            self.run(jobsview.facets, tb, sel), self.run(errorsview.by_code, tb, sel),
            self.run(jobsview.rows, tb, sel, page), self.run(Alarms(tb).counts))
        rows = [jobsview.decorate(r, now) for r in rows]
        data = {"selection": sel.summary(), "description": sel.describe(),
                "in_selection": total, "capped": total >= sel.limit, "facets": facets,
                "errors": errors[:10], "jobs": rows, "alarms": alarms,
                "next": ("/monitor/jobs?" + args.query(before=nxt)) if nxt else None}
        return Page(data, {"facet_links": _facet_links(facets, args, "/monitor/jobs"),
                           "labels": {f.name: f.label for f in FACETS},
                           "window": sel.window.label,
                           "next_html": ("/monitor/jobs?" + args.query(drop=("json",),
                                                                       before=nxt))
                           if nxt else None, "page": page})


class JobView(MonitorHandler):
    template, nav = "job.html", "jobs"

    def build(self, args: Args, panda_id: str | None = None) -> Page:
        pid = int(panda_id) if panda_id else args.integer("pandaid", lo=1)
        if pid is None:
            raise ParamError("give the job's PandaID: /monitor/jobs/<PandaID> or ?pandaid=")
        data = jobpage.job_page(self.tb, pid)
        if data is None:
            raise NotFound(f"no job {pid}")
        log = logfiles.list_log(self.tb, {**data["job"], "files": data["files"]})
        data["log"] = {"lfn": log.lfn, "surl": log.surl, "error": log.error,
                       "members": log.members}
        return Page(data)


class JobLogView(MonitorHandler):
    template, nav = "joblog.html", "jobs"

    def build(self, args: Args, panda_id: str) -> Page:
        job = self.tb.jobs.get(int(panda_id))
        if job is None:
            raise NotFound(f"no job {panda_id}")
        name = args.text("file")
        if name is None:
            log = logfiles.list_log(self.tb, job)
            return Page({"panda_id": job["panda_id"], "lfn": log.lfn, "surl": log.surl,
                         "error": log.error, "members": log.members})
        try:
            text, cut = logfiles.read_member(self.tb, job, name)
        except logfiles.LogUnavailable as exc:
            raise NotFound(str(exc)) from None
        return Page({"panda_id": job["panda_id"], "file": name, "text": text, "cut": cut})


# ---------------------------------------------------------------------- tasks
class TasksView(MonitorHandler):
    template, nav = "tasks.html", "tasks"

    def build(self, args: Args) -> Page:
        sel = tasksview.read_task_selection(args, self.tb.clock())
        data = tasksview.task_list(self.tb, sel)
        data["selection"] = {"filters": sel.filters, "window": sel.window.label,
                             "limit": sel.limit}
        return Page(data, {"facet_links": _facet_links(
            {{"owner": "username"}.get(k, k): v for k, v in data["facets"].items()},
            args, "/monitor/tasks")})


class TaskView(MonitorHandler):
    template, nav = "task.html", "tasks"

    def build(self, args: Args, task_id: str | None = None) -> Page:
        tid = int(task_id) if task_id else args.integer("jeditaskid", lo=1)
        if tid is None:
            raise ParamError("give the task: /monitor/tasks/<jeditaskid> or ?jeditaskid=")
        task = self.tb.tasks.get(tid)
        counts = self.tb.tasks.job_counts(tid)
        hist = tasksview.histograms(self.tb, tid)
        data = {"task": task, "jobs": counts, **tasksview.progress(counts),
                "datasets": tasksview.datasets(self.tb, tid), "histograms": hist,
                "event_ranges": tasksview.event_ranges(self.tb, tid)}
        svgs = [plots.stacked_bars(
            f"{h['label']} of ended jobs",
            [f"{h['edges'][i]:.3g}" for i in range(len(h["finished"]))],
            {"finished": h["finished"], "failed": h["failed"]} if h["edges"] else {},
            name=f"task-{key}") for key, h in hist.items()]
        return Page(data, {"plots": svgs})


# ---------------------------------------------------------------------- errors
class ErrorsView(MonitorHandler):
    template, nav = "errors.html", "errors"

    async def page(self, args: Args) -> Page:
        """Codes, groups, the timeline and the alarm state side by side."""
        tb = self.tb
        sel = read_job_selection(args, tb.clock(), default_limit=errorsview.DEFAULT_ERROR_LIMIT)
        args.finish()
        codes, groups, timeline, alarms = await asyncio.gather(
            self.run(errorsview.by_code, tb, sel), self.run(errorsview.by_group, tb, sel),
            self.run(errorsview.over_time, tb, sel), self.run(Alarms(tb).counts))
        data = {"selection": sel.summary(), "description": sel.describe(),
                "by_code": codes, "by_site": groups["site"], "by_user": groups["user"],
                "by_task": groups["task"], "over_time": timeline,
                "failed": sum(r["failed"] for r in groups["site"]), "alarms": alarms}
        win = _window_params(args)

        def code_link(name: str, i: int | None = None) -> str | None:
            if name == "other" or ":" not in name:
                return None
            comp, code = name.split(":")
            return url("/monitor/jobs", jobstatus="failed",
                       **{errorcatalog.BY_NAME[comp].param: code}, **win)
        svg = plots.stacked_bars("failed jobs over time by error", timeline["buckets"],
                                 timeline["series"], link=code_link, legend_link=code_link,
                                 name="errors-over-time")
        top = codes[:10]
        bars = plots.stacked_bars(
            "failed jobs by error code", [f"{c['component']}:{c['code']}" for c in top],
            {"failed": [c["count"] for c in top]} if top else {},
            link=lambda _n, i: code_link(f"{top[i]['component']}:{top[i]['code']}"),
            name="errors-by-code")
        return Page(data, {"plots": [svg, bars], "window": sel.window.label,
                           "jobs_q": args.query(drop=("json", "limit"))})


# ---------------------------------------------------------------------- sites and pilots
class SitesView(MonitorHandler):
    template, nav = "sites.html", "sites"

    def build(self, args: Args) -> Page:
        return Page({"sites": sitesview.site_list(self.tb)})


class SiteView(MonitorHandler):
    template, nav = "site.html", "sites"

    def build(self, args: Args, name: str) -> Page:
        data = sitesview.site_page(self.tb, name)
        sel = read_job_selection(args, self.tb.clock(), fixed={"computingsite": name})
        data["errors"] = errorsview.by_code(self.tb, sel)[:20]
        data["waiting"] = analyzer.analyze(self.tb, name)
        a = db.alarms.c
        with db.read(self.tb.engine) as conn:
            data["site_alarms"] = [dict(r._mapping) for r in conn.execute(
                select(db.alarms).where(a.site == name, a.state != "cleared")
                .order_by(a.alarm_id.desc()).limit(20))]
        return Page(data, {"window": sel.window.label})


class PilotsView(MonitorHandler):
    """The scheduler status page: which factories are alive and what they submitted."""
    template, nav = "pilots.html", "pilots"
    ALIVE_S = 300

    def build(self, args: Args) -> Page:
        hours = args.integer("hours", 24, lo=1, hi=24 * 400)
        summary = self.tb.pilots.summary()
        now = self.tb.clock()
        for f in summary["factories"]:
            age = (now - f["last_seen"]).total_seconds() if f["last_seen"] else None
            f["alive"] = age is not None and age <= self.ALIVE_S
            f["silent_s"] = None if f["alive"] or age is None else int(age)
        since = now - dt.timedelta(hours=hours)
        submitted = sitesview.factory_submissions(self.tb, since)
        return Page({"factories": summary["factories"], "sites": summary["sites"],
                     "submitted": submitted, "hours": hours,
                     "nodes": sitesview.worker_nodes(self.tb, since)})


# ---------------------------------------------------------------------- users
class UsersView(MonitorHandler):
    template, nav = "users.html", "users"

    def build(self, args: Args) -> Page:
        sel = read_job_selection(args, self.tb.clock(), default_hours=24 * 7)
        rows, total = usersview.users(self.tb, sel)
        return Page({"selection": sel.summary(), "users": rows, "in_selection": total,
                     "capped": total >= sel.limit}, {"window": sel.window.label})


class UserView(MonitorHandler):
    template, nav = "user.html", "users"

    def build(self, args: Args, name: str) -> Page:
        sel = read_job_selection(args, self.tb.clock(), default_hours=24 * 7,
                                 fixed={"produsername": name})
        wanted = [FIELDS_BY_NAME[k] for k in ("jobstatus", "computingsite", "jeditaskid")]
        facets, total = jobsview.facets(self.tb, sel, wanted)
        tasks = self.tb.tasks.find(owner=name, limit=50)
        counts = tasksview.job_counts(self.tb, [t["task_id"] for t in tasks])
        fin = sum(v["count"] for v in facets["jobstatus"] if v["value"] == "finished")
        fail = sum(v["count"] for v in facets["jobstatus"] if v["value"] == "failed")
        data = {"user": name, "selection": sel.summary(), "in_selection": total,
                "states": facets["jobstatus"], "sites": facets["computingsite"],
                "success_pct": round(100.0 * fin / (fin + fail), 1) if fin + fail else None,
                "tasks": [{"task_id": t["task_id"], "name": t["name"], "status": t["status"],
                           "modified": t["modified"], "jobs": counts.get(t["task_id"], {})}
                          for t in tasks]}
        return Page(data, {"window": sel.window.label, "win": _window_params(args)})


# ---------------------------------------------------------------------- search
class SearchView(MonitorHandler):
    template, nav = "search.html", ""

    def build(self, args: Args) -> Page:
        text = (args.text("q") or "").strip()
        target = self.route(text) if text else None
        if target and not self.wants_json():
            return Page({}, redirect=target)
        return Page({"q": text, "found": target})

    def route(self, text: str) -> str | None:
        """A PandaID or task id, a site, a user or a task name: its page."""
        tb = self.tb
        with db.read(tb.engine) as conn:
            if text.isdigit() and len(text) < 19:
                n = int(text)
                if any(conn.execute(select(t.c.panda_id).where(t.c.panda_id == n)).first()
                       for t in (db.jobs, db.jobs_archive)):
                    return f"/monitor/jobs/{n}"
                if conn.execute(select(db.tasks.c.task_id).where(db.tasks.c.task_id == n)
                                ).first():
                    return f"/monitor/tasks/{n}"
                return None
            if conn.execute(select(db.sites.c.name).where(db.sites.c.name == text)).first():
                return "/monitor/sites/" + urllib.parse.quote(text)
            if conn.execute(select(db.tasks.c.task_id).where(db.tasks.c.owner == text)
                            .limit(1)).first():
                return "/monitor/users/" + urllib.parse.quote(text)
            named = conn.execute(select(db.tasks.c.task_id).where(db.tasks.c.name == text)
                                 .limit(2)).all()
            if len(named) == 1:
                return f"/monitor/tasks/{named[0][0]}"
        if named or "*" in text:
            return url("/monitor/tasks", taskname=text, days=400)
        return None


# ---------------------------------------------------------------------- operations
class AlarmsView(MonitorHandler):
    template, nav = "alarms.html", "alarms"

    def build(self, args: Args) -> Page:
        show = args.choice("state", ("open", "active", "acknowledged", "cleared", "all"), "open")
        states = {"open": ("active", "acknowledged"), "all": ("active", "acknowledged",
                                                              "cleared")}.get(show, (show,))
        limit = args.integer("display_limit", 200, lo=1, hi=5000)
        before = args.integer("before", lo=1)
        alarm_id = args.integer("alarm", lo=1)
        alarms = Alarms(self.tb)
        rows = [alarms.get(alarm_id)] if alarm_id else alarms.listing(states, limit, before)
        return Page({"state": show, "list": rows,
                     "next": url("/monitor/alarms", state=show, before=rows[-1]["alarm_id"])
                     if len(rows) == limit else None})

    def html_extra(self) -> dict:
        return {"xsrf": self.xsrf_form_html()}


class AlarmAckView(MonitorHandler):
    """POST from the alarm panel's button (a shifter with a certificate or a token)."""

    async def post(self, alarm_id: str) -> None:
        try:
            self.check_xsrf_cookie()
            identity = self.caller(("user", "admin"), "acknowledge alarms")
            await self.run(Alarms(self.tb).acknowledge, int(alarm_id), identity.subject)
        except (ApiError, AuthError) as exc:
            return self.fail(403, str(exc))
        except tornado.web.HTTPError as exc:
            return self.fail(exc.status_code, exc.log_message or exc.reason or "refused")
        except NotFound as exc:
            return self.fail(404, str(exc))
        except Conflict as exc:
            return self.fail(409, str(exc))
        self.redirect("/monitor/alarms")


class IncidentsView(MonitorHandler):
    template, nav = "incidents.html", "incidents"

    def build(self, args: Args) -> Page:
        window = read_window(args, self.tb.clock(), 24, args.has("pandaid"))
        filters = {"component": args.text("component"),
                   "level": args.choice("level", incidents.LEVELS, "WARNING"),
                   "site": args.text("computingsite"), "panda_id": args.integer("pandaid")}
        limit = args.integer("display_limit", 200, lo=1, hi=5000)
        before = args.integer("before", lo=1)
        rows = incidents.listing(self.tb, window, limit=limit, before=before, **filters)
        nxt = ("/monitor/incidents?" + args.query(before=rows[-1]["row_id"])) \
            if len(rows) == limit else None
        return Page({"window": window.label, "filters": filters, "incidents": rows,
                     "next": nxt}, {"components": incidents.COMPONENT_LOGGERS})


class HistoryView(MonitorHandler):
    template, nav = "history.html", "history"

    def build(self, args: Args) -> Page:
        now = self.tb.clock()
        window = read_window(args, now, 24 * 7, False)
        site = args.text("computingsite")
        sites = site.split("|") if site else None
        since, until = window.since, window.until or now
        running = history.series(self.tb, since, until, "running", sites=sites)
        finished = history.series(self.tb, since, until, "finished", sites=sites)
        failed = history.series(self.tb, since, until, "failed", by="total", sites=sites)
        rows = history.table(self.tb, since, until, limit=500)
        svgs = [plots.lines("running jobs per site", running["times"], running["series"],
                            legend_link=lambda s: url("/monitor/history", computingsite=s),
                            name="history-running"),
                plots.lines("finished jobs per site (per bucket)", finished["times"],
                            finished["series"], name="history-finished"),
                plots.lines("failed jobs (per bucket)", failed["times"], failed["series"],
                            name="history-failed")]
        return Page({"window": window.label, "running": running, "finished": finished,
                     "failed": failed, "table": rows}, {"plots": svgs})


class WaitingView(MonitorHandler):
    """The status analyzer: why jobs wait."""
    template, nav = "waiting.html", "waiting"

    def build(self, args: Args) -> Page:
        site = args.text("computingsite")
        return Page({"groups": analyzer.analyze(self.tb, site), "site": site})


class PlotsView(MonitorHandler):
    template, nav = "plots.html", "plots"

    def build(self, args: Args) -> Page:
        now = self.tb.clock()
        sel = read_job_selection(args, now)
        win = _window_params(args)
        counts = dash.site_state_counts(self.tb, sel)
        sites = sorted(counts)
        heat = plots.heat_map("jobs per site and state", sites, ALL_STATES,
                              {(s, st): counts[s].get(st, 0) for s in sites for st in ALL_STATES},
                              link=lambda s, st: url("/monitor/jobs", computingsite=s,
                                                     jobstatus=st, **win), name="heatmap")
        timeline = errorsview.over_time(self.tb, sel)
        errors = plots.stacked_bars("failed jobs over time by error", timeline["buckets"],
                                    timeline["series"], name="errors-over-time")
        hist_since = now - dt.timedelta(days=7)
        running = history.series(self.tb, hist_since, now, "running")
        finished = history.series(self.tb, hist_since, now, "finished")
        durations = plotsview.state_durations(self.tb, sel)
        hists = plotsview.duration_histograms(durations)
        shares = plotsview.share_usage(self.tb)
        svgs = [heat,
                plots.lines("running jobs per site (last 7 days)", running["times"],
                            running["series"], name="running-per-site"),
                plots.lines("finished jobs per site (last 7 days)", finished["times"],
                            finished["series"], name="finished-per-site"),
                errors,
                plots.histogram("queue time: activated to running (s)", *hists["queue"],
                                xlabel="jobs", name="queue-time")]
        svgs += [plots.histogram(f"time in {state} (s)", *hists[state], xlabel="jobs",
                                 name=f"time-in-{state}")
                 for state in ALL_STATES if state in hists and hists[state][1]]
        svgs.append(plots.stacked_bars(
            "share usage against targets (% of running cores)", [s["share"] for s in shares],
            {"target": [s["target_pct"] for s in shares],
             "used": [s["used_pct"] for s in shares]} if shares else {},
            ylabel="%", name="shares"))
        return Page({"selection": sel.summary(), "sites": counts, "errors": timeline,
                     "durations": {"jobs": durations["jobs"], "queue_s": hists["queue"],
                                   "per_state": {k: v for k, v in hists.items()
                                                 if k != "queue"}},
                     "shares": shares, "running": running, "finished": finished},
                    {"plots": svgs, "window": sel.window.label})


class ErrorCodesView(MonitorHandler):
    template, nav = "errorcodes.html", "errors"

    def build(self, args: Args) -> Page:
        return Page({"codes": errorcatalog.catalogue()})


class StaticHandler(tornado.web.StaticFileHandler):
    """The monitor's CSS and script, from the package (no CDN)."""


def routes(kw: dict) -> list:
    ids = r"(\d{1,18})"
    name = r"([^/?]{1,255})"
    return [
        (r"/", DashView, kw),
        (r"/monitor/?", DashView, kw),
        (r"/monitor/dash/?", DashView, kw),
        (r"/monitor/jobs/?", JobsView, kw),
        (rf"/monitor/jobs/{ids}/?", JobView, kw),
        (rf"/monitor/job/{ids}/?", JobView, kw),
        (r"/monitor/job/?", JobView, kw),
        (rf"/monitor/jobs/{ids}/logs/?", JobLogView, kw),
        (r"/monitor/tasks/?", TasksView, kw),
        (rf"/monitor/tasks/{ids}/?", TaskView, kw),
        (rf"/monitor/task/{ids}/?", TaskView, kw),
        (r"/monitor/task/?", TaskView, kw),
        (r"/monitor/errors/?", ErrorsView, kw),
        (r"/monitor/errorcodes/?", ErrorCodesView, kw),
        (r"/monitor/sites/?", SitesView, kw),
        (rf"/monitor/sites/{name}/?", SiteView, kw),
        (r"/monitor/pilots/?", PilotsView, kw),
        (r"/monitor/users/?", UsersView, kw),
        (rf"/monitor/users/{name}/?", UserView, kw),
        (r"/monitor/search/?", SearchView, kw),
        (r"/monitor/alarms/?", AlarmsView, kw),
        (rf"/monitor/alarms/{ids}/ack", AlarmAckView, kw),
        (r"/monitor/incidents/?", IncidentsView, kw),
        (r"/monitor/history/?", HistoryView, kw),
        (r"/monitor/waiting/?", WaitingView, kw),
        (r"/monitor/plots/?", PlotsView, kw),
        (r"/monitor/static/(.*)", StaticHandler, {"path": str(STATIC)}),
    ]

