"""The one-file pilot: the server's signed file, the factory's batch script, a bare python3.

The node's Python in these tests is one with no panda-wms installed (Debian's /usr/bin/python3
and pyenv's), started by the batch script with ``-E -s``: no PYTHONPATH reaches it, and each
test checks first that this Python cannot import the pilot by itself.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from testkit import start_server, stop_server, wait_for
from panda_core.client import ApiClient
from schedulers.base import SchedulerError
from schedulers.bootstrap import batch_command, node_program, raw_key
from schedulers.factory import Factory
from server.pilotfile import platform_tag
from site_configs import parse_site_config
from test_factory import SITE, activate_jobs, site_dict

MAX_BYTES = 5_000_000
KEY_PATH = "/api/v1/system/get_public_key"


def has_pilot(python: str) -> bool:
    return subprocess.run([python, "-E", "-s", "-c", "import pilot.cli, panda_core"],
                          capture_output=True, cwd="/").returncode == 0


def bare_pythons() -> list[str]:
    """Pythons here without panda-wms: Debian's, and pyenv's of the versions the pilot claims
    (one with panda-wms on its path, such as a pyenv Python a checkout was installed into,
    proves nothing and is left out)."""
    found = []
    for path in ["/usr/bin/python3", *sorted(glob.glob(
            os.path.expanduser("~/.pyenv/versions/3.1[0-9]*/bin/python3")))]:
        if os.access(path, os.X_OK) and path not in found and not has_pilot(path):
            found.append(path)
    return found


def old_python() -> str | None:
    olds = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.[6-9].*/bin/python3")))
    return olds[-1] if olds else None


def node_env(cache: Path, python: str | None = None, **extra) -> dict:
    """A worker node's environment: no PYTHONPATH, no virtualenv, the system PATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH="/usr/local/bin:/usr/bin:/bin", PANDA_PILOT_CACHE=str(cache),
               PILOT_NOKILL="1", **extra)
    if python:
        env["PANDA_PYTHON"] = python
    return env


def assert_bare(python: str) -> None:
    assert not has_pilot(python), f"{python} has the pilot installed: the test would prove nothing"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onefile")
    env = pytest.MonkeyPatch()
    env.setenv("PANDA_SE_ROOT", str(tmp / "se"))
    sites = tmp / "sites"
    sites.mkdir()
    (sites / f"{SITE}.yaml").write_text(yaml.safe_dump(site_dict()))
    server = start_server(tmp / "srv", site_dir=sites, env={"PANDA_SE_ROOT": str(tmp / "se")})
    server.se = tmp / "se"
    server.tmp = tmp
    server.pilot_token = server.token("pilot", "onefile", site=SITE)
    server.site = parse_site_config(site_dict(), env={"PANDA_SE_ROOT": str(tmp / "se")})
    yield server
    stop_server(server)
    env.undo()


def factory(srv, tmp_path, **kw) -> Factory:
    return Factory(srv.url, [srv.site], token=srv.pilot_token, pilot_token=srv.pilot_token,
                   state_dir=tmp_path / "factory", factory_id="onefile-test",
                   server_key_fingerprint=srv.key_fingerprint(), pilot_launch="onefile", **kw)


def pilot_argv(srv, tmp_path, *extra) -> list[str]:
    """The factory's batch command of one pilot that takes one job."""
    f = factory(srv, tmp_path)
    f.pilot_args = ["--workdir", str(tmp_path / "wd"), "--max-jobs", "1",
                    "--monitor-interval", "0.2", *extra]
    return f.pilot_command(srv.site)


def run_node(argv, env, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd="/")


def job_states(srv, task_id) -> dict:
    return ApiClient(srv.url, srv.token("admin")).task_details(task_id)["jobs"]


