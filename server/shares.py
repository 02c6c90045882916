"""Global shares and job priorities: which activated job a pilot gets next.

Shares are PanDA's nested global shares: a tree whose siblings' values are percentages of their
parent (e.g. production 80 {mc 60, reprocessing 40}, analysis 20). The tree lives in the
``global_shares`` table so every server process sees the same one; it comes from a YAML/JSON file
(``panda server --shares FILE``), the API (admin), or ``DEFAULT_SHARES``.

Dispatch is share-aware through the dispatcher's ``job_chooser``: at each level of the tree the
share furthest below its target over the whole grid (running cores per share summed over every
site, against the target fraction, as PanDA's global shares) comes first among the shares with
activated jobs at the pilot's site, then by current priority. Jobs whose share is not in the
tree come last, so they still run when nothing else waits. ``recompute_priorities`` (a periodic job) sets each
waiting job's ``current_priority`` from the priority hooks: priorities age with
waiting time and drop as the owner's running count grows.
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (bindparam, case, delete, func, insert, literal_column, select, text,
                        update)

from . import db
from .taskbuffer import TaskBuffer

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_DEPTH = 6
#: job states whose cores count as a share's usage
RUNNING_STATES = ("sent", "starting", "running")
#: job states whose current priority the periodic recompute maintains
WAITING_STATES = ("assigned", "activated")


class ShareError(ValueError):
    """A share tree that cannot be used; the message names the share and why."""


@dataclass
class Share:
    name: str
    value: float                      # percent of the parent
    children: list["Share"] = field(default_factory=list)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "value": self.value}
        if self.children:
            out["children"] = [c.to_dict() for c in self.children]
        return out


DEFAULT_SHARES = [
    {"name": "production", "value": 80, "children": [
        {"name": "mc", "value": 60},
        {"name": "reprocessing", "value": 40}]},
    {"name": "analysis", "value": 20},
]


# ---------------------------------------------------------------------- the tree
def parse_shares(data: Any) -> list[Share]:
    """Validate a share tree (a list of {name, value, children}, or {"shares": [...]})."""
    if isinstance(data, dict) and set(data) == {"shares"}:
        data = data["shares"]
    seen: set[str] = set()
    return _parse_level(data, "shares", seen, 1)


def _parse_level(items: Any, path: str, seen: set[str], depth: int) -> list[Share]:
    if depth > MAX_DEPTH:
        raise ShareError(f"{path}: shares nest at most {MAX_DEPTH} levels deep")
    if not isinstance(items, list) or not items:
        raise ShareError(f"{path}: must be a non-empty list of shares")
    out = []
    for i, item in enumerate(items):
        where = f"{path}[{i}]"
        if not isinstance(item, dict):
            raise ShareError(f"{where}: must be a mapping with name and value")
        unknown = sorted(set(item) - {"name", "value", "children"})
        if unknown:
            raise ShareError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}")
        name = item.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ShareError(f"{where}.name: letters, digits and _.- only, at most 64 "
                             f"characters (got {name!r})")
        if name in seen:
            raise ShareError(f"{where}.name: share {name!r} appears twice")
        seen.add(name)
        value = item.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
            raise ShareError(f"{where}.value ({name}): a percentage from 0 to 100 (got {value!r})")
        children = (_parse_level(item["children"], f"{where}.children", seen, depth + 1)
                    if item.get("children") else [])
        out.append(Share(name, float(value), children))
    total = sum(s.value for s in out)
    if abs(total - 100.0) > 0.01:
        names = ", ".join(f"{s.name}={s.value:g}" for s in out)
        raise ShareError(f"{path}: sibling shares must add up to 100 %, got {total:g} ({names})")
    return out


def load_shares_file(path: str | Path) -> list[Share]:
    """A share tree from a YAML or JSON file; ShareError says what is wrong and where."""
    import yaml

    from site_configs.yamlsafe import load as load_yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ShareError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = load_yaml(text)           # JSON is YAML too; no alias bombs, no duplicate keys
    except yaml.YAMLError as exc:
        raise ShareError(f"{path}: not valid YAML/JSON: {exc}") from None
    try:
        return parse_shares(data)
    except ShareError as exc:
        raise ShareError(f"{path}: {exc}") from None


def walk(tree: list[Share], parent: str | None = None):
    """(share, parent name, position) for every share, parents before children."""
    for pos, s in enumerate(tree):
        yield s, parent, pos
        yield from walk(s.children, s.name)


def targets(tree: list[Share]) -> dict[str, float]:
    """Every share's fraction of the whole (0..1)."""
    out: dict[str, float] = {}

    def rec(level: list[Share], frac: float) -> None:
        for s in level:
            out[s.name] = frac * s.value / 100.0
            rec(s.children, out[s.name])
    rec(tree, 1.0)
    return out


