"""``docs/deploy.md``, run as written: PostgreSQL, TLS, the server with several processes on a
public address behind nginx, the shipped systemd units, tokens, a Slurm site, the factory, input
files, a first task and the monitor, against the suite's PostgreSQL and a real Slurm.

The page's ``sh`` blocks run in one ``bash -euo pipefail`` in order; the settings block's
defaults are replaced through the environment (temporary folders, free ports, a database and
role of its own). There is no systemd here: the block marked ``# systemd`` is replaced by
:func:`start_units` (``systemd-analyze verify`` on the units, then each unit's ``ExecStart``
with its ``EnvironmentFile`` and ``WorkingDirectory``, as root, and nginx with a main config that
includes the site file). Not covered: systemd's sandboxing and restarts, Debian's nginx main
config, running as the ``panda`` user (the test's Python lives under /root, mode 0700).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from peers import free_port, make_test_ca
from testkit import REPO

sys.path.insert(0, str(REPO / "tests" / "schedulers"))
import slurm_cluster  # noqa: E402 - the real single-node Slurm of tests/schedulers

from test_readme import kill_marked  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.postgres]
UNITS = ("panda-server.service", "panda-factory.service")


def page_blocks() -> list[str]:
    text = (REPO / "docs" / "deploy.md").read_text()
    return re.findall(r"^```sh\n(.*?)^```$", text, flags=re.S | re.M)


def postgres_reachable() -> bool:
    return shutil.which("psql") is not None and subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-tAc", "select 1"],
        capture_output=True, text=True, timeout=20).stdout.strip() == "1"


def unit_service(path: Path) -> dict[str, str]:
    """The [Service] keys of a unit file (the last value of a repeated key)."""
    out, section = {}, ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def exec_argv(command: str, env: dict[str, str]) -> list[str]:
    """systemd's ExecStart: ``${VAR}`` is one word, ``$VAR`` splits on whitespace."""
    argv = []
    for word in shlex.split(command):
        whole = re.fullmatch(r"\$\{(\w+)\}", word)
        if whole:
            argv.append(env.get(whole.group(1), ""))
            continue
        argv.extend(re.sub(r"\$\{(\w+)\}|\$(\w+)",
                           lambda m: env.get(m.group(1) or m.group(2), ""), word).split()
                    if "$" in word else [word])
    return argv


STAND_IN = r'''
import sys
sys.path[:0] = [{tests!r}, {admin!r}]
from test_deploy import start_units
start_units()
'''


