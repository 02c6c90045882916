"""The report of a simulation: read from the database the run left, plus the share samples.

Measures:
- **jobs**: every task's jobs, and whether each ended (its last attempt in a final state);
- **throughput**: jobs ended per simulated hour, and over time (a plot);
- **queue times**: simulated seconds from a job's creation to its dispatch (``sent``);
- **share usage against targets** (the Global Shares paper's measure): at each sample each
  share's fraction of the running cores, against its target renormalised over the shares the
  workload uses; averaged over the *contended* samples, those where every used share had jobs
  waiting (only then is a share's usage the dispatcher's doing, not a lack of work);
- **brokerage**: jobs per site against the site's share of the slots;
- **failures**: failed attempts per site, retries, jobs that failed for good.
Plots are SVG (``server.monitor.plots``); the summary is a Markdown table.
"""
from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

from sqlalchemy import func, select

from .. import db
from ..monitor import plots
from ..shares import DEFAULT_SHARES, parse_shares, targets
from ..taskbuffer import TaskBuffer
from .run import FINAL, RunData

EPOCH = dt.datetime(2000, 1, 1)
#: the most samples a line of ``share_usage.svg`` draws
MAX_PLOT_POINTS = 400


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def brokerage_spread(attempts: dict[str, int], slots: dict[str, int]) -> dict:
    """Attempts per slot over the sites: min, mean, max and the coefficient of variation
    (0 when brokerage gave every site work in proportion to its slots)."""
    per_slot = [attempts.get(name, 0) / n for name, n in slots.items() if n]
    if not per_slot:
        return {"min": 0.0, "mean": 0.0, "max": 0.0, "cv": 0.0}
    mean = sum(per_slot) / len(per_slot)
    var = sum((x - mean) ** 2 for x in per_slot) / len(per_slot)
    return {"min": round(min(per_slot), 2), "mean": round(mean, 2), "max": round(max(per_slot), 2),
            "cv": round(math.sqrt(var) / mean, 3) if mean else 0.0}


def build_report(tb: TaskBuffer, run: RunData) -> dict:
    w = run.workload
    j = db.jobs.c
    h = db.job_history.c
    with db.read(tb.engine) as conn:
        rows = conn.execute(select(j.panda_id, j.task_id, j.serial, j.attempt_nr, j.status,
                                   j.site, j.share, j.creation_time, j.cores)).all()
        sent = dict(conn.execute(select(h.panda_id, func.min(h.time))
                                 .where(h.new_status == "sent").group_by(h.panda_id)).all())
        ended_at = dict(conn.execute(select(h.panda_id, func.max(h.time))
                                     .where(h.new_status.in_(sorted(FINAL)))
                                     .group_by(h.panda_id)).all())
    latest: dict[tuple[int, int], tuple] = {}
    for r in rows:
        key = (r.task_id, r.serial)
        if key not in latest or r.attempt_nr > latest[key].attempt_nr:
            latest[key] = r
    t0 = min((r.creation_time for r in rows), default=None)
    speed = w.speed
    queue_s = [(sent[r.panda_id] - r.creation_time).total_seconds() * speed
               for r in rows if r.panda_id in sent]
    by_task = {}
    names = {v: k for k, v in run.task_ids.items()}
    for (task_id, _serial), r in latest.items():
        t = by_task.setdefault(names.get(task_id, str(task_id)), {"jobs": 0, "finished": 0,
                                                                  "failed": 0, "live": 0})
        t["jobs"] += 1
        t["finished" if r.status == "finished" else "failed" if r.status in FINAL
          else "live"] += 1
    per_site: dict[str, dict[str, int]] = {}
    for r in rows:
        s = per_site.setdefault(r.site or "-", {"attempts": 0, "finished": 0, "failed": 0})
        s["attempts"] += 1
        if r.status == "finished":
            s["finished"] += 1
        elif r.status in FINAL:
            s["failed"] += 1
    slots = {s.name: s.slots for s in w.sites}
    total_slots = sum(slots.values()) or 1
    n_attempts = len(rows) or 1
    brokerage = {name: {"jobs": per_site.get(name, {}).get("attempts", 0),
                        "job_fraction": per_site.get(name, {}).get("attempts", 0) / n_attempts,
                        "slot_fraction": n / total_slots} for name, n in slots.items()}
    spread = brokerage_spread({name: b["jobs"] for name, b in brokerage.items()}, slots)
    ends = sorted(t for t in ended_at.values())
    span_h = ((ends[-1] - t0).total_seconds() * speed / 3600.0) if ends and t0 else 0.0
    with db.read(tb.engine) as conn:
        shares_used = sorted({r[0] for r in conn.execute(select(db.tasks.c.share))})
    tree = parse_shares(w.shares if w.shares is not None else DEFAULT_SHARES)
    all_targets = targets(tree)
    used_total = sum(all_targets.get(s, 0.0) for s in shares_used) or 1.0
    share_targets = {s: all_targets.get(s, 0.0) / used_total for s in shares_used}
    contended = [smp for smp in run.samples
                 if all(smp.waiting.get(s, 0) > 0 for s in shares_used)
                 and sum(smp.running.values()) > 0]
    usage = {}
    for s in shares_used:
        fractions = [smp.running.get(s, 0) / sum(smp.running.values()) for smp in contended]
        mean = sum(fractions) / len(fractions) if fractions else None
        usage[s] = {"target": round(share_targets[s], 4),
                    "usage": None if mean is None else round(mean, 4),
                    "deviation": None if mean is None else round(mean - share_targets[s], 4)}
    every_job_ended = all(t["live"] == 0 for t in by_task.values()) and \
        sum(t["jobs"] for t in by_task.values()) == sum(
            t.n_jobs for t in w.tasks if t.name in run.task_ids)
    return {
        "workload": w.name, "completed": run.completed, "every_job_ended": every_job_ended,
        "speed": speed, "wall_s": round(run.wall_s, 2),
        "sites": len(w.sites), "slots": total_slots, "tasks": by_task,
        "jobs": sum(t["jobs"] for t in by_task.values()),
        "finished": sum(t["finished"] for t in by_task.values()),
        "failed": sum(t["failed"] for t in by_task.values()),
        "attempts": len(rows), "retries": len(rows) - len(latest),
        "throughput_per_hour": round(len(ends) / span_h, 1) if span_h else 0.0,
        "queue_time_s": {"mean": round(sum(queue_s) / len(queue_s), 1) if queue_s else 0.0,
                         "p50": round(_quantile(queue_s, 0.5), 1),
                         "p95": round(_quantile(queue_s, 0.95), 1)},
        "shares": usage, "contended_samples": len(contended), "samples": len(run.samples),
        "brokerage": brokerage, "brokerage_spread": spread,
        "failures_by_site": {k: v["failed"] for k, v in per_site.items() if v["failed"]},
        "submit_errors": run.submit_errors, "pilot_errors": run.pilot_errors[:20],
        "n_pilot_errors": len(run.pilot_errors),
        "_series": {"queue_s": queue_s, "ends": [(e - t0).total_seconds() * speed for e in ends]
                    if t0 else []},
    }


