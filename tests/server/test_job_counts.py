"""The trigger-kept job counters (server/taskbuffer/counts.py) on SQLite, PostgreSQL, MariaDB:
every kind of write moves them, a heartbeat does not, concurrent transitions and folds keep
them equal to a GROUP BY, the migration fills them from the rows already there, and one thread
refreshes the process's snapshot however many find it stale."""
from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import func, insert, select, text, update

from dbkit import add_site, counts_by_group_by, seed_jobs
from server import db
from server.archive import archive_jobs
from server.taskbuffer import TaskBuffer


def pending_deltas(tb: TaskBuffer) -> int:
    with tb.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(db.job_count_deltas)).scalar_one()


def summed_by_share(counts: dict) -> dict:
    out: dict = {}
    for (_site, share, status), (n, cores) in counts.items():
        had = out.get((share, status), (0, 0))
        out[(share, status)] = (had[0] + n, had[1] + cores)
    return {k: v for k, v in out.items() if v[0]}


def test_every_write_moves_the_counters(taskbuffer, clock):
    tb = taskbuffer
    add_site(tb, "SITE_A")
    add_site(tb, "SITE_B")
    _, ids = seed_jobs(tb, "SITE_A", 6, cores=2)              # one set-based insert
    seed_jobs(tb, "SITE_B", 3)
    assert tb.counts.read()[("SITE_A", "production", "activated")] == (6, 12)
    assert tb.jobs.site_load() == {"SITE_A": {"activated": 6}, "SITE_B": {"activated": 3}}

    first = tb.jobs.dispatch("SITE_A", node="wn", actor="p")             # activated -> sent
    with tb.engine.begin() as conn:
        tb.states.change(conn, first["panda_id"], "running", actor="p", expected=["sent"])
    tb.jobs.kill(ids[1], "admin")                                        # -> cancelled
    with tb.engine.begin() as conn:                                      # site, share, cores
        conn.execute(update(db.jobs).where(db.jobs.c.panda_id == ids[2])
                     .values(site=None, share="analysis", cores=4))
    before = pending_deltas(tb)
    with tb.engine.begin() as conn:                                      # a heartbeat
        conn.execute(update(db.jobs).where(db.jobs.c.panda_id == first["panda_id"])
                     .values(heartbeat_time=clock(), node="wn2"))
    assert pending_deltas(tb) == before, "a change of no counted column appends nothing"
    assert tb.counts.read() == counts_by_group_by(tb)
    assert tb.counts.read()[("", "analysis", "activated")] == (1, 4)
    assert tb.counts.by_share() == summed_by_share(counts_by_group_by(tb))   # deltas pending
    assert tb.counts.by_share()[("production", "activated")] == (3 + 3, 3 * 2 + 3)

    assert tb.counts.fold() > 0
    assert pending_deltas(tb) == 0
    assert tb.counts.read() == counts_by_group_by(tb)
    with tb.engine.begin() as conn:                                      # a plain DELETE
        conn.execute(db.jobs.delete().where(db.jobs.c.site == "SITE_B"))
    clock.advance(10)
    assert archive_jobs(tb, older_than_s=1) == 1                         # the cancelled one
    tb.counts.fold()
    assert tb.counts.read() == counts_by_group_by(tb)
    assert tb.counts.by_share() == summed_by_share(counts_by_group_by(tb))   # all folded
    with tb.engine.connect() as conn:           # counters of nothing are dropped, not kept at 0
        assert conn.execute(select(func.count()).select_from(db.job_counts)
                            .where(db.job_counts.c.n == 0)).scalar_one() == 0
    assert "SITE_B" not in tb.jobs.site_load()


def test_concurrent_transitions_and_folds_stay_exact(taskbuffer):
    """8 dispatchers take jobs through sent, running and an end while 2 threads fold: the
    counters equal the GROUP BY at the end, folded or not."""
    tb = taskbuffer
    add_site(tb, "SITE_C")
    n_jobs = 400 if tb.dialect != "sqlite" else 150
    seed_jobs(tb, "SITE_C", n_jobs)
    errors: list[BaseException] = []
    done = threading.Event()

    def pilot(k: int) -> None:
        try:
            while True:
                job = tb.jobs.dispatch("SITE_C", node=f"wn{k}", actor="p")
                if job is None:
                    return
                end = "finished" if job["panda_id"] % 3 else "failed"
                with tb.engine.begin() as conn:
                    tb.states.change(conn, job["panda_id"], "running", actor="p",
                                     expected=["sent"])
                with tb.engine.begin() as conn:
                    tb.states.change(conn, job["panda_id"], end, actor="p",
                                     expected=["running"])
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    def folder() -> None:
        try:
            while not done.is_set():
                tb.counts.fold()
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    pilots = [threading.Thread(target=pilot, args=(k,)) for k in range(8)]
    folders = [threading.Thread(target=folder) for _ in range(2)]
    for t in pilots + folders:
        t.start()
    for t in pilots:
        t.join()
    done.set()
    for t in folders:
        t.join()
    assert not errors, errors[:3]
    expected = counts_by_group_by(tb)
    assert sum(n for n, _ in expected.values()) == n_jobs
    assert tb.counts.read() == expected
    tb.counts.fold()
    assert tb.counts.read() == expected and pending_deltas(tb) == 0


