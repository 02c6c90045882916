"""Kill of a task (PanDA's killTask) on SQLite, PostgreSQL and MariaDB: a task of thousands of
jobs in every state is killed in bounded batches of set-based statements, each live job
cancelled once with one history row (its pilot told ``tobekilled`` if it has one), the ended
ones untouched; a second kill changes nothing; a pilot's final update racing the kill either
lands or loses whole, never both."""
from __future__ import annotations

import threading
from collections import Counter

import pytest
from sqlalchemy import event, func, select

from dbkit import add_site, history, seed_jobs, stored_files
from server import db
from server.taskbuffer import NotFound

#: jobs per state of the big task (live ones, then ended ones the kill must leave alone)
MIX = {"defined": 300, "assigned": 300, "activated": 900, "throttled": 200, "sent": 300,
       "starting": 200, "running": 500, "holding": 100, "transferring": 100,
       "finished": 60, "failed": 40}
PILOT = {"sent", "starting", "running", "holding", "transferring"}
ENDED = {"finished", "failed"}


def _big_task(tb) -> tuple[int, dict[int, str]]:
    """A task with the jobs of ``MIX``; its PandaIDs and their states."""
    add_site(tb)
    task_id = None
    states: dict[int, str] = {}
    for status, n in MIX.items():
        task_id, ids = seed_jobs(tb, "SITE_A", n, status=status, task_id=task_id)
        states.update(dict.fromkeys(ids, status))
    return task_id, states


def _rows(tb, task_id: int) -> dict[int, dict]:
    j = db.jobs.c
    with tb.engine.connect() as conn:
        return {r.panda_id: r._mapping for r in conn.execute(
            select(j.panda_id, j.status, j.command, j.task_buffer_error_code,
                   j.task_buffer_error_diag).where(j.task_id == task_id))}


def _history_rows(tb, task_id: int) -> list:
    h = db.job_history.c
    with tb.engine.connect() as conn:
        return conn.execute(select(h.panda_id, h.old_status, h.new_status, h.actor)
                            .where(h.panda_id.in_(select(db.jobs.c.panda_id).where(
                                db.jobs.c.task_id == task_id)))).all()


def test_a_big_task_in_every_state_is_killed_in_batches(taskbuffer):
    tb = taskbuffer
    task_id, before = _big_task(tb)
    live = {pid for pid, s in before.items() if s not in ENDED}
    statements = []
    listener = lambda *a: statements.append(1)          # noqa: E731
    event.listen(tb.engine, "before_cursor_execute", listener)
    try:
        result = tb.commands.kill(task_id, "alice", batch=400)
    finally:
        event.remove(tb.engine, "before_cursor_execute", listener)
    assert (result.status, result.jobs) == ("aborted", len(live))
    # bounded batches of set-based statements, not a transaction per job (2,900 here): 1,700
    # jobs no pilot holds (5 batches of 400, 1,200 pilot-held in the first 3), one last batch
    # that finds nothing; each at most 8 statements
    assert len(statements) < 60
    task = tb.tasks.get(task_id)
    assert (task["status"], task["error_dialog"]) == ("aborted", "killed by alice")

    rows = _rows(tb, task_id)
    for pid, old in before.items():
        row = rows[pid]
        if old in ENDED:
            assert (row["status"], row["command"]) == (old, None)
            continue
        assert row["status"] == "cancelled"
        assert row["command"] == ("tobekilled" if old in PILOT else None), (pid, old)
        assert (row["task_buffer_error_code"], row["task_buffer_error_diag"]) == (
            300, "killed by alice")
    hist = _history_rows(tb, task_id)
    kills = [(r.panda_id, r.old_status, r.actor) for r in hist if r.new_status == "cancelled"]
    # one history row per killed job, from the state it really was in
    assert sorted(kills) == sorted((pid, before[pid], "alice") for pid in live)
    assert Counter(r.panda_id for r in hist) == Counter(
        {pid: 2 if pid in live else 1 for pid in before})

    # a second kill finds nothing live: no job, no history row changes; the task stays aborted
    again = tb.commands.kill(task_id, "alice", batch=400)
    assert (again.status, again.jobs) == ("aborted", 0)
    assert _rows(tb, task_id) == rows
    assert len(_history_rows(tb, task_id)) == len(hist)
    assert tb.tasks.get(task_id)["status"] == "aborted"
    # the pilots of the killed jobs learn it in their next heartbeat
    running = next(pid for pid, s in before.items() if s == "running")
    assert tb.pilots.update(running, "running", {}, actor="p") == "tobekilled"
    assert tb.jobs.dispatch("SITE_A", node="wn1", actor="p") is None


