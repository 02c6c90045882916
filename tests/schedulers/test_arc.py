"""The arc backend against a real A-REX (Debian's nordugrid-arc-arex, fork LRMS) on loopback.

All CE jobs of this module are submitted at once by one fixture and then watched, because each
takes 20-90 s on the CE: a job that succeeds, one that exits 3, and one that sleeps to be
cancelled. The CE itself is session-wide (tests/schedulers/arc_ce.py).
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from peers import HungServer, free_port
from schedulers.arc import ArcBackend, normalize_ce, pilot_xrsl
from schedulers.base import FINAL_BATCH_STATES, BatchState, PilotSpec, SchedulerError, load_backend


pytestmark = [pytest.mark.arc, pytest.mark.slow]

TRICKY = 'a "quoted" word, (parens) $HOME and \\backslash'
CE_PATIENCE_S = 240       # REST states lag the job manager by up to ~90 s on this machine


@pytest.fixture(scope="module")
def backend(arc_ce):
    return load_backend("arc", **arc_ce.options)


def wait_for(backend, job_id, states, timeout=CE_PATIENCE_S):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        state = backend.status([job_id])[job_id]
        if not seen or seen[-1] != state:
            seen.append(state)
        if state in states:
            return state, seen
        if state in FINAL_BATCH_STATES:
            break
        time.sleep(2)
    raise AssertionError(f"job {job_id} never reached {states}; states seen: {seen}")


@pytest.fixture(scope="module")
def jobs(backend, arc_ce):
    """Submit the module's three jobs together and hand out their ids."""
    ok = PilotSpec(site="ARC_TEST", name="ok-pilot", walltime_s=600, memory_mb=500,
                   command=["/bin/sh", "-c", 'printf "env=%s\\n" "$PANDA_TEST_VAR"; '
                            'printf "arg=%s\\n" "$1"; echo "pilot ran"', "sh", TRICKY],
                   env={"PANDA_TEST_VAR": 'x "y" \'z\' $HOME `id`'})
    bad = PilotSpec(site="ARC_TEST", name="bad-pilot", walltime_s=600,
                    command=["/bin/sh", "-c", "echo failing >&2; exit 3"])
    sleeper = PilotSpec(site="ARC_TEST", name="sleep-pilot", walltime_s=600,
                        command=["/bin/sleep", "600"])
    ids = {name: backend.submit(spec) for name, spec in
           (("ok", ok), ("bad", bad), ("sleeper", sleeper))}
    yield ids
    for job_id in ids.values():
        arc_ce.kill_job_processes(job_id)


def test_loaded_through_stevedore(backend):
    assert isinstance(backend, ArcBackend)
    assert backend.client.base.endswith("/arex")


def test_submitted_pilot_runs_to_done_with_argv_and_env_intact(backend, jobs):
    state, seen = wait_for(backend, jobs["ok"], {BatchState.DONE})
    assert set(seen) <= {BatchState.QUEUED, BatchState.RUNNING, BatchState.DONE}
    out = backend.client.session_file(jobs["ok"], "pilot.out").decode()
    assert f"arg={TRICKY}\n" in out
    assert 'env=x "y" \'z\' $HOME `id`\n' in out
    assert "pilot ran" in out
    info = backend.details([jobs["ok"]])[jobs["ok"]]
    assert info.state == BatchState.DONE
    assert info.exit_code in (0, None)


def test_failing_pilot_is_failed_with_its_exit_code(backend, jobs):
    wait_for(backend, jobs["bad"], {BatchState.FAILED})
    info = backend.details([jobs["bad"]])[jobs["bad"]]
    assert info.state == BatchState.FAILED
    assert info.exit_code == 3 or "3" in info.reason, info
    err = backend.client.session_file(jobs["bad"], "pilot.err")
    assert err is not None and b"failing" in err


def test_cancel_running_pilot(backend, jobs, arc_ce):
    job_id = jobs["sleeper"]
    # running for real: REST may still say queued for a while (it lags the job manager)
    deadline = time.monotonic() + CE_PATIENCE_S
    while not arc_ce.job_running(job_id):
        assert time.monotonic() < deadline, backend.status([job_id])
        time.sleep(1)
    assert backend.status([job_id])[job_id] in (BatchState.QUEUED, BatchState.RUNNING)
    backend.cancel([job_id])
    state, _ = wait_for(backend, job_id, {BatchState.CANCELLED})
    assert state == BatchState.CANCELLED
    backend.cancel([job_id])            # cancelling again is not an error
    assert arc_ce.kill_job_processes(job_id) >= 0


def test_unknown_ids_are_unknown_and_cancel_ignores_them(backend):
    ghost = "Zz0NoSuchJobOnThisCE"
    assert backend.status([ghost]) == {ghost: BatchState.UNKNOWN}
    assert backend.status([]) == {}
    backend.cancel([ghost])


