"""Global shares (tree, storage, share-aware dispatch order) and priorities (aging, user
penalty, third-party priority plugins), on a real database with a controllable clock."""
from __future__ import annotations

import json

import pytest
from sqlalchemy import case

from logic_kit import site, submitter, task
from server import db
from server.hookspecs import hookimpl, plugin_manager
from server.shares import (DEFAULT_SHARES, ShareChooser, ShareError, ShareStore, load_shares_file,
                           PriorityCursor, parse_shares, rank_shares, recompute_priorities,
                           targets)

SITE = "S_SITE"


@pytest.fixture
def tb(taskbuffer):
    taskbuffer.sites.sync([site(SITE, max_running=1000)])
    return taskbuffer


def add_jobs(tb, share, n, owner="alice", priority=1000, name=None):
    return submitter(tb).submit(task(name or f"t-{share}-{priority}", n_jobs=n, site=SITE,
                                     share=share, priority=priority), owner=owner).job_ids


def test_default_tree_and_targets():
    tree = parse_shares(DEFAULT_SHARES)
    t = targets(tree)
    assert t == pytest.approx({"production": 0.8, "mc": 0.48, "reprocessing": 0.32,
                               "analysis": 0.2})


@pytest.mark.parametrize("bad,words", [
    ([{"name": "a", "value": 50}, {"name": "b", "value": 40}], "add up to 100 %, got 90"),
    ([{"name": "a", "value": 100, "children": [{"name": "a", "value": 100}]}], "appears twice"),
    ([{"name": "../x", "value": 100}], "shares[0].name"),
    ([{"name": "a", "value": "lots"}], "shares[0].value (a)"),
    ([{"name": "a", "value": 101}], "0 to 100"),
    ([{"name": "a", "value": 100, "colour": "red"}], "unknown key(s) colour"),
    ([{"name": "a", "value": 100, "children": [{"name": "b", "value": 30}]}],
     "shares[0].children: sibling shares must add up"),
    ([], "non-empty list"),
    ("production", "non-empty list"),
])
def test_bad_trees_are_refused_with_the_place_and_reason(bad, words):
    with pytest.raises(ShareError) as err:
        parse_shares(bad)
    assert words in str(err.value)


def test_share_files_yaml_json_and_errors(tmp_path):
    y = tmp_path / "shares.yaml"
    y.write_text("shares:\n  - {name: prod, value: 70}\n  - {name: user, value: 30}\n")
    assert [s.name for s in load_shares_file(y)] == ["prod", "user"]
    j = tmp_path / "shares.json"
    j.write_text(json.dumps(DEFAULT_SHARES))
    assert load_shares_file(j)[0].children[1].name == "reprocessing"
    with pytest.raises(ShareError, match="cannot read"):
        load_shares_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("shares: [unclosed\n")
    with pytest.raises(ShareError, match="not valid YAML"):
        load_shares_file(bad)


def test_rank_follows_the_deficit_level_by_level():
    tree = parse_shares(DEFAULT_SHARES)
    # nothing running: production (80) before analysis, mc (60) before reprocessing
    assert rank_shares(tree, {}) == ["mc", "reprocessing", "production", "analysis"]
    # production over target at the top, reprocessing under target within production
    assert rank_shares(tree, {"mc": 6, "analysis": 4}) == [
        "reprocessing", "mc", "production", "analysis"]
    # analysis has less than its 20 %: first
    assert rank_shares(tree, {"mc": 6, "reprocessing": 4}) == [
        "analysis", "mc", "reprocessing", "production"]


