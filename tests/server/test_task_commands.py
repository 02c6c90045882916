"""Pause, resume and finish of a task (PanDA's pauseTask, resumeTask, finishTask) on SQLite,
PostgreSQL and MariaDB: a paused task's queued jobs are throttled and not dispatched (also those
activated while it is paused), resume dispatches them again; finish soft lets the running jobs
end, hard kills them, and the task ends by what ran; refusals change nothing."""
from __future__ import annotations

import pytest

from dbkit import add_site, history, seed_jobs, stored_files
from server.taskbuffer import Conflict, NotFound


def _statuses(tb, task_id: int) -> dict[int, str]:
    return {j["panda_id"]: j["status"] for j in tb.jobs.find(task_id=task_id)}


def _run(tb, pid: int) -> None:
    """The pilot of a dispatched job reports it running."""
    tb.pilots.update(pid, "starting", {}, actor="p")
    tb.pilots.update(pid, "running", {}, actor="p")


def _end(tb, clock, pid: int, final: str) -> None:
    """The pilot of a running job reports its end (``failed``: with no outputs stored)."""
    clock.advance(60)
    job = tb.jobs.get(pid)
    lfns = [f["lfn"] for f in job["files"] if f["type"] in ("output", "log")]
    tb.pilots.update(pid, final, {"trans_exit_code": 0 if final == "finished" else 1},
                     actor="p", stored_files=stored_files(lfns) if final == "finished" else {},
                     output_endpoint="SE_A")


def test_paused_jobs_are_not_dispatched_until_resumed(taskbuffer, clock):
    add_site(taskbuffer)
    task_id, (first, *queued) = seed_jobs(taskbuffer, "SITE_A", 3)
    assert taskbuffer.jobs.dispatch("SITE_A", node="wn1", actor="p")["panda_id"] == first
    _run(taskbuffer, first)
    assert taskbuffer.tasks.get(task_id)["status"] == "running"
    result = taskbuffer.commands.pause(task_id, "alice")
    assert (result.status, result.jobs) == ("paused", 2)
    task = taskbuffer.tasks.get(task_id)
    assert (task["status"], task["error_dialog"]) == ("paused", "paused by alice")
    assert _statuses(taskbuffer, task_id) == {first: "running", **dict.fromkeys(queued,
                                                                                "throttled")}
    assert history(taskbuffer, queued[0])[-1] == ("activated", "throttled")
    # no pilot gets them, nor counts them as waiting
    assert taskbuffer.jobs.dispatch("SITE_A", node="wn2", actor="p") is None
    assert taskbuffer.jobs.count(site="SITE_A", status="activated") == 0
    # the running job goes on: its heartbeats are answered, the task stays paused
    assert taskbuffer.pilots.update(first, "running", {}, actor="p") == "NULL"
    assert taskbuffer.tasks.get(task_id)["status"] == "paused"
    # pausing again, or resuming twice, is refused and changes nothing
    with pytest.raises(Conflict, match="only a task that is registered, ready or running"):
        taskbuffer.commands.pause(task_id, "alice")
    result = taskbuffer.commands.resume(task_id, "alice")
    assert (result.status, result.jobs) == ("running", 2)
    with pytest.raises(Conflict, match="only a paused task can be resumed"):
        taskbuffer.commands.resume(task_id, "alice")
    assert history(taskbuffer, queued[0])[-2:] == [("activated", "throttled"),
                                                   ("throttled", "activated")]
    got = {taskbuffer.jobs.dispatch("SITE_A", node="wn2", actor="p")["panda_id"]
           for _ in queued}
    assert got == set(queued)


def test_a_paused_task_that_never_started_is_ready_again(taskbuffer):
    add_site(taskbuffer)
    task_id, ids = seed_jobs(taskbuffer, "SITE_A", 2)
    taskbuffer.commands.pause(task_id, "alice")
    assert taskbuffer.commands.resume(task_id, "alice").status == "ready"
    assert set(_statuses(taskbuffer, task_id).values()) == {"activated"}