def test_hostile_id_refused_before_any_request(backend):
    with pytest.raises(SchedulerError, match="not an ARC job id"):
        backend.status(["../../etc/passwd"])
    with pytest.raises(SchedulerError, match="refusing session file name"):
        backend.client.session_file("abc", "../x")


def test_dead_ce_gives_clear_error(arc_ce):
    port = free_port()
    dead = ArcBackend(ce=f"https://127.0.0.1:{port}/arex", proxy=str(arc_ce.proxy),
                      ca_dir=str(arc_ce.ca_dir), timeout_s=5)
    with pytest.raises(SchedulerError, match="cannot connect"):
        dead.status(["abc"])


def test_hung_ce_times_out(arc_ce):
    with HungServer() as hung:
        slow = ArcBackend(ce=f"https://127.0.0.1:{hung.port}/arex", proxy=str(arc_ce.proxy),
                          ca_dir=str(arc_ce.ca_dir), timeout_s=1)
        started = time.monotonic()
        with pytest.raises(SchedulerError, match="no answer within 1 s"):
            slow.submit(PilotSpec(site="X", command=["/bin/true"]))
        assert time.monotonic() - started < 10


def test_missing_proxy_and_bad_options(arc_ce, tmp_path):
    nop = ArcBackend(ce=arc_ce.url, proxy=str(tmp_path / "none.pem"), ca_dir=str(arc_ce.ca_dir))
    with pytest.raises(SchedulerError, match="proxy .* is missing"):
        nop.status(["abc"])
    with pytest.raises(SchedulerError, match="unknown option"):
        ArcBackend(ce=arc_ce.url, partition="x")
    with pytest.raises(SchedulerError, match="'ce'"):
        ArcBackend()


def test_untrusted_ca_is_a_tls_error(arc_ce, tmp_path):
    empty = tmp_path / "ca"
    empty.mkdir()
    strict = ArcBackend(ce=arc_ce.url, proxy=str(arc_ce.proxy), ca_dir=str(empty), timeout_s=10)
    with pytest.raises(SchedulerError, match="TLS failed"):
        strict.status(["abc"])


def test_normalize_ce_and_xrsl_quoting():
    assert normalize_ce("ce.example.org") == "https://ce.example.org/arex"
    assert normalize_ce("https://ce:8443/arex/rest/1.0") == "https://ce:8443/arex"
    with pytest.raises(SchedulerError):
        normalize_ce("http://ce/arex")
    xrsl = pilot_xrsl(PilotSpec(site="S", command=["/bin/echo", 'a"b'], walltime_s=61,
                                cores=2, memory_mb=3000, env={"K": "v"}), queue="q")
    assert '(arguments="a""b")' in xrsl
    assert '(walltime="2")' in xrsl and '(count="2")' in xrsl and '(memory="1500")' in xrsl
    assert '(environment=("K" "v"))' in xrsl and '(queue="q")' in xrsl
    with pytest.raises(SchedulerError, match="not a valid variable name"):
        pilot_xrsl(PilotSpec(site="S", command=["/bin/true"], env={"A B": "x"}))


def test_delegated_proxy_reaches_the_job(arc_ce):
    """delegate=True: one REST delegation (a proxy signed here from the CE's CSR) named by every
    job; the CE gives the job that credential (its control dir holds it)."""
    from cryptography import x509

    backend = ArcBackend(**arc_ce.options, delegate=True)
    ids = [backend.submit(PilotSpec(site="ARC_TEST", name="delegated", walltime_s=600,
                                    command=["/bin/true"])) for _ in range(2)]
    delegation_id = backend._delegation[0]
    try:
        for job_id in ids:
            proxy = Path(f"/var/spool/arc/jobstatus/job.{job_id}.proxy")
            deadline = time.monotonic() + 30
            while not proxy.exists():
                assert time.monotonic() < deadline, arc_ce.log_tail(job_id)
                time.sleep(0.2)
            cert = x509.load_pem_x509_certificates(proxy.read_bytes())[0]
            own = x509.load_pem_x509_certificates(arc_ce.proxy.read_bytes())[0]
            # a proxy of our proxy: our subject plus one CN, made for this delegation
            assert cert.issuer == own.subject
            assert list(cert.subject.rdns)[:-1] == list(own.subject.rdns)
            assert cert.subject.rdns[-1].rfc4514_string() == f"CN={cert.serial_number}"
        assert backend._delegation[0] == delegation_id     # reused, not one per job
    finally:
        backend.cancel(ids)
        for job_id in ids:
            arc_ce.kill_job_processes(job_id)