def test_server_serves_a_signed_reproducible_file_under_the_size_limit(srv):
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from server.pilotfile import build

    listing = requests.get(srv.url + "/pilot/", timeout=30).json()
    version = listing["default"]
    assert [v["version"] for v in listing["versions"]] == [version]
    data = requests.get(f"{srv.url}/pilot/{version}/panda-pilot.pyz", timeout=30).content
    sig = requests.get(f"{srv.url}/pilot/{version}/panda-pilot.pyz.sig", timeout=30).content
    load_pem_public_key(srv.public_key_file().read_bytes()).verify(sig, data)   # raises if bad
    assert len(data) <= MAX_BYTES and listing["versions"][0]["size"] == len(data)
    assert build() == (version, data)           # the same code gives the same bytes
    for bad in ("0.0.0-nothere", "..", "a%2F..%2Fkeys"):
        reply = requests.get(f"{srv.url}/pilot/{bad}/panda-pilot.pyz", timeout=10)
        assert reply.status_code == 404, (bad, reply.status_code)
    assert requests.get(f"{srv.url}/pilot/{version}/keys", timeout=10).status_code == 404


def python_params() -> list:
    """Debian's and the oldest claimed in every run; the other versions with the slow tests."""
    found = bare_pythons()
    quick = {"/usr/bin/python3", next((p for p in found if p != "/usr/bin/python3"), None)}
    return [pytest.param(p, marks=() if p in quick else pytest.mark.slow) for p in found]


@pytest.mark.parametrize("python", python_params())
def test_bare_python_runs_a_job_through_the_batch_script(srv, tmp_path, python):
    """Cold (fetch, verify, unpack) and then warm (from the cache) on a Python without
    panda-wms; each run takes one job of the server to finished. The pilot, pinned by the
    key's fingerprint as the factory pins it, checks the job with the key its batch script
    verified the file with: it never asks the server for the key."""
    assert_bare(python)
    cache = tmp_path / "cache"
    env = node_env(cache, python, PANDA_AUTH_TOKEN=srv.pilot_token)
    # every Python once from cold; the warm start (the cache) once, with Debian's
    for attempt in ("cold", "warm")[:2 if python == "/usr/bin/python3" else 1]:
        task_id = activate_jobs(srv, 1, name=f"of{attempt}{Path(python).parent.parent.name}")
        srv.public_key_file()              # the test's own request for the key, made once
        key_asked = srv.log().count(KEY_PATH)
        argv = pilot_argv(srv, tmp_path)
        assert "--public-key-fingerprint" in argv and "--public-key" not in argv
        # the factory asked for the key once (to put it into the batch script): once that is in
        # the server's log (written after the reply), whatever comes after is the pilot's
        key_asked = wait_for(lambda: srv.log().count(KEY_PATH) == key_asked + 1 and key_asked + 1,
                             "the factory's key request logged")
        res = run_node(argv, env)
        assert res.returncode == 0, (attempt, res.stderr[-3000:])
        assert srv.log().count(KEY_PATH) == key_asked, \
            "the pilot fetched the key its batch script carries"
        assert job_states(srv, task_id) == {"finished": 1}, (attempt, res.stderr[-6000:].replace("\n", " | "))
        assert f"on Python {python_version(python)} ({python})" in res.stderr
    [unpacked] = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert (unpacked / platform_tag() / "PANDA_PILOT.json").exists()
    assert "panda-wms-pilot" in res.stderr


def python_version(python: str) -> str:
    return subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_factory_local_backend_runs_onefile_pilots(srv, tmp_path, monkeypatch):
    """The factory's own path: its batch script through the local backend, Debian's python3."""
    assert_bare("/usr/bin/python3")
    task_id = activate_jobs(srv, 2, name="oflocal")
    f = factory(srv, tmp_path, node_python="/usr/bin/python3")
    f.pilot_args = ["--monitor-interval", "0.2"]
    monkeypatch.setenv("PANDA_PILOT_CACHE", str(tmp_path / "cache"))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and job_states(srv, task_id) != {"finished": 2}:
        f.run_once()
        time.sleep(0.3)
    outs = [p.read_text()[-1500:] for p in (tmp_path / "factory").rglob("pilot.log")]
    assert job_states(srv, task_id) == {"finished": 2}, outs
    assert any("/usr/bin/python3" in o for o in outs), outs
    f.cancel_all()


