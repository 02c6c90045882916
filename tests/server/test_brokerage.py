"""Brokerage: site status, resource fit, data locality, load, and third-party policies through
the ``panda.server`` hooks (registered directly and found through an installed entry point)."""
from __future__ import annotations

import importlib
import sys
import textwrap

import pytest

from logic_kit import site, submitter, task
from server.brokerage import Brokerage, JobNeeds
from server.hookspecs import hookimpl, plugin_manager
from server.jobcreator import TaskSpecError


def needs(**kw) -> JobNeeds:
    base = {"cores": 1, "memory_mb": 1000, "walltime_s": 600, "disk_mb": 100}
    base.update(kw)
    return JobNeeds(**base)


def rows(*configs):
    return [{"name": c["name"], "config": c} for c in configs]


@pytest.fixture
def broker():
    return Brokerage(plugin_manager(load_entry_points=False).hook)


def test_only_sites_whose_status_takes_work(broker):
    sites = rows(site("OFF", status="offline"), site("BOFF", status="brokeroff"),
                 site("TEST", status="test"), site("ON"))
    choice, why = broker.choose(needs(), sites, {}, {})
    assert choice == "ON"
    assert sorted(why) == ["BOFF: status brokeroff", "OFF: status offline", "TEST: status test"]
    # test jobs may go to test sites
    assert broker.choose(needs(prod_source_label="test"), sites[:3], {}, {})[0] == "TEST"
    assert broker.choose(needs(), sites[:3], {}, {})[0] is None


@pytest.mark.parametrize("over,words", [
    ({"cores": 8}, "needs 8 cores, site has 4"),
    ({"memory_mb": 9000}, "needs 9000 MB memory, site has 4000"),
    ({"walltime_s": 99999}, "needs 99999 s wall time, site allows 7200"),
    ({"disk_mb": 10 ** 6}, "needs 1000000 MB disk"),
])
def test_resources_must_fit(broker, over, words):
    big = site("BIG", cores=64, memory_mb=10 ** 5, walltime_s=10 ** 6, disk_mb=10 ** 7)
    small = site("SMALL")
    choice, why = broker.choose(needs(**over), rows(small, big), {}, {})
    assert choice == "BIG"
    assert len(why) == 1 and why[0].startswith("SMALL: ") and words in why[0]


def test_data_locality_is_preferred(broker):
    a, b = site("A", "SE_A"), site("B", "SE_B")
    locality = {"f1": {"SE_B"}, "f2": {"SE_B"}}
    assert broker.choose(needs(input_lfns=["f1", "f2"]), rows(a, b), {}, locality)[0] == "B"
    # even half the inputs outweighs a moderately busier site
    load = {"B": {"running": 5}}
    half = {"f1": {"SE_B"}, "f2": {"SE_A"}, "f3": {"SE_B"}, "f4": {"SE_B"}}
    assert broker.choose(needs(input_lfns=list(half)), rows(a, b), load, half)[0] == "B"


def test_load_against_capacity(broker):
    a, b = site("A", max_running=10), site("B", max_running=10)
    load = {"A": {"activated": 8, "running": 10}, "B": {"running": 2}}
    assert broker.choose(needs(), rows(a, b), load, {})[0] == "B"
    # the same load weighs less on a bigger site
    big = site("C", max_running=1000)
    load = {"A": {"running": 5}, "C": {"running": 50}}
    assert broker.choose(needs(), rows(a, big), load, {})[0] == "C"


def spread(broker, sites, load, n_jobs):
    plan = broker.plan(needs(), rows(*sites), load)
    chosen = [plan.site_for([], {}) for _ in range(n_jobs)]
    return {s["name"]: chosen.count(s["name"]) for s in sites}


def test_empty_sites_get_jobs_in_proportion_to_their_slots(broker):
    """Slots, not sites, share a task: the queues of a big and a small site stay equally long
    (in job durations) instead of the small one's growing 200 times longer."""
    big, mid, small = site("BIG", max_running=2000), site("MID", max_running=100), \
        site("SMALL", max_running=10)
    got = spread(broker, [big, mid, small], {}, 2110 * 3)
    assert got == {"BIG": pytest.approx(6000, abs=2), "MID": pytest.approx(300, abs=2),
                   "SMALL": pytest.approx(30, abs=2)}
    # the one-job decision agrees
    assert broker.choose(needs(), rows(small, big), {}, {})[0] == "BIG"