def test_store_round_trip_and_value_edits(tb):
    store = ShareStore(tb)
    assert [s.name for s in store.load()] == ["production", "analysis"]   # the default
    store.save(parse_shares([{"name": "x", "value": 25}, {"name": "y", "value": 75,
                              "children": [{"name": "y1", "value": 100}]}]))
    assert [s.to_dict() for s in store.load()] == [
        {"name": "x", "value": 25.0},
        {"name": "y", "value": 75.0, "children": [{"name": "y1", "value": 100.0}]}]
    store.set_values({"x": 50, "y": 50})
    assert targets(store.load()) == {"x": 0.5, "y": 0.5, "y1": 0.5}
    with pytest.raises(ShareError, match="add up"):
        store.set_values({"x": 60})
    with pytest.raises(ShareError, match="unknown share"):
        store.set_values({"nope": 10})
    assert targets(store.load())["x"] == 0.5          # a refused edit changed nothing


def test_dispatch_follows_the_targets(tb):
    for share in ("mc", "reprocessing", "analysis"):
        add_jobs(tb, share, 20)
    chooser = ShareChooser(tb, ttl_s=0)
    got = []
    for _ in range(20):
        job = tb.jobs.dispatch(SITE, node="wn", actor="p", order_by=chooser(SITE))
        got.append(job["share"])
    counts = {s: got.count(s) for s in ("mc", "reprocessing", "analysis")}
    assert got[0] == "mc"
    # 48 / 32 / 20 % of 20 jobs
    assert counts == {"mc": pytest.approx(9.6, abs=1), "reprocessing": pytest.approx(6.4, abs=1),
                      "analysis": pytest.approx(4, abs=1)}


def test_share_below_target_goes_first_then_priority(tb):
    add_jobs(tb, "mc", 6)
    # two analysis jobs of different priority; analysis has nothing running
    low = add_jobs(tb, "analysis", 1, priority=500)[0]
    high = add_jobs(tb, "analysis", 1, priority=900)[0]
    for _ in range(5):                      # mc gets running jobs, analysis falls below 20 %
        tb.jobs.dispatch(SITE, node="wn", actor="p", order_by=[case((db.jobs.c.share == "mc", 0),
                                                               else_=1)])
    chooser = ShareChooser(tb, ttl_s=0)
    assert tb.jobs.dispatch(SITE, node="wn", actor="p", order_by=chooser(SITE))["panda_id"] == high
    # 1 of 6 running is analysis: still below its 20 %
    assert tb.jobs.dispatch(SITE, node="wn", actor="p", order_by=chooser(SITE))["panda_id"] == low


def test_unknown_share_comes_last_but_still_runs(tb):
    # submission only takes shares of the tree; a share can leave the tree later (an admin edit)
    odd = add_jobs(tb, "reprocessing", 1, priority=5000)[0]
    ShareStore(tb).save(parse_shares([
        {"name": "production", "value": 80, "children": [{"name": "mc", "value": 100}]},
        {"name": "analysis", "value": 20}]))
    add_jobs(tb, "analysis", 1)
    chooser = ShareChooser(tb, ttl_s=0)
    assert tb.jobs.dispatch(SITE, node="wn", actor="p", order_by=chooser(SITE))["share"] == "analysis"
    assert tb.jobs.dispatch(SITE, node="wn", actor="p", order_by=chooser(SITE))["panda_id"] == odd


def test_single_waiting_share_keeps_the_plain_order(tb):
    add_jobs(tb, "mc", 3)
    assert ShareChooser(tb, ttl_s=0)(SITE) is None


def test_priorities_age_and_drop_with_the_users_running_jobs(tb, clock):
    [old] = add_jobs(tb, "mc", 1, owner="bob", name="old")
    clock.advance(hours=10)
    [young] = add_jobs(tb, "mc", 1, owner="carol", name="young")
    hook = plugin_manager(load_entry_points=False).hook
    assert recompute_priorities(tb, hook) == 1
    assert tb.jobs.get(old)["current_priority"] == 1100        # +10 per hour waited
    assert tb.jobs.get(young)["current_priority"] == 1000
    # carol gets 5 jobs running: her waiting job loses 5 points
    add_jobs(tb, "analysis", 5, owner="carol", name="busy", priority=9999)
    for _ in range(5):
        tb.jobs.dispatch(SITE, node="wn", actor="p")
    recompute_priorities(tb, hook)
    assert tb.jobs.get(young)["current_priority"] == 995
    # a recompute with nothing new changes nothing
    assert recompute_priorities(tb, hook) == 0
    # the higher current priority is dispatched first
    assert tb.jobs.dispatch(SITE, node="wn", actor="p")["panda_id"] == old