def test_tampered_file_is_refused_with_a_clear_error(srv, tmp_path):
    """A man in the middle changes one byte of the file on its way to the node (the server
    itself refuses to serve a stored file whose bytes changed: tests/server/test_pilotfile.py)."""
    from peers import TamperingProxy

    task_id = activate_jobs(srv, 1, name="oftampered")
    cache = tmp_path / "cache"
    with TamperingProxy(srv.url) as proxy:
        argv = [proxy.url if a == srv.url else a for a in pilot_argv(srv, tmp_path)]
        res = run_node(argv, node_env(cache, "/usr/bin/python3",
                                      PANDA_AUTH_TOKEN=srv.pilot_token))
    assert proxy.tampered == 1
    assert res.returncode == 4, res.stderr
    assert "panda-pilot bootstrap: REFUSED" in res.stderr
    assert "signature does not verify with the pinned server key sha256:" in res.stderr
    assert srv.key_fingerprint().split(":")[1] in res.stderr
    assert "Traceback" not in res.stderr
    assert [p for p in cache.iterdir()] == []           # nothing unpacked, nothing run
    assert job_states(srv, task_id) == {"activated": 1}     # left for a sound pilot
    admin = ApiClient(srv.url, srv.token("admin"))        # ... and out of the next tests' way
    ids = [int(j.get("PandaID") or j.get("panda_id")) for j in admin.jobs(task_id)]
    assert admin.kill_jobs(ids) == [True]


def test_signed_file_of_another_version_and_unknown_version_are_refused(srv, tmp_path):
    version = requests.get(srv.url + "/pilot/", timeout=30).json()["default"]
    root = srv.key_dir / "pilot"
    shutil.copytree(root / version, root / "0.0.1-replayed")   # validly signed, wrong name
    try:
        key = raw_key(srv.public_key_file().read_text(), srv.key_fingerprint())
        env = node_env(tmp_path / "cache", "/usr/bin/python3")
        res = run_node(batch_command(srv.url, "0.0.1-replayed", key, ["--help"]), env)
        assert res.returncode == 4, res.stderr
        assert f"it is version '{version}', not the '0.0.1-replayed' asked for" in res.stderr
        res = run_node(batch_command(srv.url, "9.9.9-missing", key, ["--help"]), env)
        assert res.returncode == 3, res.stderr
        assert "cannot fetch the pilot file" in res.stderr and "HTTP 404" in res.stderr
        # another key pinned: the server's valid file is refused
        res = run_node(batch_command(srv.url, version, _other_key(), ["--help"]), env)
        assert res.returncode == 4 and "REFUSED" in res.stderr, res.stderr
    finally:
        shutil.rmtree(root / "0.0.1-replayed")


def _other_key() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_node_refusals_cache_python_and_missing_python(srv, tmp_path):
    version = requests.get(srv.url + "/pilot/", timeout=30).json()["default"]
    key = raw_key(srv.public_key_file().read_text(), srv.key_fingerprint())
    argv = batch_command(srv.url, version, key, ["--help"])
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)                  # another user could swap the pilot there
    res = run_node(argv, node_env(shared, "/usr/bin/python3"))
    assert res.returncode == 5 and "is not this user's alone" in res.stderr, res.stderr
    res = run_node(argv, node_env(tmp_path / "c", "/nonexistent/python3"))
    assert res.returncode == 127
    assert "panda-pilot bootstrap: no /nonexistent/python3 on this node" in res.stderr
    old = old_python()
    if old:
        res = run_node(argv, node_env(tmp_path / "c", old))
        assert res.returncode == 1, res.stderr
        assert "is too old: the pilot needs 3.10 or newer" in res.stderr
        assert "Traceback" not in res.stderr
    # a good run, then the warm one runs from the cache without asking the server
    res = run_node(argv, node_env(tmp_path / "c", "/usr/bin/python3"))
    assert res.returncode == 0 and "usage: panda pilot" in res.stdout, res.stderr
    res = run_node(batch_command("http://127.0.0.1:1", version, key, ["--help"]),
                   node_env(tmp_path / "c", "/usr/bin/python3"))
    assert res.returncode == 0 and "usage: panda pilot" in res.stdout, res.stderr