def test_jobs_activated_while_paused_are_throttled(taskbuffer, clock):
    """A retry of a job that fails in a paused task, a job that brokerage or the data service
    activates: all are throttled by the state machine, none reaches the dispatch."""
    add_site(taskbuffer)
    task_id, (running,) = seed_jobs(taskbuffer, "SITE_A", 1)
    _, (waiting,) = seed_jobs(taskbuffer, "SITE_A", 1, task_id=task_id, status="assigned")
    taskbuffer.jobs.dispatch("SITE_A", node="wn1", actor="p")
    _run(taskbuffer, running)
    taskbuffer.commands.pause(task_id, "alice")
    _end(taskbuffer, clock, running, "failed")         # no stored outputs: a retry
    retry = [pid for pid in _statuses(taskbuffer, task_id) if pid not in (running, waiting)]
    assert len(retry) == 1
    assert history(taskbuffer, retry[0])[-2:] == [("defined", "activated"),
                                                  ("activated", "throttled")]
    with taskbuffer.engine.begin() as conn:          # the data service: inputs are there
        assert taskbuffer.states.change(conn, waiting, "activated", actor="ddm",
                                        expected=["assigned"])
    assert taskbuffer.jobs.get(waiting)["status"] == "throttled"
    assert taskbuffer.jobs.dispatch("SITE_A", node="wn2", actor="p") is None
    assert taskbuffer.tasks.get(task_id)["status"] == "paused"
    assert taskbuffer.commands.resume(task_id, "alice").jobs == 2
    assert taskbuffer.jobs.dispatch("SITE_A", node="wn2", actor="p") is not None


def test_new_jobs_of_a_paused_task_are_throttled(taskbuffer):
    """``change_many`` (a batch of new jobs of the task, as task/extend makes) holds them too."""
    from sqlalchemy import select
    from server import db

    add_site(taskbuffer)
    task_id, _ = seed_jobs(taskbuffer, "SITE_A", 1)
    taskbuffer.commands.pause(task_id, "alice")
    _, new = seed_jobs(taskbuffer, "SITE_A", 3, task_id=task_id, status="defined")
    with taskbuffer.engine.begin() as conn:
        taskbuffer.states.change_many(conn, new, "defined", "activated", actor="brokerage")
        held = conn.execute(select(db.jobs.c.status).where(db.jobs.c.panda_id.in_(new))
                            ).scalars().all()
    assert held == ["throttled"] * 3
    assert history(taskbuffer, new[0])[-2:] == [("defined", "activated"),
                                                ("activated", "throttled")]


def test_soft_finish_lets_running_jobs_end(taskbuffer, clock):
    add_site(taskbuffer)
    task_id, (running, sent, queued) = seed_jobs(taskbuffer, "SITE_A", 3)
    taskbuffer.jobs.dispatch("SITE_A", node="wn1", actor="p")
    taskbuffer.jobs.dispatch("SITE_A", node="wn2", actor="p")
    _run(taskbuffer, running)
    result = taskbuffer.commands.finish(task_id, "alice", soft=True)
    assert (result.status, result.jobs) == ("finishing", 2)
    jobs = {j["panda_id"]: j for j in taskbuffer.jobs.find(task_id=task_id)}
    assert {pid: j["status"] for pid, j in jobs.items()} == {
        running: "running", sent: "cancelled", queued: "cancelled"}
    # the pilot that got a job but has not started it is told to stop; the queued one has none
    assert (jobs[sent]["command"], jobs[queued]["command"]) == ("tobekilled", None)
    assert jobs[queued]["task_buffer_error_diag"] == f"killed by alice: task {task_id} finished"
    assert taskbuffer.pilots.update(sent, "starting", {}, actor="p") == "tobekilled"
    assert taskbuffer.pilots.update(running, "running", {}, actor="p") == "NULL"
    assert taskbuffer.tasks.get(task_id)["status"] == "finishing"
    assert taskbuffer.jobs.dispatch("SITE_A", node="wn3", actor="p") is None
    # the last job ends: the task is finished (some of its work was not done)
    _end(taskbuffer, clock, running, "finished")
    task = taskbuffer.tasks.get(task_id)
    assert (task["status"], task["error_dialog"]) == ("finished", "soft finish by alice")
    with pytest.raises(Conflict, match="ended already"):
        taskbuffer.commands.finish(task_id, "alice")