def rank_shares(tree: list[Share], running: dict[str, int]) -> list[str]:
    """Share names, the one to serve first first.

    At each level the siblings are ordered by how far their subtree's running jobs fall below
    their target fraction of the level (ties: larger target first, then configured order); a
    share's own jobs come after its children's.
    """
    def subtotal(s: Share) -> int:
        return running.get(s.name, 0) + sum(subtotal(c) for c in s.children)

    def rec(level: list[Share]) -> list[str]:
        total_value = sum(s.value for s in level) or 1.0
        subs = {s.name: subtotal(s) for s in level}
        total = sum(subs.values())

        def deficit(s: Share) -> float:
            actual = subs[s.name] / total if total else 0.0
            return s.value / total_value - actual
        order = sorted(enumerate(level), key=lambda p: (-deficit(p[1]), -p[1].value, p[0]))
        out: list[str] = []
        for _, s in order:
            out += rec(s.children) + [s.name]
        return out
    return rec(tree)


def usage_from_counts(counts: dict[tuple[str, str], tuple[int, int]]
                      ) -> tuple[dict[str, int], dict[str, int]]:
    """(cores in use per share, activated jobs per share) from job counters
    {(share, status): (jobs, cores)} (one site's, or summed over every site)."""
    running: dict[str, int] = {}
    waiting: dict[str, int] = {}
    for (share, status), (n, cores) in counts.items():
        if status == "activated":
            waiting[share] = waiting.get(share, 0) + n
        elif status in RUNNING_STATES:
            running[share] = running.get(share, 0) + int(cores or n)
    return running, waiting


def grid_running(by_site: dict[str, dict[tuple[str, str], tuple[int, int]]]) -> dict[str, int]:
    """Cores in use per share summed over every site of a counter snapshot: the usage the
    shares are ranked by (PanDA's global shares are grid-wide, not per site)."""
    total: dict[str, int] = {}
    for counts in by_site.values():
        for share, cores in usage_from_counts(counts)[0].items():
            total[share] = total.get(share, 0) + cores
    return total