def test_factory_refuses_onefile_without_a_pinned_or_with_a_wrong_key(srv, tmp_path):
    f = Factory(srv.url, [srv.site], state_dir=tmp_path / "f", pilot_launch="onefile")
    with pytest.raises(SchedulerError, match="needs the server key pinned"):
        f.pilot_command(srv.site)
    f = Factory(srv.url, [srv.site], state_dir=tmp_path / "f", pilot_launch="onefile",
                server_key_fingerprint="sha256:" + "0" * 64)
    with pytest.raises(SchedulerError, match="is not the pinned key"):
        f.pilot_command(srv.site)
    with pytest.raises(ValueError, match="pilot_launch"):
        Factory(srv.url, [srv.site], state_dir=tmp_path / "f", pilot_launch="docker")
    hostile = factory(srv, tmp_path)             # a default that would name a folder elsewhere
    hostile.api.pilot_files = lambda: {"default": "../../etc", "versions": []}
    with pytest.raises(SchedulerError, match="is not a version"):
        hostile.pilot_command(srv.site)
    key = raw_key(srv.public_key_file().read_text(), srv.key_fingerprint())
    res = run_node(batch_command(srv.url, "../x", key, ["--help"]),
                   node_env(tmp_path / "c", "/usr/bin/python3"))
    assert res.returncode == 2 and "'../x' is not a pilot version" in res.stderr, res.stderr
    with pytest.raises(Exception, match="version"):
        parse_site_config({**site_dict(), "pilots": {**site_dict()["pilots"],
                                                     "version": "../up"}})
    pinned = parse_site_config({**site_dict(), "pilots": {**site_dict()["pilots"],
                                                          "version": "0.0.7-pinned"}})
    argv = factory(srv, tmp_path).pilot_command(pinned)
    assert argv[:2] == ["/bin/sh", "-c"] and argv[5] == "0.0.7-pinned"
    assert "\n" not in argv[2] and "'" not in argv[2].split("-c '", 1)[1].rsplit("'", 1)[0]


def test_node_program_is_the_verifier_and_bootstrap_in_clear():
    text = node_program()
    assert "def verify(public_key" in text and "def prepare(server" in text
    compile(text, "node", "exec")


def test_node_names_its_platform_as_the_server_does_and_refuses_a_newer_python(monkeypatch):
    """The node program's platform word (os.uname(): no ``platform`` import on the way to the
    pilot) is server.pilotfile's (platform.machine()), or a file would be refused on its own
    platform."""
    monkeypatch.delenv("PANDA_PILOT_TEST_PLATFORM", raising=False)
    ns: dict = {}
    exec(compile(node_program().rsplit("sys.exit(", 1)[0], "node", "exec"), ns)
    assert ns["node_platform"]() == platform_tag()
    ns["check_node"]({"platform": platform_tag(), "python_requires": "3.10"}, "v1")   # runs
    with pytest.raises(ns["BootstrapError"], match="needs Python 99.0 or newer") as exc:
        ns["check_node"]({"platform": platform_tag(), "python_requires": "99.0"}, "v1")
    assert exc.value.code == 6


