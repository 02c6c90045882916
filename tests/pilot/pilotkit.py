"""Helpers for the pilot's tests: a site on a local storage element, jobs, a pilot subprocess.

(Not a conftest.py: tests/ has one already, and two modules named ``conftest`` would clash.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fakepanda import FakePanda
from testkit import put_input  # noqa: F401 - pilot tests import it from here

SITE = "PILOT_TEST"
TOKEN = "pilot-secret-token-123"


def site_config(se: Path, **overrides) -> dict:
    cfg = {
        "name": SITE, "region": "local", "status": "online",
        "resources": {"cores": 1, "memory_mb": 2000, "max_walltime_s": 3600, "max_disk_mb": 2000},
        "storage": {"input": {"name": "TEST_SE", "url": f"file://{se}"},
                    "output": {"name": "TEST_SE", "url": f"file://{se}"}},
        "copytools": {"input": {"name": "cp", "options": {}}, "output": {"name": "cp", "options": {}}},
        "direct_read": False,
        "transfer": {"timeout_s": 30, "retries": 0},
        "limits": {"looping_s": 600, "min_free_disk_mb": 1, "max_workdir_mb": 2000,
                   "heartbeat_s": 1800},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def make_job(panda_id: int, script: str = "true", inputs: list[dict] | None = None,
             outputs: list[str] | None = None, scope: str = "test", log: bool = True,
             transformation: str = "/bin/sh", **fields) -> dict:
    """A job in PanDA's getJob shape; the payload is ``sh -c SCRIPT``."""
    import shlex

    inputs = inputs or []
    outputs = outputs or []
    log_lfn = f"job{panda_id}.log.tgz"
    outs = outputs + ([log_lfn] if log else [])
    job = {
        "PandaID": panda_id, "attemptNr": 1, "taskID": 1, "jobsetID": 1, "prodSourceLabel": "managed",
        "transformation": transformation, "jobPars": "-c " + shlex.quote(script),
        "inFiles": ",".join(f["lfn"] for f in inputs), "GUID": ",".join(f"guid-{f['lfn']}" for f in inputs),
        "fsize": ",".join(str(f["fsize"]) for f in inputs),
        "checksum": ",".join(f["checksum"] for f in inputs),
        "scopeIn": ",".join(f["scope"] for f in inputs),
        "outFiles": ",".join(outs), "scopeOut": ",".join(scope for _ in outputs),
        "realDatasets": ",".join("ds.out" for _ in outs),
        "logFile": log_lfn if log else "NULL", "logGUID": f"logguid-{panda_id}" if log else "NULL",
        "scopeLog": scope, "maxWalltime": 600, "minRamCount": 0, "maxDiskCount": 0, "coreCount": 1,
        "transferType": "NULL",
    }
    job.update(fields)
    return job


@pytest.fixture
def se(tmp_path) -> Path:
    path = tmp_path / "se"
    path.mkdir()
    return path


@pytest.fixture
def fake(se):
    server = FakePanda(site_config(se), token=TOKEN).start()
    yield server
    server.stop()
    os.unlink(server.key_file)


def pilot_cmd(fake: FakePanda, workdir: Path, *args: str) -> list[str]:
    """The pilot's command line against ``fake``, with the fake's key pinned (as the factory pins
    the server's) unless ``args`` pin one."""
    pin = [] if {"--public-key", "--public-key-fingerprint"} & set(args) \
        or not hasattr(fake, "key_file") else ["--public-key", fake.key_file]
    return [sys.executable, "-m", "panda_wms.cli", "pilot", "--server", fake.url if hasattr(fake, "port")
            else fake, "--site", SITE, "--workdir", str(workdir), "--monitor-interval", "0.2",
            "--server-retries", "2", "--server-backoff", "0.2", "--transfer-backoff", "0.1",
            *pin, *args]


def pilot_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PANDA_AUTH_TOKEN"] = TOKEN
    env["PANDA_LOG_LEVEL"] = "INFO"
    env.update(extra or {})
    return env


def run_pilot(fake: FakePanda, workdir: Path, *args: str, timeout: float = 60,
              env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(pilot_cmd(fake, workdir, *args), env=pilot_env(env), capture_output=True,
                          text=True, timeout=timeout)


def metrics(update: dict) -> dict:
    """jobMetrics 'k=v k=v' as a dict."""
    return dict(item.split("=", 1) for item in update.get("jobMetrics", "").split() if "=" in item)


def stored(update: dict) -> dict:
    return json.loads(update.get("xml") or "{}")