def write_report(report: dict, run: RunData, out: Path) -> list[Path]:
    """report.json, summary.md and the SVG plots in ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    series = report.pop("_series", {})
    files = []
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    files.append(out / "report.json")
    (out / "summary.md").write_text(summary_table(report))
    files.append(out / "summary.md")
    # at most MAX_PLOT_POINTS samples drawn (every k-th): the large scenario's 840 samples of
    # six lines made a 518 KB SVG that drew no more than 400 points would
    drawn = run.samples[::max(1, -(-len(run.samples) // MAX_PLOT_POINTS))]
    xs = [EPOCH + dt.timedelta(seconds=s.t) for s in drawn]
    usage = {}
    for share, u in report["shares"].items():
        usage[share] = [s.running.get(share, 0) / (sum(s.running.values()) or 1)
                        for s in drawn]
        usage[f"{share} target"] = [u["target"]] * len(drawn)
    svgs = {
        "share_usage.svg": plots.lines("share of running cores against target", xs, usage,
                                       ylabel="fraction", name="share-usage"),
        "queue_times.svg": plots.histogram("queue time (simulated s)",
                                           *plots.bins(series.get("queue_s", [])),
                                           xlabel="jobs", name="queue-times"),
        "throughput.svg": _throughput(series.get("ends", [])),
        "sites.svg": _sites(report),
    }
    for name, svg in svgs.items():
        (out / name).write_text(svg)
        files.append(out / name)
    return files


def _throughput(ends: list[float], n: int = 30) -> str:
    if not ends:
        return plots.stacked_bars("jobs ended per interval", [], {}, name="throughput")
    width = max(ends[-1] / n, 1e-9)
    counts = [0] * n
    for e in ends:
        counts[min(n - 1, int(e / width))] += 1
    xs = [f"{i * width / 60:.0f} min" for i in range(n)]
    return plots.stacked_bars("jobs ended per interval (simulated)", xs, {"ended": counts},
                              name="throughput")


def _sites(report: dict, top: int = 40) -> str:
    b = sorted(report["brokerage"].items(), key=lambda kv: -kv[1]["jobs"])[:top]
    return plots.stacked_bars("attempts per site (brokerage)", [k for k, _ in b],
                              {"attempts": [v["jobs"] for _, v in b]}, name="sites")


def summary_table(r: dict) -> str:
    sp = r["brokerage_spread"]
    lines = [f"# simulation {r['workload']}", "",
             "| measure | value |", "|---|---|",
             f"| completed (every job ended) | {r['completed']} ({r['every_job_ended']}) |",
             f"| sites / slots | {r['sites']} / {r['slots']} |",
             f"| jobs: finished / failed | {r['jobs']}: {r['finished']} / {r['failed']} |",
             f"| attempts / retries | {r['attempts']} / {r['retries']} |",
             f"| throughput (jobs per simulated hour) | {r['throughput_per_hour']} |",
             f"| queue time mean / p50 / p95 (simulated s) | {r['queue_time_s']['mean']} / "
             f"{r['queue_time_s']['p50']} / {r['queue_time_s']['p95']} |",
             f"| wall time (s), speed | {r['wall_s']}, {r['speed']}x |",
             f"| attempts per slot over the sites: min / mean / max (cv) | "
             f"{sp['min']} / {sp['mean']} / {sp['max']} ({sp['cv']}) |",
             f"| pilot errors / submit errors | {r['n_pilot_errors']} / "
             f"{len(r['submit_errors'])} |", "",
             f"| share | target | usage ({r['contended_samples']} contended samples) | "
             "deviation |", "|---|---|---|---|"]
    for name, u in sorted(r["shares"].items()):
        lines.append(f"| {name} | {u['target']:.3f} | "
                     f"{'-' if u['usage'] is None else format(u['usage'], '.3f')} | "
                     f"{'-' if u['deviation'] is None else format(u['deviation'], '+.3f')} |")
    fails = sorted(r["failures_by_site"].items(), key=lambda kv: -kv[1])[:10]
    if fails:
        lines += ["", "| site | failed attempts |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in fails]
    return "\n".join(lines) + "\n"