def test_soft_finish_of_a_task_whose_running_jobs_all_succeed_is_done(taskbuffer, clock):
    add_site(taskbuffer)
    task_id, ids = seed_jobs(taskbuffer, "SITE_A", 2)
    for _ in ids:
        taskbuffer.jobs.dispatch("SITE_A", node="wn1", actor="p")
    for pid in ids:
        _run(taskbuffer, pid)
    assert taskbuffer.commands.finish(task_id, "alice", soft=True).jobs == 0
    for pid in ids:
        _end(taskbuffer, clock, pid, "finished")
    assert taskbuffer.tasks.get(task_id)["status"] == "done"


def test_a_job_failing_in_a_finishing_task_is_not_retried(taskbuffer, clock):
    add_site(taskbuffer)
    task_id, (pid,) = seed_jobs(taskbuffer, "SITE_A", 1, max_attempts=3)
    taskbuffer.jobs.dispatch("SITE_A", node="wn1", actor="p")
    _run(taskbuffer, pid)
    taskbuffer.commands.finish(task_id, "alice", soft=True)
    _end(taskbuffer, clock, pid, "failed")
    assert list(_statuses(taskbuffer, task_id).values()) == ["failed"]
    assert taskbuffer.tasks.get(task_id)["status"] == "failed"


def test_hard_finish_kills_every_job_and_ends_the_task_by_what_ran(taskbuffer, clock):
    add_site(taskbuffer)
    task_id, (done, running, queued) = seed_jobs(taskbuffer, "SITE_A", 3)
    taskbuffer.jobs.dispatch("SITE_A", node="wn1", actor="p")
    taskbuffer.jobs.dispatch("SITE_A", node="wn2", actor="p")
    for pid in (done, running):
        _run(taskbuffer, pid)
    _end(taskbuffer, clock, done, "finished")
    result = taskbuffer.commands.finish(task_id, "alice")
    assert (result.status, result.jobs) == ("finished", 2)
    jobs = {j["panda_id"]: j for j in taskbuffer.jobs.find(task_id=task_id)}
    assert {pid: j["status"] for pid, j in jobs.items()} == {
        done: "finished", running: "cancelled", queued: "cancelled"}
    assert jobs[running]["command"] == "tobekilled"
    assert taskbuffer.pilots.update(running, "running", {}, actor="p") == "tobekilled"
    assert history(taskbuffer, running)[-1] == ("running", "cancelled")
    # a task where nothing had finished fails; a paused one finishes too
    other, _ = seed_jobs(taskbuffer, "SITE_A", 2)
    taskbuffer.commands.pause(other, "alice")
    assert taskbuffer.commands.finish(other, "alice").status == "failed"
    assert set(_statuses(taskbuffer, other).values()) == {"cancelled"}


def test_commands_refused_by_status_or_unknown_task_change_nothing(taskbuffer, clock):
    add_site(taskbuffer)
    task_id, (pid,) = seed_jobs(taskbuffer, "SITE_A", 1)
    taskbuffer.jobs.dispatch("SITE_A", node="wn1", actor="p")
    _run(taskbuffer, pid)
    _end(taskbuffer, clock, pid, "finished")
    assert taskbuffer.tasks.get(task_id)["status"] == "done"
    for command in (taskbuffer.commands.pause, taskbuffer.commands.resume,
                    taskbuffer.commands.finish):
        with pytest.raises(Conflict, match=f"task {task_id} is done"):
            command(task_id, "alice")
        with pytest.raises(NotFound, match="no task 999999"):
            command(999999, "alice")
    task = taskbuffer.tasks.get(task_id)
    assert (task["status"], task["error_dialog"]) == ("done", None)
    # a soft-finishing task is not paused (nothing queued is left to hold)
    other, (run, _) = seed_jobs(taskbuffer, "SITE_A", 2)
    taskbuffer.jobs.dispatch("SITE_A", node="wn1", actor="p")
    _run(taskbuffer, run)
    taskbuffer.commands.finish(other, "alice", soft=True)
    with pytest.raises(Conflict, match=f"task {other} is finishing"):
        taskbuffer.commands.pause(other, "alice")
    # but finished hard: its running job is killed now
    assert taskbuffer.commands.finish(other, "alice").status == "failed"