def test_a_full_site_gets_few(broker):
    """A site whose slots are all taken and as many jobs queued again gets a quarter of what an
    empty site of its size gets, and less the longer its queue; a half-full site in between."""
    full, empty, half = site("FULL", max_running=100), site("EMPTY", max_running=100), \
        site("HALF", max_running=100)
    load = {"FULL": {"running": 80, "starting": 10, "sent": 10, "activated": 100},
            "HALF": {"running": 50}}
    got = spread(broker, [full, empty, half], load, 1000)
    assert got["FULL"] == pytest.approx(got["EMPTY"] / 4, abs=2)
    assert got["FULL"] < got["HALF"] < got["EMPTY"]
    longer = spread(broker, [full, empty], {"FULL": {"running": 100, "activated": 900}}, 1000)
    assert longer["FULL"] < 50 < 950 < longer["EMPTY"]
    # jobs waiting for inputs (assigned) and in stage-out (transferring) hold the site too;
    # a paused task's (throttled) wait for their owner, not for a slot
    assert broker.choose(needs(), rows(full, empty),
                         {"EMPTY": {"assigned": 150, "transferring": 60}}, {})[0] == "FULL"
    assert broker.choose(needs(), rows(full, empty),
                         {"FULL": {"running": 1}, "EMPTY": {"throttled": 5000}}, {})[0] == \
        "EMPTY"


def test_locality_still_dominates_among_sites_alike(broker):
    """A site holding a job's inputs wins against an emptier site of its size, in the plan and
    in the one-job decision; only a site with ten times its free capacity outweighs it."""
    a, b = site("A", "SE_A", max_running=50), site("B", "SE_B", max_running=50)
    load = {"A": {"running": 50, "activated": 20}}            # A full, B empty
    locality = {"f1": {"SE_A"}, "f2": {"SE_A"}}
    plan = broker.plan(needs(), rows(a, b), load)
    plain = [plan.site_for([], {}) for _ in range(40)]    # B gets most jobs without inputs
    assert plain.count("B") > 2 * plain.count("A")
    assert plan.site_for(["f1", "f2"], locality) == "A"      # and A the ones with theirs
    assert broker.choose(needs(input_lfns=["f1", "f2"]), rows(a, b), load, locality)[0] == "A"
    huge = site("HUGE", "SE_H", max_running=5000)
    assert broker.choose(needs(input_lfns=["f1", "f2"]), rows(a, huge), load,
                         locality)[0] == "HUGE"


@pytest.mark.parametrize("stored", [None, 0, -5, "lots", True, 2.5])
def test_a_site_with_no_usable_slots_weighs_as_the_default(broker, stored):
    """A config stored without the site-config checks (no ``pilots`` at all, or a value they
    refuse) weighs as ``DEFAULT_SLOTS`` (10) rather than failing the task's brokerage."""
    from server.brokerage import DEFAULT_SLOTS
    bare = {"name": "BARE"} if stored is None else {"name": "BARE", "pilots": {"max_running":
                                                                                stored}}
    ten = site("TEN", max_running=DEFAULT_SLOTS)
    got = spread(broker, [bare, ten], {"BARE": {"running": 3}, "TEN": {"running": 3}}, 400)
    assert got == {"BARE": 200, "TEN": 200}


def test_submission_records_the_choice_and_explains_refusals(taskbuffer):
    taskbuffer.sites.sync([site("A", cores=2), site("B", cores=16), site("Z", status="offline")])
    res = submitter(taskbuffer).submit(task(n_jobs=2, resources={"cores": 8}), owner="u")
    assert {taskbuffer.jobs.get(i)["site"] for i in res.job_ids} == {"B"}
    with pytest.raises(TaskSpecError) as err:
        submitter(taskbuffer).submit(task(n_jobs=1, resources={"cores": 32}), owner="u")
    msg = str(err.value)
    assert "A: needs 32 cores, site has 2" in msg and "Z: status offline" in msg


class AvoidSite:
    """A third-party filter: keep jobs off one site."""

    def __init__(self, name):
        self.name = name

    @hookimpl
    def panda_broker_filter(self, needs, candidates):
        return {c.name: "closed by the avoid-site policy" for c in candidates
                if c.name == self.name}


class LoveSite:
    @hookimpl
    def panda_broker_weight(self, needs, candidate, load, locality):
        return 1000.0 if candidate.name == "A" else None