def test_priority_passes_walk_the_whole_queue_a_batch_at_a_time(tb, clock):
    """With a cursor (the watcher's), each pass reads ``limit`` waiting jobs after the last
    one seen and starts again at the front after the end: jobs past the first batch are
    reached too, and a pass reads no more than ``limit``."""
    ids = add_jobs(tb, "mc", 5, name="queue")
    clock.advance(hours=1)
    hook = plugin_manager(load_entry_points=False).hook
    cursor = PriorityCursor()
    seen = []
    real = hook.panda_job_priorities

    class Spy:
        def panda_job_priorities(self, jobs, now, user_running):
            seen.extend(job["panda_id"] for job in jobs)
            assert all("job_pars" not in job and "owner" in job for job in jobs)  # narrow rows
            return real(jobs=jobs, now=now, user_running=user_running)
    changed = [recompute_priorities(tb, Spy(), limit=4, cursor=cursor) for _ in range(3)]
    # 2 per waiting state and pass (activated here): [0, 1], [2, 3], [4], then the front
    assert seen == ids and changed == [2, 2, 1] and cursor.laps == 1
    recompute_priorities(tb, Spy(), limit=4, cursor=cursor)
    assert seen[5:] == ids[:2]
    assert {tb.jobs.get(i)["current_priority"] for i in ids} == {1010}


class CapPriority:
    """A third-party policy: no job above 1050."""

    @hookimpl
    def panda_job_priority(self, job, now, user_running):
        return min(job["priority"], 1050)


def test_a_priority_plugin_can_lower_the_answer(tb, clock):
    [pid] = add_jobs(tb, "mc", 1)
    clock.advance(hours=20)
    pm = plugin_manager(load_entry_points=False)
    pm.register(CapPriority(), name="cap")
    recompute_priorities(tb, pm.hook)
    assert tb.jobs.get(pid)["current_priority"] == 1000      # the lowest answer wins


class FloorForBob:
    """A third-party policy in the batch form: bob's jobs at 1 (others abstain)."""

    @hookimpl
    def panda_job_priorities(self, jobs, now, user_running):
        return [1 if job["owner"] == "bob" else None for job in jobs]


class Miscounting:
    """A broken batch policy: one answer too few (ignored, with a warning)."""

    @hookimpl
    def panda_job_priorities(self, jobs, now, user_running):
        return [-5] * (len(jobs) - 1)


def test_batch_and_one_job_priority_plugins_together(tb, clock, caplog):
    [bobs] = add_jobs(tb, "mc", 1, owner="bob", name="b")
    [alices] = add_jobs(tb, "mc", 1, owner="alice", name="a")
    clock.advance(hours=20)
    pm = plugin_manager(load_entry_points=False)
    for name, plugin in (("cap", CapPriority()), ("floor", FloorForBob()),
                         ("broken", Miscounting())):
        pm.register(plugin, name=name)
    assert recompute_priorities(tb, pm.hook) == 1              # bob's: alice's stays
    assert tb.jobs.get(bobs)["current_priority"] == 1          # the batch plugin's answer
    assert tb.jobs.get(alices)["current_priority"] == 1000     # the one-job cap's (1200 aged)
    assert "gave 1 answers for 2 jobs" in caplog.text


def dispatcher(tb, tmp_path, ttl_s=0):
    from dbkit import BlockingDispatcher
    from server.auth import KeyStore
    from server.dispatcher import Dispatcher
    return BlockingDispatcher(Dispatcher(tb, KeyStore(tmp_path / "keys"),
                                         ShareChooser(tb, ttl_s=ttl_s)))