def test_the_watcher_ends_a_paused_task_whose_jobs_all_ended(taskbuffer, clock):
    """A paused task with nothing left to hold, whose last job ended on a path that did not
    settle it, is ended by the watcher's repair like any other."""
    from sqlalchemy import update
    from server import db
    from server.watcher import Watcher

    add_site(taskbuffer)
    task_id, (pid,) = seed_jobs(taskbuffer, "SITE_A", 1)
    taskbuffer.commands.pause(task_id, "alice")
    with taskbuffer.engine.begin() as conn:         # ended behind the task's back
        conn.execute(update(db.jobs).where(db.jobs.c.panda_id == pid)
                     .values(status="finished"))
    Watcher(taskbuffer).repair_tasks()
    assert taskbuffer.tasks.get(task_id)["status"] == "done"


def test_more_attempts_run_used_up_jobs_again_and_raise_the_live_ones(taskbuffer, clock):
    add_site(taskbuffer)
    task_id, (used_up, running) = seed_jobs(taskbuffer, "SITE_A", 2, max_attempts=1)
    for pid in (used_up, running):
        taskbuffer.jobs.dispatch("SITE_A", node="wn1", actor="p")
        _run(taskbuffer, pid)
    _end(taskbuffer, clock, used_up, "failed")          # its only attempt: no retry
    assert len(_statuses(taskbuffer, task_id)) == 2
    assert taskbuffer.commands.increase_attempts(task_id, "alice", 0).jobs == 0
    result = taskbuffer.commands.increase_attempts(task_id, "alice", 2)
    assert (result.status, result.jobs) == ("running", 1)
    jobs = {j["panda_id"]: j for j in taskbuffer.jobs.find(task_id=task_id)}
    (again,) = set(jobs) - {used_up, running}
    assert (jobs[again]["status"], jobs[again]["attempt_nr"], jobs[again]["parent_id"],
            jobs[again]["max_attempts"]) == ("activated", 2, used_up, 3)
    assert jobs[running]["max_attempts"] == 3
    assert taskbuffer.tasks.get(task_id)["max_attempts"] == 3
    # the running one fails now: it gets its retry from its raised attempts
    _end(taskbuffer, clock, running, "failed")
    assert len(_statuses(taskbuffer, task_id)) == 4
    # a paused task's new attempts are held; an ended task gets none
    other, (pid,) = seed_jobs(taskbuffer, "SITE_A", 1, max_attempts=1)
    seed_jobs(taskbuffer, "SITE_A", 1, task_id=other, max_attempts=1)
    with taskbuffer.engine.begin() as conn:            # say, its inputs could not be placed
        taskbuffer.jobs.fail(conn, pid, ["activated"], actor="dataservice")
    taskbuffer.commands.pause(other, "alice")
    assert taskbuffer.commands.increase_attempts(other, "alice", 1).jobs == 1
    assert sorted(_statuses(taskbuffer, other).values()) == ["failed", "throttled", "throttled"]
    done, (d,) = seed_jobs(taskbuffer, "SITE_A", 1, status="finished")
    with taskbuffer.engine.begin() as conn:
        taskbuffer.tasks.refresh_status(conn, done)
    with pytest.raises(Conflict, match=f"task {done} is done: only a ready, running or paused"):
        taskbuffer.commands.increase_attempts(done, "alice", 1)
