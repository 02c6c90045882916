"""The per-process copy of the sites (``Sites.get_cached``) on SQLite, PostgreSQL, MariaDB: a
grid of many sites costs one read of the sites table per process every few seconds, not one per
site; a site's own process sees its changes at once; new and forgotten sites are read alone;
one thread re-reads a stale copy while the others go on with it."""
from __future__ import annotations

import threading

import pytest
from sqlalchemy import event

from dbkit import add_site
from server.taskbuffer import NotFound, TaskBuffer
from server.taskbuffer import sites as sites_module


class Reads:
    """SELECTs of the ``sites`` table the engine runs."""

    def __init__(self, engine):
        self.n = 0
        event.listen(engine, "before_cursor_execute", self._seen)
        self.engine = engine

    def _seen(self, conn, cursor, statement, params, context, many):
        if statement.lstrip().upper().startswith("SELECT") and "FROM sites" in statement:
            self.n += 1

    def close(self):
        event.remove(self.engine, "before_cursor_execute", self._seen)


@pytest.fixture
def reads(taskbuffer):
    r = Reads(taskbuffer.engine)
    yield r
    r.close()


@pytest.fixture
def now(monkeypatch):
    """The copy's monotonic clock, moved by hand: ``now[0] += 10``."""
    t = [1000.0]
    monkeypatch.setattr(sites_module.time, "monotonic", lambda: t[0])
    return t


def test_one_read_for_every_site_and_a_stale_copy_read_again_once(taskbuffer, reads, now):
    for i in range(30):
        add_site(taskbuffer, f"S{i:02d}")
    tb = TaskBuffer(taskbuffer.engine, clock=taskbuffer.clock)      # a process's first look
    reads.n = 0
    assert [tb.sites.get_cached(f"S{i:02d}")["name"] for i in range(30)] == \
        [f"S{i:02d}" for i in range(30)]
    assert reads.n == 1
    assert tb.sites.cached("S07")["name"] == "S07"
    now[0] += 4.9
    tb.sites.get_cached("S03")
    assert reads.n == 1
    now[0] += 0.2                                                   # 5 s: stale
    assert tb.sites.cached("S03") is None
    for i in range(30):
        tb.sites.get_cached(f"S{i:02d}")
    assert reads.n == 2


def test_changes_new_sites_and_unknown_names(taskbuffer, reads, now):
    add_site(taskbuffer, "SITE_A")
    tb = TaskBuffer(taskbuffer.engine, clock=taskbuffer.clock)
    assert tb.sites.get_cached("SITE_A")["config"]["resources"]["cores"] != 64
    add_site(tb, "SITE_A", cores=64)                  # this process's own change: seen at once
    assert tb.sites.get_cached("SITE_A")["config"]["resources"]["cores"] == 64
    add_site(taskbuffer, "SITE_NEW")                  # another process's new site: read alone
    reads.n = 0
    assert tb.sites.get_cached("SITE_NEW")["name"] == "SITE_NEW"
    assert tb.sites.get_cached("SITE_NEW")["name"] == "SITE_NEW"
    assert reads.n == 1
    for _ in range(2):                                # unknown: refused each time, not kept
        with pytest.raises(NotFound, match="NOPE"):
            tb.sites.get_cached("NOPE")
    assert tb.sites.cached("NOPE") is None
    assert tb.sites.get_cached("SITE_A")["name"] == "SITE_A"
    tb.sites.forget("SITE_A")                         # e.g. the failure policy set its status
    assert tb.sites.cached("SITE_A") is None
    reads.n = 0
    assert tb.sites.get_cached("SITE_A")["name"] == "SITE_A"
    assert reads.n == 1


def test_one_thread_reads_a_stale_copy_the_others_use_the_old_one(taskbuffer, now,
                                                                     monkeypatch):
    add_site(taskbuffer, "SITE_A")
    add_site(taskbuffer, "SITE_B")
    tb = TaskBuffer(taskbuffer.engine, clock=taskbuffer.clock)
    tb.sites.get_cached("SITE_A")
    now[0] += 10
    reading, release = threading.Event(), threading.Event()
    calls = []
    read_all = tb.sites.all

    def slow_all():
        calls.append(1)
        reading.set()
        release.wait(10)
        return read_all()
    monkeypatch.setattr(tb.sites, "all", slow_all)
    first = threading.Thread(target=tb.sites.get_cached, args=("SITE_A",))
    first.start()
    assert reading.wait(10)
    # while it reads, the others answer from the old copy, without a read of their own
    assert [tb.sites.get_cached(s)["name"] for s in ("SITE_A", "SITE_B") * 10] == \
        ["SITE_A", "SITE_B"] * 10
    assert tb.sites.cached("SITE_B")["name"] == "SITE_B"
    release.set()
    first.join(10)
    assert calls == [1]
    assert tb.sites.get_cached("SITE_B")["name"] == "SITE_B" and calls == [1]