def start_units() -> None:
    """What ``systemctl enable --now`` and ``systemctl reload nginx`` do, for the test."""
    systemd_dir = Path(os.environ["SYSTEMD_DIR"])
    logs = Path(os.environ["DEPLOY_LOGS"])
    for unit in UNITS:
        if shutil.which("systemd-analyze") is None:
            sys.exit("systemd-analyze is missing (the 'systemd' package, tests/debian-packages.txt)")
        check = subprocess.run(["systemd-analyze", "verify", str(systemd_dir / unit)],
                               capture_output=True, text=True, timeout=60)
        if check.returncode != 0 or "bad unit file setting" in check.stderr:
            sys.exit(f"systemd-analyze verify {unit}:\n{check.stderr}")
        service = unit_service(systemd_dir / unit)
        env = {**os.environ, **env_file(Path(service["EnvironmentFile"]))}
        argv = exec_argv(service["ExecStart"], env)
        log = open(logs / f"{unit}.log", "w")
        subprocess.Popen(argv, cwd=service["WorkingDirectory"], env=env, stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True)
    prefix = logs / "nginx"
    prefix.mkdir(exist_ok=True)
    main = prefix / "nginx.conf"
    main.write_text(f"user root;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log;\n"
                    f"events {{}}\nhttp {{\n access_log {prefix}/access.log;\n"
                    f" include {os.environ['NGINX_SITES']}/*.conf;\n}}\n")
    for args in (["-t"], []):
        res = subprocess.run(["nginx", "-p", str(prefix), "-c", str(main), *args],
                             capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            sys.exit(f"nginx {' '.join(args)}: {res.stderr}")


@pytest.fixture(scope="module")
def slurm():
    try:
        cluster = slurm_cluster.start()
    except slurm_cluster.SlurmUnavailable as exc:
        pytest.skip(str(exc))
    yield cluster
    cluster.stop()


def test_deploy_page_runs_a_first_task(slurm, tmp_path):
    if not postgres_reachable():
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    if not shutil.which("nginx"):
        pytest.skip("nginx is not installed (tests/debian-packages.txt)")
    tls = make_test_ca(tmp_path / "ca")
    work = tmp_path / "work"
    shutil.copytree(REPO / "deploy", work / "deploy")
    logs = tmp_path / "logs"
    logs.mkdir()
    for name in ("etc", "var", "systemd", "nginx-sites", "home"):
        (tmp_path / name).mkdir()
    (tmp_path / "var").rmdir()               # the page makes it, owned by panda
    mark = uuid.uuid4().hex
    db = f"panda_deploy_{mark[:8]}"
    had_user = subprocess.run(["id", "panda"], capture_output=True).returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PANDA_", "SSL_CERT"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
        HOME=str(tmp_path / "home"), PANDA_TEST_RUN=mark, DEPLOY_LOGS=str(logs),
        PANDA_VENV=sys.prefix, PANDA_ETC=str(tmp_path / "etc"), PANDA_VAR=str(tmp_path / "var"),
        PANDA_PUBLIC_HOST="localhost", PANDA_PORT=str(free_port()), PROXY_PORT=str(free_port()),
        PANDA_PROCESSES="2", PANDA_FACTORY_INTERVAL="3", PGHOST="127.0.0.1", PANDA_DB_NAME=db, PANDA_DB_USER=db,
        SITE="DEPLOY_SLURM", SLURM_PARTITION="debug", SLURM_CONF=str(slurm.conf),
        HOST_CERT=str(tls.cert), HOST_KEY=str(tls.key), CA_BUNDLE=str(tls.ca),
        SYSTEMD_DIR=str(tmp_path / "systemd"), NGINX_SITES=str(tmp_path / "nginx-sites"))
    (tmp_path / "standin.py").write_text(STAND_IN.format(tests=str(REPO / "tests"),
                                                         admin=str(Path(__file__).parent)))
    parts = []
    for block in page_blocks():
        if block.startswith("# systemd\n"):
            block = f"{shlex.quote(sys.executable)} {shlex.quote(str(tmp_path / 'standin.py'))}\n"
        parts.append(block)
    script = work / "deploy.sh"
    script.write_text("set -euo pipefail\nset -x\n" + "\n".join(parts))
    try:
        res = subprocess.run(["bash", str(script)], cwd=work, env=env, capture_output=True,
                             text=True, timeout=900, start_new_session=True)
    finally:
        pid_file = logs / "nginx" / "nginx.pid"
        if pid_file.exists():
            subprocess.run(["kill", pid_file.read_text().strip()], capture_output=True)
        kill_marked(mark)
        subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-q", "-c",
                        f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)', "-c",
                        f'DROP ROLE IF EXISTS "{db}"'], capture_output=True, timeout=60)
        if not had_user:
            subprocess.run(["userdel", "panda"], capture_output=True)
    report = (res.stdout[-6000:] + "\n" + res.stderr[-6000:] + "\n" + "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs.glob("*.log")))
    assert res.returncode == 0, report
    assert "Traceback" not in res.stdout + res.stderr, report
    table = res.stdout.split("ID ", 1)[1]
    rows = [line.split() for line in table.splitlines()[2:] if re.match(r"\d+ +\d+ ", line)]
    # every input's job finished (an attempt that failed on the way would have been retried
    # and listed too: the task is done when each input's last attempt finished)
    assert "task 1 first: done" in res.stdout, report
    assert sum(row[3] == "finished" for row in rows) == 4, report
    assert all(row[2] == "DEPLOY_SLURM" for row in rows), report
    assert "monitor: https://localhost:" in res.stdout, report
    assert "schema at " in res.stdout and "(head)" in res.stdout, report
    server_log = (logs / "panda-server.service.log").read_text()
    assert "alembic.runtime" not in server_log
    # tokens: private files without a trailing newline
    for name in ("factory.token", "pilot.token", "admin.token"):
        token = tmp_path / "etc" / name
        assert token.stat().st_mode & 0o077 == 0 and not token.read_bytes().endswith(b"\n")
    assert (tmp_path / "etc" / "panda.env").stat().st_mode & 0o007 == 0