def test_migration_counts_the_rows_already_there(fresh_db_url):
    engine = db.make_engine(fresh_db_url, pool_size=2)
    try:
        db.upgrade_schema(engine, "0017_vo")
        tb = TaskBuffer(engine)
        now = tb.clock()
        row = {"task_id": 1, "serial": 1, "status": "activated", "site": "OLD", "owner": "o",
               "share": "mc", "cores": 8, "transformation": "t", "job_pars": "",
               "creation_time": now, "modification_time": now, "state_changed": now}
        with engine.begin() as conn:
            conn.execute(insert(db.jobs),
                         [row, {**row, "serial": 2}, {**row, "serial": 3, "status": "running",
                                                      "site": None}])
        db.upgrade_schema(engine)
        assert tb.counts.read() == {("OLD", "mc", "activated"): (2, 16),
                                    ("", "mc", "running"): (1, 8)}
        with engine.begin() as conn:         # a hand edit behind the triggers' back: rebuild
            conn.execute(text("DELETE FROM job_counts"))
        assert tb.counts.rebuild() == counts_by_group_by(tb)
    finally:
        engine.dispose()


def test_one_refresh_however_many_find_the_snapshot_stale(taskbuffer, monkeypatch):
    tb = taskbuffer
    add_site(tb, "SITE_D")
    seed_jobs(tb, "SITE_D", 3)
    counts = tb.counts
    first = counts.snapshot(max_age_s=60)
    assert first.site("SITE_D")[("production", "activated")] == (3, 3)
    reads = []
    real_read = counts.read

    def slow_read(site=None):
        reads.append(site)
        time.sleep(0.2)
        return real_read(site)
    monkeypatch.setattr(counts, "read", slow_read)
    seed_jobs(tb, "SITE_D", 2)
    results = []
    threads = [threading.Thread(target=lambda: results.append(counts.snapshot(max_age_s=0.01)))
               for _ in range(20)]
    time.sleep(0.02)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reads) == 1, "one thread refreshes; the others answer from the old snapshot"
    assert len(results) == 20
    assert counts.snapshot(max_age_s=60).site("SITE_D")[("production", "activated")] == (5, 5)


@pytest.mark.parametrize("ttl", [0, 60])
def test_share_ranking_reads_the_counters_not_the_jobs(taskbuffer, ttl):
    """The chooser's ranking is the counters' (exact with ttl 0, the snapshot's otherwise)."""
    from server.shares import ShareChooser
    tb = taskbuffer
    add_site(tb, "SITE_E")
    _, ids = seed_jobs(tb, "SITE_E", 4)
    with tb.engine.begin() as conn:
        conn.execute(update(db.jobs).where(db.jobs.c.panda_id.in_(ids[:2])).values(share="mc"))
    chooser = ShareChooser(tb, ttl_s=ttl)
    assert chooser.share_plan("SITE_E") == ["mc", "production"] or \
        chooser.share_plan("SITE_E") == ["production", "mc"]
    names, running, waiting = chooser.ranking("SITE_E")
    assert waiting == {"mc": 2, "production": 2} and running == {}


def test_the_periodic_work_folds_the_counters(taskbuffer):
    """An idle dispatcher refreshes no snapshot: the watcher's pass folds the deltas."""
    from types import SimpleNamespace

    from server.watcher import WatcherLimits, server_tasks
    tb = taskbuffer
    add_site(tb, "SITE_F")
    seed_jobs(tb, "SITE_F", 3)
    assert pending_deltas(tb) > 0
    tasks = dict(server_tasks(SimpleNamespace(tb=tb, hook=None), WatcherLimits(),
                              data_mover=None))
    tasks["counters"]()
    assert pending_deltas(tb) == 0
    assert tb.counts.read() == counts_by_group_by(tb)