# ---------------------------------------------------------------------- storage
class ShareStore:
    """The share tree in the database, shared by every server process."""

    def __init__(self, tb: TaskBuffer, default: list[Share] | None = None):
        self.tb = tb
        self.default = default if default is not None else parse_shares(DEFAULT_SHARES)

    def load(self) -> list[Share]:
        with db.read(self.tb.engine) as conn:
            rows = [dict(r._mapping) for r in conn.execute(
                select(db.global_shares).order_by(db.global_shares.c.position))]
        if not rows:
            return self.default
        by_parent: dict[str | None, list[dict]] = {}
        for r in rows:
            by_parent.setdefault(r["parent"], []).append(r)

        def build(parent: str | None) -> list[Share]:
            return [Share(r["name"], r["value"], build(r["name"]))
                    for r in by_parent.get(parent, [])]
        return build(None)

    def save(self, tree: list[Share]) -> None:
        """Replace the whole tree in one transaction."""
        parse_shares([s.to_dict() for s in tree])          # re-validate whatever the caller built
        now = self.tb.clock()
        rows = [{"name": s.name, "parent": parent, "value": s.value, "position": pos,
                 "updated": now} for s, parent, pos in walk(tree)]
        with self.tb.engine.begin() as conn:
            conn.execute(delete(db.global_shares))
            conn.execute(insert(db.global_shares), rows)
        log.info("global shares set: %s", ", ".join(f"{r['name']}={r['value']:g}" for r in rows))

    def set_values(self, values: dict[str, Any]) -> list[Share]:
        """Change some shares' values; the resulting tree must still add up."""
        tree = self.load()
        known = {s.name: s for s, _, _ in walk(tree)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ShareError(f"unknown share(s): {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
        data = [s.to_dict() for s in tree]

        def apply(items: list[dict]) -> None:
            for item in items:
                if item["name"] in values:
                    item["value"] = values[item["name"]]
                apply(item.get("children", []))
        apply(data)
        new = parse_shares(data)
        self.save(new)
        return new


# ---------------------------------------------------------------------- dispatch order
@dataclass
class _GridRanking:
    """The grid-wide ranking as of a counter snapshot, plus what this process dispatched
    since (at any site: every site's pilots see the same usage)."""
    taken: float
    tree: list[Share]
    known: set[str]
    names: list[str]
    running: dict[str, int]
    stale: bool = False               # ``running`` changed since ``names`` was ranked

    def ranked(self, lock: threading.Lock) -> list[str]:
        """``names``, ranked again first if the usage changed: once per getJob that needs
        it, not once per job dispatched or ended (a ranking costs ~20 us)."""
        if self.stale:
            with lock:
                if self.stale:
                    self.names = rank_shares(self.tree, self.running)
                    self.stale = False
        return self.names


class ShareChooser:
    """Share-aware dispatch for the dispatcher.

    ``share_plan(site)``: the shares to ask, best first; the dispatcher asks share by share,
    so each ask is an index range read (``ix_jobs_share_dispatch``) rather than a sort of every
    activated job of the site. ``__call__(site)`` is the same order as ORDER BY clauses (a
    ``CASE`` on the share) for ``Jobs.dispatch(order_by=...)``. The order is by grid-wide
    usage (cores in use per share summed over every site, as PanDA's global shares: a share
    whose jobs can run at only some sites still reaches its target of the whole grid); which
    shares are asked at a site is the shares with activated jobs there. Usage comes from the
    job counters (``taskbuffer.counts``), never from counting the jobs table: with ``ttl_s``
    > 0 from the process's counter snapshot, refreshed by one thread at most every ``ttl_s``
    seconds for every site at once (a getJob storm at a thousand sites reads it once, and the
    grid-wide sum is made once per snapshot); with ``ttl_s`` 0 exactly as committed now. With
    one share waiting at the site both return None and the plain priority order is used.
    """

    def __init__(self, tb: TaskBuffer, store: ShareStore | None = None, ttl_s: float = 2.0):
        self.tb = tb
        self.store = store or ShareStore(tb)
        self.ttl_s = ttl_s
        # per site: (snapshot's ``taken``, activated jobs per share there)
        self._waiting: dict[str, tuple[float, dict[str, int]]] = {}
        self._grid: _GridRanking | None = None
        self._tree: tuple[float, list[Share], set[str]] | None = None
        self._lock = threading.Lock()

    def _ranked(self, site: str) -> tuple[list[str], set[str], dict[str, int]]:
        """(tree's share names best first by grid-wide usage, all tree names, activated jobs
        per share at ``site``)."""
        if self.ttl_s <= 0:
            tree = self.store.load()
            names, _, waiting = self.ranking(site, tree)
            return names, {s.name for s, _, _ in walk(tree)}, waiting
        snap = self.tb.counts.snapshot(self.ttl_s)
        grid = self._grid_for(snap)
        hit = self._waiting.get(site)
        if hit is None or hit[0] != snap.taken:
            hit = (snap.taken, usage_from_counts(snap.site(site))[1])
            with self._lock:
                self._waiting[site] = hit
        return grid.ranked(self._lock), grid.known, hit[1]

    def _grid_for(self, snap) -> _GridRanking:
        """The grid-wide ranking of this snapshot: summed over the sites once per snapshot."""
        grid = self._grid
        if grid is not None and grid.taken == snap.taken:
            return grid
        tree, known = self._tree_for(snap.taken)
        running = grid_running(snap.by_site)
        with self._lock:
            grid = self._grid
            if grid is None or grid.taken != snap.taken:
                grid = self._grid = _GridRanking(snap.taken, tree, known,
                                                 rank_shares(tree, running), running)
        return grid

    def note_dispatched(self, site: str, jobs: list[dict]) -> None:
        """Count jobs this process just dispatched at ``site`` into its cached grid-wide
        usage (and the site's activated jobs), so that the requests at every site until the
        next snapshot follow the targets too (not all to the share that was first when the
        snapshot was read)."""
        with self._lock:
            grid = self._grid
            if grid is None:
                return
            hit = self._waiting.get(site)
            waiting = dict(hit[1]) if hit is not None and hit[0] == grid.taken else None
            for job in jobs:
                share = job.get("share")
                if share is None:
                    continue
                grid.running[share] = grid.running.get(share, 0) + int(job.get("cores") or 1)
                if waiting is not None and waiting.get(share):
                    waiting[share] -= 1
            grid.stale = True
            if waiting is not None:
                self._waiting[site] = (grid.taken, waiting)

    def note_released(self, share: str | None, cores: int | None, *, began: float) -> None:
        """Take a job's cores off its share in the cached grid-wide usage: an update this
        process applied (begun at ``began``, ``time.monotonic()``) ended the job's use of them
        (it left sent/starting/running). Without it the usage between two snapshots only grew
        by what was dispatched, and the ranking evened out jobs handed out rather than cores
        in use. Skipped when the snapshot was read after the update began: the read may
        already count the job as ended."""
        if share is None:
            return
        with self._lock:
            grid = self._grid
            if grid is None or grid.taken > began:
                return
            grid.running[share] = max(0, grid.running.get(share, 0) - int(cores or 1))
            grid.stale = True

    def _tree_for(self, taken: float) -> tuple[list[Share], set[str]]:
        """The share tree, read once per counter snapshot."""
        cached = self._tree
        if cached is not None and cached[0] == taken:
            return cached[1], cached[2]
        tree = self.store.load()
        known = {s.name for s, _, _ in walk(tree)}
        self._tree = (taken, tree, known)
        return tree, known

    def grid_running(self) -> dict[str, int]:
        """Cores in use per share over every site, exact as committed now (a few rows)."""
        return usage_from_counts(self.tb.counts.by_share())[0]

    def ranking(self, site: str, tree: list[Share] | None = None,
                grid: dict[str, int] | None = None
                ) -> tuple[list[str], dict[str, int], dict[str, int]]:
        """(share names best first by grid-wide usage, cores in use per share at ``site``,
        activated jobs per share at ``site``), exact as committed now; ``grid``: the
        grid-wide usage if the caller read it already (``grid_running``). Usage counts cores,
        as PanDA's shares count computing power, not jobs: one 8-core job uses eight times
        what a 1-core job does."""
        counts = {(share, status): v for (_, share, status), v in self.tb.counts.read(site).items()}
        running, waiting = usage_from_counts(counts)
        tree = tree if tree is not None else self.store.load()
        names = rank_shares(tree, grid if grid is not None else self.grid_running())
        return names, running, waiting

    def is_fresh(self, site: str) -> bool:
        """Would ``share_plan(site)`` answer without reading the database? (The counter
        snapshot is fresh, or being refreshed by another thread, and the share tree was read
        for it: the site's ranking is then plain Python.)"""
        if self.ttl_s <= 0 or not self.tb.counts.is_fresh(self.ttl_s):
            return False
        snap, tree = self.tb.counts.current, self._tree
        return snap is not None and tree is not None and tree[0] == snap.taken

    def share_plan(self, site: str) -> list[str | tuple[str, ...]] | None:
        """The shares to ask in order, best first: a share's name, or, last, a tuple of the
        tree's names meaning "any share not in the tree". None: the plain priority order."""
        names, known, waiting = self._ranked(site)
        if len([s for s, n in waiting.items() if n]) <= 1:
            return None
        steps: list[str | tuple[str, ...]] = [name for name in names if waiting.get(name)]
        log.debug("share plan at %s: %s (waiting %s)", site, steps, waiting)
        if any(n for s, n in waiting.items() if s not in known):
            steps.append(tuple(sorted(known)))
        return steps

    def __call__(self, site: str) -> list | None:
        names, _, waiting = self._ranked(site)
        if len([s for s, n in waiting.items() if n]) <= 1:
            return None
        j = db.jobs.c
        rank = case({name: i for i, name in enumerate(names)}, value=j.share, else_=len(names))
        return [rank, j.current_priority.desc(), j.panda_id]


# ---------------------------------------------------------------------- priorities
#: the job columns the priority hooks get: everything but the big free texts (parameters,
#: diagnostics, metrics), which a priority has no business reading and which made a pass over
#: the queue read every row's whole width
PRIORITY_COLUMNS = tuple(c.name for c in db.jobs.c if c.name not in (
    "job_pars", "transformation", "pilot_error_diag", "exe_error_diag", "dispatcher_error_diag",
    "ddm_error_diag", "task_buffer_error_diag", "job_metrics"))


@dataclass
class PriorityCursor:
    """Where the next pass of :func:`recompute_priorities` goes on: per waiting state, the
    last PandaID seen. Passes walk the queue in PandaID order, ``limit`` jobs at a time, and
    start again at the front after the last job, so every waiting job is reached however long
    the queue is."""
    after: dict[str, int] = field(default_factory=dict)
    laps: int = 0                      # full walks of the queue so far


def recompute_priorities(tb: TaskBuffer, hook, limit: int = 50000,
                         cursor: PriorityCursor | None = None) -> int:
    """Set ``current_priority`` of waiting jobs from the priority hooks (the
    lowest answer wins); returns how many changed. Idempotent, so every server process may run
    it. Without ``cursor``: the first ``limit`` waiting jobs of each state (a one-off call);
    with one: the next ``limit`` after the cursor (the periodic task), read through the
    waiting-jobs index (``ix_jobs_waiting``), so a pass costs ``limit`` rows at any queue size."""
    j = db.jobs.c
    now = tb.clock()
    cols = [j[c] for c in PRIORITY_COLUMNS]
    rows: list[dict] = []
    per_state = max(1, limit // len(WAITING_STATES))
    with db.read(tb.engine) as conn:
        user_running = {owner: n for owner, n in conn.execute(
            select(j.owner, func.count()).where(j.status.in_(RUNNING_STATES)).group_by(j.owner))}
        for state in WAITING_STATES:
            after = cursor.after.get(state, 0) if cursor is not None else 0
            result = conn.execute(
                select(*cols).where(j.status == literal_column(f"'{state}'"), db.WAITING_ONLY,
                                    j.panda_id > after)
                .order_by(j.panda_id).limit(per_state))
            # plain tuples zipped with the names once: a row's mapping built its keys anew
            # for every row (two thirds of a pass of 50,000 jobs)
            names = list(result.keys())
            batch = [dict(zip(names, r)) for r in result.all()]
            rows += batch
            if cursor is not None:
                cursor.after[state] = batch[-1]["panda_id"] if len(batch) == per_state else 0
    if cursor is not None and not any(cursor.after.values()):
        cursor.laps += 1
    changes = []
    for job, new in zip(rows, _lowest_answers(hook, rows, now, user_running)):
        if new is not None and new != job["current_priority"]:
            changes.append({"pid": job["panda_id"], "old_status": job["status"], "prio": new})
    if changes:
        with tb.engine.begin() as conn:
            if tb.dialect == "postgresql":
                # one statement over arrays: an executemany of 50,000 updates took seconds
                conn.execute(_PG_SET_PRIORITIES, {
                    "pids": [c["pid"] for c in changes],
                    "olds": [c["old_status"] for c in changes],
                    "prios": [c["prio"] for c in changes]})
            else:
                conn.execute(update(db.jobs).where(j.panda_id == bindparam("pid"),
                                                   j.status == bindparam("old_status"))
                             .values(current_priority=bindparam("prio")), changes)
        log.debug("recomputed priorities of %d job(s)", len(changes))
    return len(changes)


def _lowest_answers(hook, jobs: list[dict], now, user_running: dict[str, int]
                    ) -> list[int | None]:
    """Per job, the lowest answer of the priority hooks (None: every one abstained): the
    batch form ``panda_job_priorities`` once for all jobs, the one-job form
    ``panda_job_priority`` per job only when a plugin implements it."""
    best: list[int | None] = [None] * len(jobs)

    def take(i: int, answer) -> None:
        if answer is not None and (best[i] is None or answer < best[i]):
            best[i] = int(answer)
    many = getattr(hook, "panda_job_priorities", None)
    if many is not None and jobs:
        for answers in many(jobs=jobs, now=now, user_running=user_running):
            if answers is None:
                continue
            if len(answers) != len(jobs):
                log.warning("a panda_job_priorities plugin gave %d answers for %d jobs: "
                            "ignored", len(answers), len(jobs))
                continue
            for i, answer in enumerate(answers):
                take(i, answer)
    one = getattr(hook, "panda_job_priority", None)
    if one is not None and (not hasattr(one, "get_hookimpls") or one.get_hookimpls()):
        for i, job in enumerate(jobs):
            for answer in one(job=job, now=now, user_running=user_running.get(job["owner"], 0)):
                take(i, answer)
    return best


_PG_SET_PRIORITIES = text(
    "UPDATE jobs SET current_priority = v.prio FROM (SELECT unnest(CAST(:pids AS bigint[])) "
    "AS pid, unnest(CAST(:olds AS text[])) AS old, unnest(CAST(:prios AS integer[])) AS prio) v "
    "WHERE jobs.panda_id = v.pid AND jobs.status = v.old")