def test_third_party_policies_change_the_choice(taskbuffer):
    taskbuffer.sites.sync([site("A", "SE_A"), site("B", "SE_B")])
    taskbuffer.data.add_dataset_files("d", "s", [{"lfn": "f1", "fsize": 1}], "SE_B")
    spec = task(n_jobs=None, input_dataset="d")
    plain = plugin_manager(load_entry_points=False)
    # built-ins alone: B holds the data
    assert Brokerage(plain.hook).choose(needs(input_lfns=["f1"]), rows(
        site("A", "SE_A"), site("B", "SE_B")), {}, {"f1": {"SE_B"}})[0] == "B"
    weighted = plugin_manager(load_entry_points=False)
    weighted.register(LoveSite(), name="love-a")
    res = submitter(taskbuffer, weighted).submit(spec, owner="u")
    assert taskbuffer.jobs.get(res.job_ids[0])["site"] == "A"
    filtered = plugin_manager(load_entry_points=False)
    filtered.register(AvoidSite("B"), name="avoid-b")
    choice, why = Brokerage(filtered.hook).choose(needs(input_lfns=["f1"]), rows(
        site("A", "SE_A"), site("B", "SE_B")), {}, {"f1": {"SE_B"}})
    assert choice == "A" and why == ["B: closed by the avoid-site policy"]


def test_installed_entry_point_plugin_is_loaded(tmp_path, monkeypatch):
    """A plugin distribution installed on sys.path is found through ``panda.server``."""
    (tmp_path / "avoid_b_policy.py").write_text(textwrap.dedent('''
        from server.hookspecs import hookimpl

        @hookimpl
        def panda_broker_filter(needs, candidates):
            return {c.name: "avoid-b says no" for c in candidates if c.name == "B"}
    '''))
    dist = tmp_path / "avoid_b_policy-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: avoid-b-policy\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[panda.server]\navoid_b = avoid_b_policy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    pm = plugin_manager(load_entry_points=True)
    assert "avoid_b" in {name for name, _ in pm.list_name_plugin()}
    choice, why = Brokerage(pm.hook).choose(needs(), rows(site("A"), site("B", max_running=1000)),
                                            {"A": {"running": 9}}, {})
    assert choice == "A" and why == ["B: avoid-b says no"]
    sys.modules.pop("avoid_b_policy", None)


# ---------------------------------------------------------------------- a task's plan
class CountCalls:
    """Counts how often brokerage asks the hooks."""

    def __init__(self):
        self.filters = self.weights = 0

    @hookimpl
    def panda_broker_filter(self, needs, candidates):
        self.filters += 1
        assert needs.input_lfns == []          # the task's shape: inputs are not the hooks'
        return {}

    @hookimpl
    def panda_broker_weight(self, needs, candidate, load, locality):
        self.weights += 1
        return None


def test_a_plan_asks_the_hooks_once_per_site_not_per_job():
    pm = plugin_manager(load_entry_points=False)
    counter = CountCalls()
    pm.register(counter, name="count")
    sites = rows(*[site(f"S{i:02d}", f"SE{i:02d}") for i in range(20)])
    plan = Brokerage(pm.hook).plan(needs(), sites, {})
    chosen = [plan.site_for([], {}) for _ in range(2000)]
    assert counter.filters == 1 and counter.weights == 20
    # equal weights: an equal spread
    assert {chosen.count(s["name"]) for s in sites} == {100}


def test_a_plan_spreads_jobs_by_weight_and_prefers_data():
    a, b, c = site("A", "SE_A", max_running=10), site("B", "SE_B", max_running=10), \
        site("C", "SE_C", max_running=10, cores=1)
    # A is full (weight 10 x 10 / 10), B and C idle (10 x 20 / 10)
    plan = Brokerage(plugin_manager(load_entry_points=False).hook).plan(
        needs(), rows(a, b, c), {"A": {"running": 10}})
    got = [plan.site_for([], {}) for _ in range(500)]
    assert got.count("A") == pytest.approx(100, abs=2)
    assert got.count("B") == pytest.approx(200, abs=2) and got.count("C") == pytest.approx(200, abs=2)
    # a job whose inputs are at A goes there although A weighs least (boost 10 > 2)
    locality = {"f1": {"SE_A"}, "f2": {"SE_A"}}
    assert plan.site_for(["f1", "f2"], locality) == "A"
    # a filtered site is never chosen, and says why
    big = Brokerage(plugin_manager(load_entry_points=False).hook).plan(
        needs(cores=2), rows(a, b, c), {})
    assert "C: needs 2 cores, site has 1" in big.rejected
    assert {big.site_for([], {}) for _ in range(50)} == {"A", "B"}


def test_a_plan_without_candidates_refuses_the_task(taskbuffer):
    taskbuffer.sites.sync([site("A", cores=2)])
    with pytest.raises(TaskSpecError, match="A: needs 8 cores"):
        submitter(taskbuffer).submit(task(n_jobs=3, resources={"cores": 8}), owner="u")
    assert taskbuffer.tasks.find() == []                # nothing was created


