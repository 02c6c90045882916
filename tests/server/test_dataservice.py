"""The data service over real file:// storage elements: inputs brought to the job's site,
verified and registered, the job activated; missing or corrupt sources fail it with a clear
diag; destination trouble leaves it waiting and loses nothing."""
from __future__ import annotations

import os
import zlib

import pytest
from sqlalchemy import update

from logic_kit import put_file, site, submitter, task
from panda_core.replicas import replica_url
from server import db
from server.dataservice import DataService, FileRef, SourceError, TransferFailed
from server.datamovers.local import LocalMover


@pytest.fixture
def ses(tmp_path):
    roots = {name: tmp_path / name.lower() for name in ("SE_A", "SE_B", "SE_C")}
    for r in roots.values():
        r.mkdir()
    return roots


@pytest.fixture
def tb(taskbuffer, ses):
    taskbuffer.sites.sync([site("SITE_A", "SE_A", f"file://{ses['SE_A']}"),
                           site("SITE_B", "SE_B", f"file://{ses['SE_B']}"),
                           site("SITE_C", "SE_C", f"file://{ses['SE_C']}")])
    return taskbuffer


def register(tb, root, endpoint, lfns, data=None, dataset="ds.in"):
    files = [put_file(root, "s", lfn, data or f"payload of {lfn}\n".encode() * 50)
             for lfn in lfns]
    tb.data.add_dataset_files(dataset, "s", files, endpoint)
    return files


def submit_at_a(tb, dataset="ds.in", name="t"):
    res = submitter(tb).submit(task(name, n_jobs=None, input_dataset=dataset, site="SITE_A"),
                               owner="alice")
    assert res.assigned == len(res.job_ids)
    return res.job_ids


def path(ses, se, lfn):
    return replica_url(str(ses[se]), "s", lfn)


def test_inputs_are_copied_verified_registered_and_the_job_activated(tb, ses):
    register(tb, ses["SE_B"], "SE_B", ["f1", "f2"])
    ids = submit_at_a(tb)
    report = DataService(tb).process()
    assert sorted(report.activated) == sorted(ids) and report.copied == 2
    for lfn in ("f1", "f2"):
        with open(path(ses, "SE_A", lfn), "rb") as a, open(path(ses, "SE_B", lfn), "rb") as b:
            assert a.read() == b.read()
        assert tb.data.replica_endpoints("s", [lfn])[lfn] == {"SE_A", "SE_B"}
    assert {tb.jobs.get(i)["status"] for i in ids} == {"activated"}
    assert tb.jobs.history(ids[0])[-1]["actor"] == "dataservice"
    # nothing left over, a second pass has nothing to do
    assert not [p for p in ses["SE_A"].rglob("*") if ".part-" in p.name]
    assert DataService(tb).process().activated == []


def test_missing_source_fails_the_job_with_a_clear_diag(tb, ses):
    register(tb, ses["SE_B"], "SE_B", ["gone"])
    os.unlink(path(ses, "SE_B", "gone"))
    [pid] = submit_at_a(tb)
    report = DataService(tb).process()
    job = tb.jobs.get(pid)
    assert job["status"] == "failed" and job["ddm_error_code"] == 100
    assert "s:gone" in job["ddm_error_diag"] and "no such file" in job["ddm_error_diag"]
    assert "SE_B" in report.failed[pid]
    assert tb.jobs.count(status="activated") == 0          # no retry: it would fail the same way


def test_file_held_nowhere_fails(tb, ses):
    tb.data.add_dataset_files("ds.in", "s", [{"lfn": "ghost", "fsize": 3}], None)
    [pid] = submit_at_a(tb)
    DataService(tb).process()
    assert "no storage element holds it" in tb.jobs.get(pid)["ddm_error_diag"]


def test_corrupt_copy_is_skipped_for_a_good_one(tb, ses):
    [good] = register(tb, ses["SE_C"], "SE_C", ["f"])
    tb.data.add_replica("s", "f", "SE_B", None)
    bad = path(ses, "SE_B", "f")
    os.makedirs(os.path.dirname(bad), exist_ok=True)
    with open(bad, "wb") as fh:                         # same size, other bytes
        fh.write(b"x" * good["fsize"])
    [pid] = submit_at_a(tb)
    assert DataService(tb).process().activated == [pid]
    with open(path(ses, "SE_A", "f"), "rb") as fh:
        assert f"ad:{zlib.adler32(fh.read()):08x}" == good["checksum"]


