"""``panda demo``: a whole PanDA installation on this machine, running one task end to end.

It starts a server on embedded SQLite in a temporary folder, a local storage element (a folder,
reached with the ``cp`` copytool), the LOCAL_DEMO site from ``site_configs/``, and the pilot
factory with the ``local`` scheduler backend. Its pilots are one-file pilots, as on a site: the
factory's batch script fetches the server's signed pilot file, verifies it with the pinned key,
caches it (in the demo's folder) and runs it with ``--node-python`` (default: the Python that
runs the demo); ``--pilot-launch installed`` runs this host's ``panda pilot`` instead. It
registers input files, submits a task, shows progress, prints a summary, and removes every
process it started, also on Ctrl-C.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

SITE = "LOCAL_DEMO"
SE_NAME = "LOCAL_SE"


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Demo:
    def __init__(self, workdir: Path, n_jobs: int, timeout: float, keep: bool, out=sys.stdout,
                 job_seconds: float = 0.0, pilot_launch: str = "onefile",
                 node_python: str | None = None):
        self.workdir = workdir
        self.pilot_launch = pilot_launch
        self.node_python = node_python or sys.executable
        self.n_jobs = n_jobs
        self.job_seconds = job_seconds
        self.timeout = timeout
        self.keep = keep
        self.served: tuple[str, int, str] | None = None     # url, task id, user token
        self.out = out
        self.procs: list[subprocess.Popen] = []
        self.se_root = workdir / "se"
        self.env = {**os.environ, "PANDA_SE_ROOT": str(self.se_root),
                    "PANDA_LOG_LEVEL": os.environ.get("PANDA_LOG_LEVEL", "INFO")}
        self.env.pop("PANDA_AUTH_TOKEN", None)
        # the nodes' pilot cache (docs/pilot.md) in the demo's folder, not the user's home
        self.env["PANDA_PILOT_CACHE"] = str(workdir / "node-cache")
        # every process of this demo inherits this mark, so cleanup finds pilots and payloads
        # even after their parent is gone
        self.mark = f"{os.getpid()}-{time.time_ns()}"
        self.env["PANDA_DEMO_ID"] = self.mark

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # ------------------------------------------------------------------ processes
    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        logf = open(self.workdir / f"{name}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "panda_wms.cli", *argv], stdout=logf,
                                stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        """Stop what we started, children included (pilots run in sessions of their own)."""
        import psutil

        tree: dict[int, psutil.Process] = {}
        for proc in self.procs:
            try:
                tree.update((c.pid, c) for c in psutil.Process(proc.pid).children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        for proc in reversed(self.procs):   # factory first: it stops submitting
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        me = os.getpid()
        for p in psutil.process_iter():
            try:
                if p.pid != me and p.environ().get("PANDA_DEMO_ID") == self.mark:
                    tree[p.pid] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        for p in tree.values():
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(tree.values()), timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass

    # ------------------------------------------------------------------ steps
    def run(self) -> int:
        from server.auth import KeyStore

        from panda_core.client import ApiClient
        from panda_core.replicas import replica_path

        t0 = time.monotonic()
        sites_dir = self.workdir / "sites"
        sites_dir.mkdir()
        from site_configs import EXAMPLES_DIR
        shutil.copy(EXAMPLES_DIR / f"{SITE}.yaml", sites_dir / f"{SITE}.yaml")
        keys_dir = self.workdir / "keys"
        keys = KeyStore(keys_dir)
        user_token = keys.issue_token("demo-user", "user")
        admin_token = keys.issue_token("demo-admin", "admin")
        pilot_token_file = self.workdir / "pilot.token"
        pilot_token_file.write_text(keys.issue_token("demo-pilot", "pilot", site=SITE))
        pilot_token_file.chmod(0o600)
        server_key_file = self.workdir / "server-key.pem"    # pinned for the pilots, as a
        server_key_file.write_text(keys.public_key_pem)       # deployment would pin it

        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        self.say(f"workdir      {self.workdir}")
        self.start("server", ["server", "--db", f"sqlite:///{self.workdir / 'panda.db'}",
                              "--port", str(port), "--key-dir", str(keys_dir),
                              "--site-configs", str(sites_dir)])
        admin = ApiClient(url, admin_token, timeout=10)
        self._wait_server(admin)
        self.say(f"server       {url}")
        self.say(f"monitor      {url}/monitor/tasks")

        # input files on the storage element, registered with the server
        scope, dataset = "demo", "demo.inputs"
        files = []
        for i in range(self.n_jobs):
            lfn = f"demo.input.{i:04d}.txt"
            data = f"input file {i}\n".encode() * (100 + i)
            path = self.se_root / replica_path(scope, lfn)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            files.append({"lfn": lfn, "fsize": len(data),
                          "checksum": f"ad:{zlib.adler32(data) & 0xffffffff:08x}"})
        user = ApiClient(url, user_token, timeout=10)
        user.add_files(dataset, scope, files, ddm_endpoint=SE_NAME)
        self.say(f"storage      file://{self.se_root} ({len(files)} input files registered)")

        task = {
            "name": "demo", "scope": scope, "transformation": "/bin/sh",
            "job_parameters": "-c 'sha256sum ${IN} > ${OUT} && wc -c ${IN} >> ${OUT}"
                              + (f" && sleep {self.job_seconds:g}" if self.job_seconds else "")
                              + "'",
            "input_dataset": dataset, "output_dataset": "demo.outputs",
            "outputs": ["demo.output.${SN}.txt"], "files_per_job": 1, "site": SITE,
            "priority": 1000, "resources": {"cores": 1, "memory_mb": 500, "walltime_s": 600,
                                            "disk_mb": 100},
            "max_attempts": 2,
        }
        task_id = user.submit_task(task)
        self.say(f"task         {task_id} submitted: {user.last_message}")
        self.say(f"task page    {url}/monitor/tasks/{task_id}")

        launch = ["--pilot-launch", self.pilot_launch]
        if self.pilot_launch == "onefile":
            version = admin.pilot_files()["default"]        # built now, the first time
            launch += ["--node-python", self.node_python]
            self.say(f"pilots       one-file pilot {version}: the batch script fetches it, "
                     f"verifies it with the pinned key, caches it in "
                     f"{self.env['PANDA_PILOT_CACHE']} and runs it with {self.node_python}")
        else:
            self.say(f"pilots       installed: {sys.executable} -m panda_wms.cli pilot")
        self.start("factory", ["factory", "--server", url, "--site-configs", str(sites_dir),
                               "--interval", "1", "--pilot-token-file", str(pilot_token_file),
                               "--token-file", str(pilot_token_file),
                               "--server-public-key", str(server_key_file),
                               "--state-dir", str(self.workdir / "factory"), *launch])
        details = self._watch(admin, task_id)
        jobs = admin.jobs(task_id)
        ok = self._summary(details, jobs, time.monotonic() - t0)
        self.served = (url, task_id, user_token)
        return 0 if ok else 1

    def serve_until_interrupted(self) -> None:
        """``--serve``: keep the server (and the monitor) up until Ctrl-C, so the URLs printed
        work; the user's token is left in the folder for the commands."""
        if self.served is None:
            return
        url, task_id, user_token = self.served
        token_file = self.workdir / "user.token"
        token_file.write_text(user_token)
        token_file.chmod(0o600)
        self.say("")
        self.say(f"serving      {url}/monitor/tasks/{task_id} until Ctrl-C")
        self.say(f"try          PANDA_URL={url} panda jobs --task {task_id}")
        self.say(f"             PANDA_URL={url} panda tasks --token-file {token_file}")
        try:
            while self.procs[0].poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            sys.stderr.write("\nstopping the server, the factory and the pilots\n")
            return
        raise RuntimeError(f"the server exited with {self.procs[0].returncode}; see "
                           f"{self.workdir / 'server.log'}")

    def _wait_server(self, client) -> None:
        from panda_core.client import ClientError
        deadline = time.monotonic() + 30
        while True:
            try:
                client.is_alive()
                return
            except ClientError:
                if self.procs[0].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start; see "
                                       f"{self.workdir / 'server.log'}:\n"
                                       + (self.workdir / "server.log").read_text()[-2000:])
                time.sleep(0.1)

    def _watch(self, client, task_id: int) -> dict:
        deadline = time.monotonic() + self.timeout
        tty = self.out.isatty()
        last = ""
        while True:
            details = client.task_details(task_id)
            counts = details.get("jobs", {})
            line = (f"progress     {details['status']:<9} " + " ".join(
                f"{k}={v}" for k, v in sorted(counts.items())))
            if tty:
                self.out.write("\r" + line.ljust(100))
                self.out.flush()
            elif line != last:
                self.say(line)
            last = line
            if details["status"] in ("done", "finished", "failed", "aborted"):
                break
            if time.monotonic() > deadline:
                if tty:
                    self.out.write("\n")
                self.say(f"timeout      the task did not end within {self.timeout:.0f} s")
                break
            for proc, name in zip(self.procs, ("server", "factory")):
                if proc.poll() is not None:
                    raise RuntimeError(f"the {name} exited with {proc.returncode}; see "
                                       f"{self.workdir / (name + '.log')}")
            time.sleep(0.5)
        if tty:
            self.out.write("\n")
        return details

    def _summary(self, details: dict, jobs: list[dict], wall: float) -> bool:
        by_state = Counter(j["status"] for j in jobs)
        by_site = Counter((j["site"], j["status"]) for j in jobs)
        self.say("")
        self.say(f"{'summary':<14}task {details['task_id']} {details['status']}")
        self.say(f"  {'state':<14}{'jobs':>6}")
        for state, n in sorted(by_state.items()):
            self.say(f"  {state:<14}{n:>6}")
        self.say(f"  {'site':<14}{'state':<12}{'jobs':>6}")
        for (site, state), n in sorted(by_site.items()):
            self.say(f"  {site:<14}{state:<12}{n:>6}")
        walls = [_seconds(j["end_time"]) - _seconds(j["start_time"]) for j in jobs
                 if j.get("end_time") and j.get("start_time")]
        self.say(f"  wall time     {wall:.1f} s for the demo")
        if walls:
            self.say(f"  job wall time mean {sum(walls) / len(walls):.2f} s, max {max(walls):.2f} s"
                     f" over {len(walls)} jobs")
        finished = by_state.get("finished", 0)
        all_ok = details["status"] == "done" and finished == self.n_jobs
        self.say(f"  result        {'all' if all_ok else 'NOT all'} {self.n_jobs} jobs finished"
                 f" ({finished} finished)")
        if not all_ok:
            self.say(f"  logs          {self.workdir}")
        return all_ok