def test_a_task_above_the_bound_is_refused_before_anything_is_made(taskbuffer, monkeypatch):
    import server.submission as submission
    from server.jobcreator import LimitExceeded
    taskbuffer.sites.sync([site("A")])
    monkeypatch.setattr(submission, "MAX_JOBS_PER_CALL", 4)
    with pytest.raises(LimitExceeded, match="would create 5 jobs; at most 4 per call"):
        submitter(taskbuffer).submit(task(n_jobs=5), owner="u")
    assert taskbuffer.tasks.find() == []


def test_a_batch_of_jobs_is_made_as_one_job_at_a_time_makes_it(taskbuffer, monkeypatch):
    """The batch path (a few statements per batch) leaves the rows, files, history and
    counters the per-job path leaves: same columns but PandaIDs and times."""
    import server.submission as submission
    from dbkit import counts_by_group_by
    tb = taskbuffer
    tb.sites.sync([site("A", "SE_A"), site("B", "SE_B")])
    for name in ("d", "d2"):                 # half the inputs at B, half where no site is
        tb.data.add_dataset_files(name, "s", [{"lfn": f"{name}.f{i}", "fsize": 1}
                                              for i in range(3)], "SE_B")
        tb.data.add_dataset_files(name, "s", [{"lfn": f"{name}.f{i}", "fsize": 1}
                                              for i in range(3, 6)], "SE_X")
    batched = submitter(tb).submit(task(name="b", n_jobs=None, input_dataset="d"), owner="u")
    before = counts_by_group_by(tb)
    real = submission.TaskSubmitter._create_jobs

    def one_at_a_time(self, conn, spec, task_id, owner, first_serial, placed, sites,
                      locality, ids):
        return sum(self._create_job(conn, spec, task_id, owner, first_serial + n, group, site,
                                    sites[site], locality, None, ids)
                   for n, group, site in placed)
    monkeypatch.setattr(submission.TaskSubmitter, "_create_jobs", one_at_a_time)
    single = submitter(tb).submit(task(name="b", n_jobs=None, input_dataset="d2"), owner="u")
    monkeypatch.setattr(submission.TaskSubmitter, "_create_jobs", real)
    assert (batched.activated, batched.assigned) == (single.activated, single.assigned)
    assert batched.activated and batched.assigned            # both targets were taken

    def shape(panda_id):
        job = tb.jobs.get(panda_id)
        skip = {"panda_id", "task_id", "creation_time", "modification_time", "state_changed",
                "files", "job_pars", "archived"}
        files = sorted((f["type"], f["lfn"].replace("d2.", "d.") if f["type"] == "input"
                        else None, f["status"], f["fsize"]) for f in job["files"])
        history = [(h["old_status"], h["new_status"], h["actor"])
                   for h in tb.jobs.history(panda_id)]
        return {k: v for k, v in job.items() if k not in skip}, files, history
    for b, o in zip(batched.job_ids, single.job_ids):
        (bj, bf, bh), (oj, of, oh) = shape(b), shape(o)
        assert {k: (v, oj[k]) for k, v in bj.items() if oj[k] != v} == {}
        assert (bf, bh) == (of, oh)
    after = counts_by_group_by(tb)                  # the second task counted as the first
    assert {k: (n - before.get(k, (0, 0))[0]) for k, (n, _) in after.items()} == \
        {k: n for k, (n, _) in before.items()}
    assert tb.counts.read() == after


def test_big_tasks_are_created_in_batches(taskbuffer, monkeypatch):
    """Each batch commits on its own: a failure part way keeps the jobs made so far, the task
    is ready with them and says where creation stopped."""
    import server.submission as submission
    taskbuffer.sites.sync([site("A"), site("B", "SE_B")])
    monkeypatch.setattr(submission, "JOB_BATCH", 3)
    res = submitter(taskbuffer).submit(task(n_jobs=10), owner="u")
    assert len(res.job_ids) == 10 and taskbuffer.tasks.get(res.task_id)["status"] == "ready"
    assert {taskbuffer.jobs.get(i)["site"] for i in res.job_ids} == {"A", "B"}

    real = taskbuffer.jobs.insert_many
    made = []

    def failing_insert(conn, jobs, actor):              # the third batch fails
        if len(made) == 6:
            raise RuntimeError("database went away")
        made.extend(job["serial"] for job, _ in jobs)
        return real(conn, jobs, actor)
    monkeypatch.setattr(taskbuffer.jobs, "insert_many", failing_insert)
    with pytest.raises(RuntimeError):
        submitter(taskbuffer).submit(task(name="t2", n_jobs=10), owner="u")
    [t2] = [t for t in taskbuffer.tasks.find() if t["name"] == "t2"]
    assert t2["status"] == "ready" and "stopped after 6 of 10 jobs" in t2["error_dialog"]
    assert sum(taskbuffer.tasks.job_counts(t2["task_id"]).values()) == 6   # two whole batches