def test_kill_of_an_unknown_task_or_a_bad_batch_changes_nothing(taskbuffer):
    add_site(taskbuffer)
    task_id, ids = seed_jobs(taskbuffer, "SITE_A", 2)
    with pytest.raises(NotFound):
        taskbuffer.commands.kill(task_id + 1000, "alice")
    with pytest.raises(ValueError, match="batch must be at least 1"):
        taskbuffer.commands.kill(task_id, "alice", batch=0)
    assert {j["status"] for j in taskbuffer.jobs.find(task_id=task_id)} == {"activated"}
    assert taskbuffer.tasks.get(task_id)["status"] == "ready"


def test_a_job_failing_while_its_task_is_killed_gets_no_retry(taskbuffer, clock, monkeypatch):
    """From the kill's first batch the task is aborted: a job whose pilot reports its failure
    between two batches is not retried (no new job to kill, none left behind)."""
    tb = taskbuffer
    add_site(tb)
    task_id, ids = seed_jobs(tb, "SITE_A", 6)
    held = [tb.jobs.dispatch("SITE_A", node="wn", actor="p")["panda_id"] for _ in range(2)]
    for pid in held:
        tb.pilots.update(pid, "running", {}, actor="p")
    first_batch = tb.commands._kill_batch
    batches = []

    def then_the_pilot_reports(*args):
        moved = first_batch(*args)
        batches.append(moved)
        if len(batches) == 1:        # the first batch took the lower held job; the other fails
            clock.advance(60)
            assert tb.pilots.update(held[1], "failed", {"trans_exit_code": 1}, actor="p",
                                    stored_files={}, output_endpoint="SE_A") == "NULL"
        return moved

    monkeypatch.setattr(tb.commands, "_kill_batch", then_the_pilot_reports)
    result = tb.commands.kill(task_id, "alice", batch=1)
    assert result.jobs == len(ids) - 1
    assert batches == [2, 1, 1, 1, 0]
    statuses = {j["panda_id"]: j["status"] for j in tb.jobs.find(task_id=task_id)}
    assert statuses == {**dict.fromkeys(ids, "cancelled"), held[1]: "failed"}
    assert history(tb, held[1])[-1] == ("holding", "failed")
    assert tb.tasks.get(task_id)["status"] == "aborted"


@pytest.mark.parametrize("final", ["finished", "failed"])
def test_a_final_update_racing_the_kill_lands_or_loses_whole(taskbuffer, clock, final):
    """Pilots report the end of their jobs while the task is killed: each job ends once, by
    the pilot (and is then not killed nor counted) or by the kill (the pilot's update is
    rolled back whole and its pilot told so); no job has both a kill and an end in its
    history, and the kill counts exactly the jobs it cancelled."""
    from server.taskbuffer import Conflict

    tb = taskbuffer
    add_site(tb)
    task_id, ids = seed_jobs(tb, "SITE_A", 60, max_attempts=1)
    racers = []
    for _ in range(8):
        pid = tb.jobs.dispatch("SITE_A", node="wn", actor="p")["panda_id"]
        tb.pilots.update(pid, "running", {}, actor="p")
        racers.append(pid)
    replies: dict[int, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(racers) + 1)

    def pilot(pid: int) -> None:
        job = tb.jobs.get(pid)
        lfns = [f["lfn"] for f in job["files"] if f["type"] in ("output", "log")]
        barrier.wait()
        try:
            replies[pid] = tb.pilots.update(
                pid, final, {"trans_exit_code": 0 if final == "finished" else 1}, actor="p",
                stored_files=stored_files(lfns) if final == "finished" else {},
                output_endpoint="SE_A")
        except Conflict:
            replies[pid] = "conflict"
        except BaseException as exc:               # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=pilot, args=(pid,)) for pid in racers]
    for t in threads:
        t.start()
    barrier.wait()
    result = tb.commands.kill(task_id, "alice", batch=5)
    for t in threads:
        t.join(60)
    assert not errors
    statuses = {j["panda_id"]: j["status"] for j in tb.jobs.find(task_id=task_id)}
    # no retry appeared (one attempt each), every job ended
    assert set(statuses) == set(ids)
    ended_by_pilot = {pid for pid in racers if statuses[pid] == final}
    assert set(statuses.values()) <= {"cancelled", final}
    assert {pid for pid, s in statuses.items() if s == final} == ended_by_pilot
    assert result.jobs == len(ids) - len(ended_by_pilot)
    for pid in racers:
        ends = [new for _, new in history(tb, pid) if new in ("cancelled", final)]
        assert ends == [statuses[pid]], (pid, history(tb, pid))
        if pid not in ended_by_pilot:
            assert replies[pid] in ("tobekilled", "conflict")
    with tb.engine.connect() as conn:
        cancelled_rows = conn.execute(select(func.count()).select_from(db.job_history).where(
            db.job_history.c.new_status == "cancelled")).scalar_one()
    assert cancelled_rows == result.jobs
    assert tb.tasks.get(task_id)["status"] == "aborted"
    assert tb.commands.kill(task_id, "alice").jobs == 0