def _seconds(iso: str) -> float:
    import datetime as dt
    return dt.datetime.fromisoformat(iso).timestamp()


def main(argv: list[str]) -> int:
    from panda_core.logs import setup_logging

    p = argparse.ArgumentParser(prog="panda demo", description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=20, help="jobs in the demo task")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for the task")
    p.add_argument("--job-seconds", type=float, default=0.0,
                   help="each job also sleeps this long (to watch jobs run in the monitor)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--serve", action="store_true",
                   help="after the task, keep the server and its monitor up until Ctrl-C")
    p.add_argument("--workdir", help="use this folder instead of a temporary one")
    p.add_argument("--pilot-launch", choices=["onefile", "installed"], default="onefile",
                   help="onefile (default): pilots as on a site, the server's signed pilot file "
                        "fetched and verified by the batch script; installed: this host's "
                        "'panda pilot'")
    p.add_argument("--node-python", metavar="PATH",
                   help="the Python that runs one-file pilots, e.g. /usr/bin/python3 for a node "
                        "without panda-wms (default: the one running the demo)")
    args = p.parse_args(argv)
    setup_logging(os.environ.get("PANDA_LOG_LEVEL", "WARNING"))
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="panda-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    demo = Demo(workdir, args.jobs, args.timeout, args.keep, job_seconds=args.job_seconds,
                pilot_launch=args.pilot_launch, node_python=args.node_python)

    def _interrupt(signum, _frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _interrupt)
    rc = 1
    try:
        rc = demo.run()
        if args.serve:
            demo.serve_until_interrupted()
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted: stopping the server, the factory and the pilots\n")
        rc = 130
    except Exception as exc:  # noqa: BLE001 - say what broke, then clean up
        sys.stderr.write(f"panda demo: {exc}\n")
        rc = 1
    finally:
        demo.stop_all()
        if not args.keep and not args.workdir and rc == 0:
            shutil.rmtree(workdir, ignore_errors=True)
        elif rc != 0:
            sys.stderr.write(f"panda demo: logs kept in {workdir}\n")
    return rc