def test_worker_node_information_reaches_columns_and_the_monitor(srv, tmp_path):
    """Issue 16 item 6: the first update and the heartbeats carry the node's description; the
    server keeps it in columns; the job page, the job list's facets and the pilots page show it."""
    task_id = activate_jobs(srv, 1, name="ofnode")
    env = node_env(tmp_path / "cache", "/usr/bin/python3", PANDA_AUTH_TOKEN=srv.pilot_token)
    res = run_node(pilot_argv(srv, tmp_path, "--heartbeat", "0.3"), env)
    assert res.returncode == 0, res.stderr[-3000:]
    admin = ApiClient(srv.url, srv.token("admin"))
    [job] = admin.jobs(task_id)
    panda_id = int(job.get("PandaID") or job.get("panda_id"))
    headers = {"Authorization": f"Bearer {srv.token('admin')}"}
    page = requests.get(f"{srv.url}/monitor/jobs/{panda_id}?json", headers=headers,
                        timeout=30).json()["job"]
    version = requests.get(srv.url + "/pilot/", timeout=30).json()["default"]
    assert page["wn_pilot_version"] == f"panda-wms-pilot 0.1+{version}"
    assert page["wn_cpu_model"] and page["wn_cores"] == os.cpu_count()
    assert page["wn_mem_mb"] > 0 and page["wn_disk_free_mb"] > 0 and page["wn_load1"] >= 0
    html = requests.get(f"{srv.url}/monitor/jobs/{panda_id}", headers=headers, timeout=30).text
    assert 'id="workernode"' in html and page["wn_cpu_model"] in html
    facets = requests.get(f"{srv.url}/monitor/jobs?json&jeditaskid={task_id}", headers=headers,
                          timeout=30).json()["facets"]
    assert [v["value"] for v in facets["cpumodel"]] == [page["wn_cpu_model"]]
    nodes = requests.get(f"{srv.url}/monitor/pilots?json", headers=headers,
                         timeout=30).json()["nodes"]
    assert any(n["site"] == SITE and n["pilot_version"] == page["wn_pilot_version"]
               and n["jobs"] >= 1 for n in nodes), nodes


def test_https_server_verified_against_the_sites_ca_bundle(tmp_path):
    """Over https the batch script fetches with the CA bundle the factory wrote into it; with
    the system's CAs only, the server's certificate is refused and nothing runs."""
    from peers import make_test_ca

    tls = make_test_ca(tmp_path / "tls")
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / f"{SITE}.yaml").write_text(yaml.safe_dump(site_dict()))
    server = start_server(tmp_path / "srv", site_dir=sites, tls=tls)
    try:
        site = parse_site_config({**site_dict(), "trust": {"ca_bundle": str(tls.ca)}})
        f = Factory(server.url, [site], state_dir=tmp_path / "f", pilot_launch="onefile",
                    server_key_fingerprint=server.key_fingerprint(), ca_file=str(tls.ca))
        f.pilot_args = ["--help"]
        argv = f.pilot_command(site)
        assert argv[7] == str(tls.ca)
        res = run_node(argv, node_env(tmp_path / "cache", "/usr/bin/python3"))
        assert res.returncode == 0 and "usage: panda pilot" in res.stdout, res.stderr
        unverified = argv[:7] + ["", ""] + argv[9:]
        res = run_node(unverified, node_env(tmp_path / "cache2", "/usr/bin/python3"))
        assert res.returncode == 3, res.stderr
        assert "cannot fetch the pilot file https://127.0.0.1" in res.stderr
        assert "CERTIFICATE_VERIFY_FAILED" in res.stderr and "Traceback" not in res.stderr
        assert not any((tmp_path / "cache2").iterdir())
    finally:
        stop_server(server)