def retire_share(tb, job_ids, name="retired"):
    """Jobs whose share has left the tree since they were submitted (an admin edit)."""
    from sqlalchemy import update
    with tb.engine.begin() as conn:
        conn.execute(update(db.jobs).where(db.jobs.c.panda_id.in_(job_ids)).values(share=name))


def test_dispatcher_asks_share_by_share(tb, tmp_path):
    for share in ("mc", "reprocessing", "analysis"):
        add_jobs(tb, share, 10)
    retire_share(tb, add_jobs(tb, "mc", 10, name="later-retired"), "default")
    disp = dispatcher(tb, tmp_path)
    got = []
    for _ in range(20):
        reply = disp.get_job({"siteName": SITE}, None)
        got.append(tb.jobs.get(reply["PandaID"])["share"])
    assert {s: got.count(s) for s in set(got)} == {"mc": pytest.approx(9.6, abs=1),
                                                   "reprocessing": pytest.approx(6.4, abs=1),
                                                   "analysis": pytest.approx(4, abs=1)}
    # the share outside the tree waits until the others are empty, then runs
    for _ in range(10):
        disp.get_job({"siteName": SITE}, None)
    assert tb.jobs.get(disp.get_job({"siteName": SITE}, None)["PandaID"])["share"] == "default"


def test_a_stale_plan_falls_back_to_any_job(tb, tmp_path):
    [mc] = add_jobs(tb, "mc", 1)
    [ana] = add_jobs(tb, "analysis", 1)
    disp = dispatcher(tb, tmp_path, ttl_s=3600)
    assert len(disp.job_chooser.share_plan(SITE)) == 2      # cached: mc, then analysis
    # behind the cache: mc empties, a reprocessing job arrives
    tb.jobs.kill(mc, "admin")
    [rep] = add_jobs(tb, "reprocessing", 1)
    assert disp.get_job({"siteName": SITE}, None)["PandaID"] == ana       # mc missed
    assert disp.get_job({"siteName": SITE}, None)["PandaID"] == rep       # fallback
    assert disp.get_job({"siteName": SITE}, None)["StatusCode"] == 20     # nothing left


def test_usage_counts_cores_not_jobs(tb):
    submitter(tb).submit(task("big", n_jobs=1, site=SITE, share="mc",
                              resources={"cores": 4, "memory_mb": 100, "walltime_s": 60}),
                         owner="alice")
    tb.jobs.dispatch(SITE, node="wn", actor="p")                 # mc: one 4-core job
    add_jobs(tb, "mc", 1, name="small-mc")
    tb.jobs.dispatch(SITE, node="wn", actor="p")                 # mc: and one 1-core job
    add_jobs(tb, "analysis", 1, name="ana-running")
    tb.jobs.dispatch(SITE, node="wn", actor="p")                 # analysis: one 1-core job
    add_jobs(tb, "mc", 1, name="mc-waiting")
    add_jobs(tb, "analysis", 1, name="ana-waiting")
    names, running, waiting = ShareChooser(tb, ttl_s=0).ranking(SITE)
    assert running == {"mc": 5, "analysis": 1} and waiting == {"mc": 1, "analysis": 1}
    # by jobs analysis would have 1 of 3 (33 %, above its 20 %); by cores it has 1 of 6 (17 %)
    assert names[0] == "analysis"


