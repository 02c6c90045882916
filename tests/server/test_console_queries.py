"""The queries behind ``panda jobs``, ``panda retry`` and the no-fit reason, on SQLite,
PostgreSQL and MariaDB (issue 14): filters of ``Jobs.find``, ``activated_shape`` and
``count_fitting``, and a retry by hand past ``max_attempts`` (GREATEST / max per dialect)."""
from __future__ import annotations

import pytest

from dbkit import add_site, seed_jobs
from server.nofit import PilotFit, explain

SITE = "SITE_C"


def test_console_queries(taskbuffer, clock):
    tb = taskbuffer
    add_site(tb, SITE)
    _, activated = seed_jobs(tb, SITE, 3, walltime_s=3600, memory_mb=2000, cores=2)
    _, failed = seed_jobs(tb, SITE, 2, owner="bob", status="failed", max_attempts=1)

    shape = tb.jobs.activated_shape(SITE)
    assert shape == {"activated": 3, "walltime_s": 3600, "memory_mb": 2000, "cores": 2,
                     "any_version": 3}
    assert tb.jobs.count_fitting(SITE, walltime_s=3000) == 0
    assert tb.jobs.count_fitting(SITE, walltime_s=3600, memory_mb=2000, cores=2) == 3
    why = explain(SITE, shape, PilotFit(walltime_s=3000, memory_mb=1000, cores=8))
    assert why == (f"3 activated jobs at {SITE}, none fits this pilot: the smallest needs "
                   "walltime 3600 s > remaining 3000 s; memory 2000 MB > the pilot's 1000 MB")
    assert explain(SITE, tb.jobs.activated_shape("NOWHERE"), PilotFit()) == \
        f"no activated jobs at {SITE}"

    assert [j["panda_id"] for j in tb.jobs.find(status=["failed"], owner="bob")] == failed
    assert [j["panda_id"] for j in tb.jobs.find(status=["activated", "failed"])] == \
        activated + failed
    newest = [j["panda_id"] for j in tb.jobs.find(site=SITE, limit=2, newest_first=True)]
    assert newest == sorted(activated + failed)[-2:][::-1]
    assert tb.jobs.find(since=clock.advance(60)) == []

    new = tb.jobs.retry_by_hand(failed[0], "bob", owner_check="bob")
    job = tb.jobs.get(new)
    assert job["status"] == "activated" and job["attempt_nr"] == 2 and job["parent_id"] == failed[0]
    assert tb.jobs.get(failed[0])["max_attempts"] == 2           # raised past the task's 1
    assert tb.jobs.retry_by_hand(failed[0], "bob") is None        # already retried
    assert tb.jobs.retry_by_hand(activated[0], "alice") is None   # did not fail
    with pytest.raises(PermissionError):
        tb.jobs.retry_by_hand(failed[1], "eve", owner_check="eve")