def test_pilots_unpacking_the_same_version_at_once_all_run(srv, tmp_path):
    """Four cold starts on one node at the same moment: each unpacks into its own folder and
    renames it into place; the first wins, the others take its copy, none fails."""
    version = requests.get(srv.url + "/pilot/", timeout=30).json()["default"]
    key = raw_key(srv.public_key_file().read_text(), srv.key_fingerprint())
    argv = batch_command(srv.url, version, key, ["--help"])
    env = node_env(tmp_path / "cache", "/usr/bin/python3")
    procs = [subprocess.Popen(argv, env=env, cwd="/", stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert all(rc == 0 and "usage: panda pilot" in out for rc, out, _ in results), results
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [version]
    assert [p.name for p in (tmp_path / "cache" / version).iterdir()] == [platform_tag()]


@pytest.fixture
def two_platforms(srv):
    """A version of the pilot file for this platform and aarch64 (psutil's real aarch64
    wheel), built into the server's pilot dir with ``panda pilotfile build --pilot-wheel``,
    as an operator does; removed afterwards, so the other tests see one version."""
    import sys

    from testkit import psutil_wheel

    wheel = psutil_wheel()
    res = subprocess.run([sys.executable, "-m", "panda_wms.cli", "pilotfile", "build",
                          "--key-dir", str(srv.key_dir), "--pilot-wheel", str(wheel)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    version = res.stdout.split()[0]
    yield version, wheel
    shutil.rmtree(srv.key_dir / "pilot" / version)
    (srv.key_dir / "pilot-built" / f"{version}.json").unlink()


def test_an_aarch64_node_gets_the_aarch64_extension_and_an_unknown_platform_is_refused(
        srv, tmp_path, two_platforms):
    import zipfile

    from testkit import elf_machine

    version, wheel = two_platforms
    [listed] = [v for v in requests.get(srv.url + "/pilot/", timeout=30).json()["versions"]
                if v["version"] == version]
    assert listed["platforms"] == sorted([platform_tag(), "linux-aarch64"])
    key = raw_key(srv.public_key_file().read_text(), srv.key_fingerprint())
    argv = batch_command(srv.url, version, key, ["--help"])
    cache = tmp_path / "cache"
    # a fake aarch64 node (the bootstrap's platform detection overridden): it unpacks the
    # aarch64 build of psutil's extension, byte for byte the wheel's, and nothing of x86-64
    res = run_node(argv, node_env(cache, "/usr/bin/python3",
                                  PANDA_PILOT_TEST_PLATFORM="linux-aarch64"))
    assert res.returncode == 0 and "usage: panda pilot" in res.stdout, res.stderr
    arm = cache / version / "linux-aarch64"
    [so] = list(arm.rglob("*.so"))
    assert so.relative_to(arm).as_posix() == "psutil/_psutil_linux.abi3.so"
    assert elf_machine(so) == 183                                    # EM_AARCH64
    with zipfile.ZipFile(wheel) as zf:
        assert so.read_bytes() == zf.read("psutil/_psutil_linux.abi3.so")
    assert not (arm / "_platforms").exists()
    # this node, from the same file: its own extension, and a real job with psutil watching
    task_id = activate_jobs(srv, 1, name="oftwoplat")
    f = factory(srv, tmp_path)
    f.pilot_args = ["--workdir", str(tmp_path / "wd"), "--max-jobs", "1",
                    "--monitor-interval", "0.2"]
    pinned = parse_site_config({**site_dict(), "pilots": {**site_dict()["pilots"],
                                                          "version": version}})
    res = run_node(f.pilot_command(pinned), node_env(cache, "/usr/bin/python3",
                                                     PANDA_AUTH_TOKEN=srv.pilot_token))
    assert res.returncode == 0, res.stderr[-3000:]
    assert job_states(srv, task_id) == {"finished": 1}, res.stderr[-3000:]
    [own] = list((cache / version / platform_tag()).rglob("*.so"))
    assert elf_machine(own) == 62                                    # EM_X86_64
    # a platform the file does not serve: refused by name, nothing unpacked
    res = run_node(argv, node_env(cache, "/usr/bin/python3",
                                  PANDA_PILOT_TEST_PLATFORM="linux-ppc64le"))
    assert res.returncode == 6, res.stderr
    assert (f"the pilot file {version} is built for {', '.join(listed['platforms'])}; this "
            "node is linux-ppc64le") in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in (cache / version).iterdir()) == sorted(listed["platforms"])
    res = run_node(argv, node_env(cache, "/usr/bin/python3", PANDA_PILOT_TEST_PLATFORM="../x"))
    assert res.returncode == 2 and "'../x' is not a platform" in res.stderr, res.stderr


def test_server_refuses_a_bad_pilot_wheel_at_start(tmp_path):
    import sys

    res = subprocess.run([sys.executable, "-m", "panda_wms.cli", "server", "--db",
                          f"sqlite:///{tmp_path / 'db'}", "--key-dir", str(tmp_path / "k"),
                          "--port", "0", "--pilot-wheel", str(tmp_path / "psutil.whl")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stderr
    assert "panda server: --pilot-wheel:" in res.stderr and "no such wheel file" in res.stderr
    assert "Traceback" not in res.stderr
