"""A real single-node Slurm for the tests: munged, slurmctld and slurmd, no systemd.

Follows ../shared/notes/slurm-single-node.md. Everything lives in a private scratch folder with
its own munge socket, free ports and SLURM_CONF, so it never touches a system Slurm; both daemons
bind to 127.0.0.1 only (CommunicationParameters=NoInAddrAny,NoCtldInAddrAny).
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from peers import free_port  # ports no other test process is handed at the same time

PACKAGES = ["slurm-wlm", "munge"]


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here (not root, packages cannot be installed); the reason says which."""


def ensure_installed() -> None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurm-wlm and munge are not installed and we are not root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if res.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {res.stderr[-500:]}")


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    host: str
    procs: dict[str, int] = field(default_factory=dict)   # daemon -> pid

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.env})

    def log(self, name: str) -> str:
        try:
            return (self.root / f"{name}.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Cancel every job, stop slurmd, slurmctld and munged, remove the scratch folder."""
        try:
            jobs = self.run("squeue", "-h", "-o", "%i", timeout=10).stdout.split()
            if jobs:
                self.run("scancel", *jobs, timeout=10)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and self.run(
                        "squeue", "-h", "-t", "running,completing", "-o", "%i",
                        timeout=10).stdout.strip():
                    time.sleep(0.2)
        except (subprocess.SubprocessError, OSError):
            pass
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.procs.get(name)
            if pid:
                _terminate(pid)
        shutil.rmtree(self.root, ignore_errors=True)


def _terminate(pid: int, grace: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_pid(path: Path, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = path.read_text().strip()
            if text:
                return int(text)
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"no pid file {path} after {timeout} s")


SLURM_CONF = """\
ClusterName=pandatest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
MinJobAge=300
KillWait=5
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def start() -> SlurmCluster:
    """Install (as root, if needed) and start a private single-node Slurm; wait until idle."""
    ensure_installed()
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting slurmd and munged needs root")
    root = Path(tempfile.mkdtemp(prefix="panda-slurm-"))
    root.chmod(0o711)                                  # munged must reach its socket folder
    host = socket.gethostname().split(".")[0]
    cluster = SlurmCluster(root=root, conf=root / "slurm.conf", host=host)
    try:
        munge = pwd.getpwnam("munge")
        mdir = root / "munge"
        mdir.mkdir(mode=0o711)
        key = mdir / "munge.key"
        if Path("/etc/munge/munge.key").exists():
            shutil.copy("/etc/munge/munge.key", key)
        else:
            key.write_bytes(os.urandom(128))
        for path in (mdir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)
        mdir.chmod(0o711)
        subprocess.run(["su", "-s", "/bin/sh", "munge", "-c",
                        f"munged --socket={mdir}/munge.socket --key-file={key} "
                        f"--log-file={mdir}/munged.log --pid-file={mdir}/munged.pid "
                        f"--seed-file={mdir}/munged.seed"], check=True, timeout=30,
                       capture_output=True)
        cluster.procs["munged"] = _read_pid(mdir / "munged.pid")
        for sub in ("state", "spool"):
            (root / sub).mkdir()
        mem = min(4000, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 - 500)
        cluster.conf.write_text(SLURM_CONF.format(
            host=host, root=root, ctld_port=free_port(), slurmd_port=free_port(),
            cpus=os.cpu_count() or 1, mem=mem))
        for daemon in ("slurmctld", "slurmd"):
            res = cluster.run(daemon, timeout=30)
            if res.returncode != 0:
                raise RuntimeError(f"{daemon} failed: {res.stderr}\n{cluster.log(daemon)}")
            cluster.procs[daemon] = _read_pid(root / f"{daemon}.pid")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = cluster.run("sinfo", "-h", "-o", "%T", timeout=10).stdout.strip()
            if state == "idle":
                return cluster
            time.sleep(0.2)
        raise RuntimeError(f"the Slurm node is {state!r}, not idle, after 30 s\n"
                           f"{cluster.log('slurmctld')}\n{cluster.log('slurmd')}")
    except BaseException:
        cluster.stop()
        raise