def test_every_copy_corrupt_fails_naming_each(tb, ses):
    register(tb, ses["SE_B"], "SE_B", ["f"])
    with open(path(ses, "SE_B", "f"), "ab") as fh:
        fh.write(b"more")
    [pid] = submit_at_a(tb)
    DataService(tb).process()
    diag = tb.jobs.get(pid)["ddm_error_diag"]
    assert "SE_B" in diag and "catalogue says" in diag
    assert not os.path.exists(path(ses, "SE_A", "f"))   # no bad copy left at the destination


def test_destination_trouble_leaves_the_job_waiting_then_it_recovers(tb, ses):
    register(tb, ses["SE_B"], "SE_B", ["f"])
    [pid] = submit_at_a(tb)
    # the destination's hash directory is blocked by a file: mkdir fails (as a full disk would)
    dest_dir = os.path.dirname(path(ses, "SE_A", "f"))
    blocker = os.path.dirname(dest_dir)
    os.makedirs(os.path.dirname(blocker), exist_ok=True)
    with open(blocker, "w") as fh:
        fh.write("in the way")
    report = DataService(tb).process()
    assert pid in report.waiting and tb.jobs.get(pid)["status"] == "assigned"
    assert os.path.exists(path(ses, "SE_B", "f"))       # the source is untouched
    os.unlink(blocker)
    assert DataService(tb).process().activated == [pid]


def test_hostile_input_name_fails_the_job_without_touching_paths(tb, ses):
    register(tb, ses["SE_B"], "SE_B", ["okay"])
    [pid] = submit_at_a(tb)
    with tb.engine.begin() as conn:                    # as if a catalogue held a bad name
        conn.execute(update(db.files).where(db.files.c.panda_id == pid,
                                            db.files.c.type == "input").values(lfn="../../etc"))
        conn.execute(update(db.replicas).values(lfn="../../etc"))
    DataService(tb).process()
    job = tb.jobs.get(pid)
    assert job["status"] == "failed" and "refusing" in job["ddm_error_diag"]