@pytest.mark.parametrize("ttl_s", [0, 3600])
def test_usage_is_grid_wide_so_a_share_at_some_sites_reaches_its_target(taskbuffer, tmp_path,
                                                                         ttl_s):
    """Share x's jobs wait only at site 1, y's at both; pilots come to both in turn. Ranked by
    the grid's usage, site 1 serves x first until x has its half of the grid's cores; ranked
    per site, x would get half of site 1's slots only (a quarter of the grid). With a cached
    snapshot (ttl 3600) the dispatches at either site move the order through note_dispatched."""
    s1, s2 = "G_SITE1", "G_SITE2"
    taskbuffer.sites.sync([site(s1, max_running=1000), site(s2, max_running=1000)])
    ShareStore(taskbuffer).save(parse_shares([{"name": "y", "value": 50},
                                              {"name": "x", "value": 50}]))
    for where, share in ((s1, "x"), (s1, "y"), (s2, "y")):
        submitter(taskbuffer).submit(task(f"t-{where}-{share}", n_jobs=20, site=where,
                                          share=share), owner="alice")
    disp = dispatcher(taskbuffer, tmp_path, ttl_s=ttl_s)
    got: dict[str, list[str]] = {s1: [], s2: []}
    for _ in range(10):
        for where in (s1, s2):
            reply = disp.get_job({"siteName": where}, None)
            got[where].append(taskbuffer.jobs.get(reply["PandaID"])["share"])
    assert got[s2] == ["y"] * 10
    # y first on the tie (configured first), then x as long as it is below the grid's half
    assert got[s1] == ["y"] + ["x"] * 9
    grid = ShareChooser(taskbuffer, ttl_s=0).grid_running()
    assert grid == {"x": 9, "y": 11}
    names, running, waiting = ShareChooser(taskbuffer, ttl_s=0).ranking(s1)
    assert running == {"x": 9, "y": 1} and names[0] == "x"      # the site's own usage
    assert waiting == {"x": 11, "y": 19}


def test_ended_jobs_come_off_the_cached_usage(taskbuffer, tmp_path):
    """Between two snapshots the chooser adds what it dispatches and takes off what its
    updates end (holding, failed, finished: no longer running), so the order follows the
    cores in use, not the jobs handed out. A stale attempt's report ends nothing, and a job
    ended before the snapshot was read is not taken off twice."""
    import time
    where = "E_SITE"
    taskbuffer.sites.sync([site(where, max_running=1000)])
    ShareStore(taskbuffer).save(parse_shares([{"name": "y", "value": 50},
                                              {"name": "x", "value": 50}]))
    for share in ("x", "y"):
        submitter(taskbuffer).submit(task(f"t-{share}", n_jobs=20, site=where, share=share),
                                     owner="alice")
    disp = dispatcher(taskbuffer, tmp_path, ttl_s=3600)
    mine = {"x": [], "y": []}
    for _ in range(10):
        job = taskbuffer.jobs.get(disp.get_job({"siteName": where}, None)["PandaID"])
        mine[job["share"]].append(job["panda_id"])
    assert {s: len(ids) for s, ids in mine.items()} == {"x": 5, "y": 5}
    chooser = disp.job_chooser
    assert chooser.share_plan(where)[0] == "y"            # a tie: the configured order

    def report(pid, state, attempt=1):
        return disp.update_job({"jobId": pid, "state": state, "attemptNr": attempt}, None)
    assert report(mine["x"][0], "holding", attempt=7)["command"] == "tobekilled"    # stale
    assert chooser.share_plan(where)[0] == "y"
    report(mine["x"][0], "running")                       # still running: nothing ends
    report(mine["x"][0], "holding")
    report(mine["x"][1], "failed")
    assert chooser.share_plan(where)[0] == "x"            # x 3 cores, y 5
    for pid in mine["y"][:2]:
        report(pid, "failed")
    assert chooser.share_plan(where)[0] == "y"            # 3 and 3: the tie again
    assert ShareChooser(taskbuffer, ttl_s=0).grid_running() == {"x": 3, "y": 3}
    # an end the snapshot may already count (it was read after the update began) stays
    chooser.note_released("x", 1, began=time.monotonic() - 3600)
    assert chooser.share_plan(where)[0] == "y"            # still 3 and 3
    chooser.note_released(None, 1, began=time.monotonic())   # a job without a share: nothing
    chooser.note_released("x", 1, began=time.monotonic())
    assert chooser.share_plan(where)[0] == "x"            # x 2, y 3
