"""Helpers shared by every test: free ports, waiting for HTTP, a real ``panda server`` subprocess.

Import as ``from testkit import ...``: several test folders have a conftest.py, and pytest
imports each as a module named ``conftest``, so ``from conftest import`` picks whichever came first.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import requests

from panda_core.replicas import replica_path
from peers import free_port, stop_process  # noqa: F401 - free_port is re-exported

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_SITES = REPO / "site_configs"


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen | None = None,
              verify: str | bool = True) -> None:
    """Wait until ``url`` answers; fail early with the process's output if it died.
    ``verify``: the CA bundle of an https ``url``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered:\n{out}")
        try:
            requests.get(url, timeout=1, verify=verify)
            return
        except requests.RequestException:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@dataclass
class RunningServer:
    url: str
    db_url: str
    key_dir: Path
    proc: subprocess.Popen
    log_path: Path
    ca: str | None = None          # the CA bundle of an https server

    def token(self, role: str = "admin", subject: str = "tester", site: str | None = None) -> str:
        """Issue a bearer token signed with this server's key."""
        cmd = [sys.executable, "-m", "panda_wms.cli", "token", "issue", "--key-dir",
               str(self.key_dir), "--role", role, "--subject", subject]
        if site:
            cmd += ["--site", site]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()

    def public_key_file(self) -> Path:
        """A PEM file of this server's job-signing key, for pilots to pin (as a deployment pins
        it: out of band; here asked of the server itself, with no one in between)."""
        path = self.key_dir.parent / "server-public-key.pem"
        if not path.exists():
            reply = requests.get(self.url + "/api/v1/system/get_public_key", timeout=10,
                                 verify=self.ca or True)
            path.write_text(reply.json()["data"])
        return path

    def key_fingerprint(self) -> str:
        """``sha256:...`` of this server's job-signing key (what the factory is given)."""
        from panda_core.trust import key_fingerprint
        return key_fingerprint(self.public_key_file().read_text())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(tmp: Path, db_url: str | None = None, site_dir: Path | None = None,
                 extra: list[str] | None = None, env: dict | None = None,
                 tls=None, preexec_fn=None) -> RunningServer:
    """Start ``panda server`` as a subprocess on a free loopback port; over https with the
    certificate of ``tls`` (``peers.make_test_ca``) if given; ``preexec_fn`` runs in the child
    before the server starts (say, to lower its resource limits)."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    db_url = db_url or f"sqlite:///{tmp / 'panda.db'}"
    key_dir = tmp / "keys"
    log_path = tmp / "server.log"
    cmd = [sys.executable, "-m", "panda_wms.cli", "server", "--db", db_url, "--port", str(port),
           "--host", "127.0.0.1", "--key-dir", str(key_dir)]
    if site_dir is not None:
        cmd += ["--site-configs", str(site_dir)]
    if tls is not None:
        cmd += ["--certfile", str(tls.cert), "--keyfile", str(tls.key)]
    cmd += extra or []
    logf = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True,
                            preexec_fn=preexec_fn)
    url = f"{'https' if tls is not None else 'http'}://127.0.0.1:{port}"
    try:
        wait_http(url + "/api/v1/system/is_alive", proc=proc,
                  verify=str(tls.ca) if tls is not None else True)
    except Exception:
        proc.kill()
        raise RuntimeError(f"server did not start:\n{log_path.read_text()}") from None
    return RunningServer(url=url, db_url=db_url, key_dir=key_dir, proc=proc, log_path=log_path,
                         ca=str(tls.ca) if tls is not None else None)


def stop_server(server: RunningServer) -> None:
    stop_process(server.proc)


def put_input(se: Path, scope: str, lfn: str, data: bytes, store: bool = True) -> dict:
    """Place a file on a storage element's folder (unless ``store`` is false: registered but
    missing); return its catalogue entry (lfn, scope, fsize, adler32 checksum)."""
    if store:
        path = se / replica_path(scope, lfn)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return {"lfn": lfn, "scope": scope, "fsize": len(data),
            "checksum": f"ad:{zlib.adler32(data):08x}"}


def wait_for(fn, what: str, timeout: float = 30.0):
    """Poll ``fn`` every 0.1 s until it returns something true; return that, or fail naming
    ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


WHEEL_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "panda-wms-tests"


def psutil_wheel(platform_tag: str = "manylinux2014_aarch64") -> Path:
    """psutil's abi3 wheel of the installed version for another platform, as an operator gets
    it (``pip download``, PyPI), kept in ``WHEEL_CACHE`` between runs; skips the test, saying
    why, where it cannot be downloaded."""
    import importlib.metadata

    import pytest

    version = importlib.metadata.version("psutil")
    folder = WHEEL_CACHE / f"psutil-{version}-{platform_tag}"
    found = sorted(folder.glob("psutil-*.whl")) if folder.is_dir() else []
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                              "--only-binary=:all:", "--platform", platform_tag, "-d",
                              str(folder), f"psutil=={version}"],
                             capture_output=True, text=True, timeout=300)
        found = sorted(folder.glob("psutil-*.whl"))
        if res.returncode != 0 or not found:
            pytest.skip(f"cannot download psutil {version} for {platform_tag}: "
                        f"{res.stderr.strip()[-300:]}")
    return found[0]


def elf_machine(path: Path) -> int:
    """The ``e_machine`` of an ELF file (62 x86-64, 183 AArch64): which CPU it is built for."""
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