def test_local_mover_refuses_a_fifo_instead_of_hanging(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(SourceError, match="not a regular file"):
        LocalMover().copy(f"file://{fifo}", f"file://{tmp_path}/out", FileRef("s", "f", None,
                                                                               None), 5)


def test_local_mover_times_out_and_cleans_up(tmp_path):
    src = tmp_path / "big"
    src.write_bytes(os.urandom(3 << 20))
    with pytest.raises(TransferFailed, match="took more than"):
        LocalMover().copy(f"file://{src}", f"file://{tmp_path}/d/out",
                          FileRef("s", "big", None, None), timeout_s=-1)
    assert list((tmp_path / "d").iterdir()) == []


def test_local_mover_checks_md5_too(tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"abc")
    with pytest.raises(SourceError, match="md5"):
        LocalMover().copy(f"file://{src}", f"file://{tmp_path}/o",
                          FileRef("s", "f", 3, "md5:" + "0" * 32), 5)
    LocalMover().copy(f"file://{src}", f"file://{tmp_path}/o",
                      FileRef("s", "f", 3, "md5:900150983cd24fb0d6963f7d28e17f72"), 5)
    assert (tmp_path / "o").read_bytes() == b"abc"


def test_job_whose_inputs_arrived_meanwhile_is_activated_without_a_copy(tb, ses):
    register(tb, ses["SE_B"], "SE_B", ["f"])
    [pid] = submit_at_a(tb)
    # someone else put and registered the file at SE_A in the meantime
    register(tb, ses["SE_A"], "SE_A", ["f"])
    report = DataService(tb).process()
    assert report.activated == [pid] and report.copied == 0


def test_unknown_mover_name_is_a_clear_error():
    from server.dataservice import load_mover
    with pytest.raises(ValueError, match="no data mover 'warp' in entry-point group"):
        load_mover("warp")
    assert isinstance(load_mover("local"), LocalMover)
    with pytest.raises(ValueError, match="data mover 'local' .* failed to load: TypeError"):
        load_mover("local", bogus=1)


def test_a_mover_without_copy_cannot_be_made():
    from server.dataservice import DataMover

    class NoCopy(DataMover):
        name = "nocopy"

    with pytest.raises(TypeError, match="abstract.*copy"):
        NoCopy()


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 64 KiB file system (tmpfs) to fill up; skipped where mounting is not allowed."""
    import subprocess
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a small tmpfs for a real full disk: {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_full_destination_disk_loses_nothing_and_recovers(taskbuffer, ses, tiny_fs):
    import subprocess
    taskbuffer.sites.sync([site("SITE_A", "SE_A", f"file://{tiny_fs}"),
                           site("SITE_B", "SE_B", f"file://{ses['SE_B']}")])
    register(taskbuffer, ses["SE_B"], "SE_B", ["big"], data=os.urandom(200 * 1024))
    [pid] = submit_at_a(taskbuffer)
    report = DataService(taskbuffer).process()
    assert "destination full" in report.waiting[pid]
    assert taskbuffer.jobs.get(pid)["status"] == "assigned"
    assert [p for p in tiny_fs.rglob("*") if p.is_file()] == []      # no partial copy left
    assert os.path.getsize(path(ses, "SE_B", "big")) == 200 * 1024
    subprocess.run(["mount", "-o", "remount,size=1m", str(tiny_fs)], check=True)
    assert DataService(taskbuffer).process().activated == [pid]
    assert os.path.getsize(replica_url(str(tiny_fs), "s", "big")) == 200 * 1024


# -- retries, several movers, giving up ---------------------------------------------------------
class FlakyMover(LocalMover):
    """The local mover whose first ``hangs`` copies fail as a killed transfer would."""

    def __init__(self, hangs: int):
        super().__init__(fsync=False)
        self.hangs = hangs
        self.calls = 0

    def copy(self, src_url, dst_url, expected, timeout_s):
        self.calls += 1
        if self.calls <= self.hangs:
            raise TransferFailed(f"copy {src_url} stopped after the {timeout_s:g} s deadline")
        return super().copy(src_url, dst_url, expected, timeout_s)


def test_a_killed_transfer_is_retried_with_backoff_in_the_same_pass(tb, ses):
    register(tb, ses["SE_B"], "SE_B", ["r1"])
    ids = submit_at_a(tb)
    waits = []
    mover = FlakyMover(hangs=2)
    report = DataService(tb, mover, sleep=waits.append).process()
    assert report.activated == ids and mover.calls == 3
    assert len(waits) == 2 and waits[1] >= waits[0] > 0          # backoff grows


def test_a_transfer_that_keeps_failing_waits_then_fails_the_job_with_ddm_100(tb, ses):
    register(tb, ses["SE_B"], "SE_B", ["r2"])
    ids = submit_at_a(tb)
    service = DataService(tb, FlakyMover(hangs=10**6), sleep=lambda s: None, give_up_s=3600)
    report = service.process()
    assert list(report.waiting) == ids and "deadline" in report.waiting[ids[0]]
    with tb.engine.begin() as conn:       # the job has waited longer than the give-up time
        conn.execute(update(db.jobs).where(db.jobs.c.panda_id == ids[0]).values(
            state_changed=tb.clock() - __import__("datetime").timedelta(hours=2)))
    report = service.process()
    assert list(report.failed) == ids
    job = tb.jobs.get(ids[0])
    assert job["status"] == "failed" and job["ddm_error_code"] == 100
    assert "within 3600 s" in job["ddm_error_diag"] and "deadline" in job["ddm_error_diag"]


def test_the_first_mover_that_handles_both_urls_is_used(tb, ses):
    class Other(LocalMover):
        name = "other"
        schemes = ("root",)
    register(tb, ses["SE_B"], "SE_B", ["r3"])
    ids = submit_at_a(tb)
    service = DataService(tb, [Other(), LocalMover(fsync=False)])
    assert service.mover_for("file:///a", "file:///b").name == "local"
    assert service.mover_for("root://h//a", "file:///b") is None
    assert service.process().activated == ids
