"""Real peers for tests, on 127.0.0.1 only: the HTTP storage element, an XRootD server, and a
server that accepts connections and never answers (a hung storage element).

Importable by every part's tests (``from peers import start_se``; pytest puts tests/ on sys.path,
benchmarks put it there themselves). Test code: no library module imports it.
"""
from __future__ import annotations

import fcntl
import logging
import os
import pwd
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


#: where ``free_port`` counts the ports it handed out; shared by every test process here
PORT_COUNTER = Path(tempfile.gettempdir()) / "panda-wms-test-ports"
PORT_FLOOR = 20000


def _kernel_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _port_range() -> tuple[int, int] | None:
    """Ports below the kernel's ephemeral range (where client sockets take their local ports)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return (PORT_FLOOR, low) if low - PORT_FLOOR >= 1000 else None


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback TCP port that nothing listens on, for a peer a test is about to start.

    Binding port 0 and closing (the kernel's choice) lets two processes that ask at once (xdist
    workers, two test sessions) be given the same port before either peer binds it, and that
    port lies in the ephemeral range, where any client connection may take it meanwhile. So
    ports come from below that range, round-robin through a counter file that every test
    process on the machine shares under an flock: a port comes round again only after
    thousands of others. Without /proc or a writable counter, the kernel chooses.
    """
    span = _port_range()
    if span is None:
        return _kernel_port()
    lo, hi = span
    try:
        fd = os.open(PORT_COUNTER, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        return _kernel_port()
    with os.fdopen(fd, "r+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)      # released when the file closes
        text = fh.read().strip()
        port = int(text) if text.isdigit() else lo
        for _ in range(hi - lo):
            if not lo <= port < hi:
                port = lo
            if _bindable(port):
                break
            port += 1
        else:
            return _kernel_port()
        fh.seek(0)
        fh.truncate()
        fh.write(str(port + 1))
    return port


def _wait_tcp(port: int, timeout: float, proc: subprocess.Popen | None, log: Path | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            text = log.read_text(errors="replace") if log and log.exists() else ""
            raise RuntimeError(f"peer exited with {proc.returncode} before listening:\n{text}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on {LOOPBACK}:{port} within {timeout} s")


def stop_process(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL: how every test peer is stopped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class RunningSE:
    """A ``panda se`` subprocess; ``url`` is its root URL."""
    url: str
    root: Path
    port: int
    proc: subprocess.Popen
    log_path: Path
    token: str | None = None

    def stop(self) -> None:
        stop_process(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> "RunningSE":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_se(root: str | Path, token: str | None = None, port: int | None = None,
             log_path: str | Path | None = None, timeout: float = 20.0,
             strict_webdav: bool = False, tls: "TestCA | None" = None,
             extra_args: list[str] | tuple[str, ...] = (), preexec_fn=None) -> RunningSE:
    """Start ``panda se`` on 127.0.0.1 (a free port unless given) and wait until it answers;
    with ``tls`` (see ``make_test_ca``) it serves HTTPS with a certificate for 127.0.0.1;
    ``preexec_fn`` runs in the child before it starts (say, to lower its resource limits)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = Path(log_path) if log_path else root.parent / f"se-{port}.log"
    cmd = [sys.executable, "-m", "panda_wms.cli", "se", "--root", str(root), "--port", str(port),
           "--host", LOOPBACK]
    if strict_webdav:
        cmd.append("--strict-webdav")
    cmd.extend(extra_args)
    if tls is not None:
        cmd += ["--cert", str(tls.cert), "--key", str(tls.key)]
    env = dict(os.environ)
    env.pop("PANDA_SE_TOKEN", None)
    if token:
        token_file = root.parent / f"se-{port}.token"
        token_file.write_text(token)
        token_file.chmod(0o600)
        cmd += ["--token-file", str(token_file)]
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=preexec_fn)
    scheme = "https" if tls is not None else "http"
    se = RunningSE(url=f"{scheme}://{LOOPBACK}:{port}", root=root, port=port, proc=proc,
                   log_path=log_path, token=token)
    try:
        deadline = time.monotonic() + timeout
        _wait_tcp(port, timeout, proc, log_path)
        _wait_http(se.url + "/", deadline, str(tls.ca) if tls is not None else True)
    except Exception:
        se.stop()
        raise
    return se


def _wait_http(url: str, deadline: float, verify) -> None:
    """Until the server answers an HTTP request (OPTIONS), not merely accepts connections."""
    import requests

    while True:
        try:
            if requests.options(url, timeout=1, verify=verify).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer OPTIONS in time")
        time.sleep(0.05)


@dataclass
class TestCA:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it (PEM files)."""
    ca: Path       # give clients this as their CA bundle
    cert: Path
    key: Path


def make_test_ca(folder: str | Path) -> TestCA:
    """Make a CA and a certificate for 127.0.0.1 / localhost in ``folder`` (cryptography)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "panda-wms test CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                            crl_sign=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                              critical=False)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(LOOPBACK)), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    out = TestCA(ca=folder / "ca.pem", cert=folder / "server.pem", key=folder / "server.key")
    out.ca.write_bytes(ca_cert.public_bytes(pem))
    out.cert.write_bytes(cert.public_bytes(pem))
    out.key.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    out.key.chmod(0o600)
    return out


class HungServer:
    """Accepts TCP connections on 127.0.0.1 and never answers: a storage element that hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{LOOPBACK}:{self.port}"
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self._conns.append(conn)  # held open, never read, never answered
            except OSError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for c in self._conns:
            c.close()
        self.sock.close()

    def __enter__(self) -> "HungServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TamperingProxy:
    """A man in the middle on plain http: forwards GETs to ``upstream`` and changes one byte of
    every reply whose path ends with ``suffix`` (the pilot file a batch job fetches), so the
    node's own check is what stands between it and the changed bytes."""

    def __init__(self, upstream: str, suffix: str = "/panda-pilot.pyz") -> None:
        import http.server
        import urllib.error
        import urllib.request

        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:            # noqa: N802 - http.server's name
                try:
                    with urllib.request.urlopen(upstream.rstrip("/") + self.path,
                                                timeout=30) as reply:
                        status, body = reply.status, reply.read()
                except urllib.error.HTTPError as exc:
                    status, body = exc.code, exc.read()
                if status == 200 and self.path.endswith(suffix):
                    changed = bytearray(body)
                    changed[len(changed) // 2] ^= 0x01
                    body = bytes(changed)
                    proxy.tampered += 1
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.tampered = 0
        self.httpd = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.url = f"http://{LOOPBACK}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "TamperingProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- XRootD --------------------------------------------------------------------------------------
XROOTD_USER = "pandaxrd"


def xrootd_available() -> str | None:
    """Why a real xrootd cannot run here, or None when it can."""
    for exe in ("xrootd", "xrdcp", "xrdfs"):
        if shutil.which(exe) is None:
            return f"{exe} is not installed (Debian packages xrootd-server, xrootd-client)"
    if os.geteuid() != 0:
        return "starting xrootd under its own user needs root"
    return None


def _ensure_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-M", "-r", "-s", "/usr/sbin/nologin", name], check=True,
                       capture_output=True)


@dataclass
class RunningXrootd:
    url: str                        # root://127.0.0.1:PORT/
    data: Path
    port: int
    proc: subprocess.Popen
    log_path: Path
    workdir: Path = field(repr=False, default=None)
    admin: Path = field(repr=False, default=None)

    def stop(self) -> None:
        stop_process(self.proc, 3)  # xrootd may linger on SIGTERM while clients stay connected
        for folder in (self.workdir, self.admin):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    def __enter__(self) -> "RunningXrootd":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


#: the open-file limit xrootd starts with (a site's xrootd.service sets 65536 as well)
XROOTD_FD_LIMIT = 65536


def _xrootd_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = XROOTD_FD_LIMIT if hard == resource.RLIM_INFINITY else min(hard, XROOTD_FD_LIMIT)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, cap), cap))


def start_xrootd(workdir: str | Path | None = None, timeout: float = 20.0) -> RunningXrootd:
    """:func:`_start_xrootd_once`, again once if xrootd was killed by a signal before it
    listened (a crash of xrootd's, not of the code under test; both outputs are kept)."""
    try:
        return _start_xrootd_once(workdir, timeout)
    except _XrootdCrashed as first:
        logging.getLogger(__name__).warning("%s; starting it once more", first)
        try:
            return _start_xrootd_once(workdir, timeout)
        except _XrootdCrashed as second:
            raise RuntimeError(f"{first}\nand again: {second}") from None


class _XrootdCrashed(RuntimeError):
    pass


def _start_xrootd_once(workdir: str | Path | None, timeout: float) -> RunningXrootd:
    """Start Debian's xrootd on 127.0.0.1 (adler32 checksums on); ``stop()`` removes its files.

    xrootd refuses to run as root, so it runs as a system user made for it, in the foreground
    (no -b) so the caller owns its process. Its folder is a fresh one directly below ``workdir``
    (default: the system temp dir), not below pytest's temp root: pytest resets that root to
    mode 0700 whenever a session starts, which would lock the xrootd user out mid-test.
    xrootd sizes its poller by its open-file limit (xrootd/xrootd#1962): under a limit of ~10^9,
    which CI's containers allow, it died with SIGSEGV before listening, so it starts with at
    most :data:`XROOTD_FD_LIMIT` whatever its caller's limit is.
    """
    why = xrootd_available()
    if why:
        raise RuntimeError(why)
    _ensure_user(XROOTD_USER)
    base = Path(tempfile.mkdtemp(prefix="panda-xrootd-", dir=str(workdir) if workdir else None))
    data = base / "data"
    data.mkdir()
    port = free_port()
    cfg = base / "xrootd.cfg"
    # the admin path holds a unix socket, whose path must stay short (~100 bytes)
    admin = Path(tempfile.mkdtemp(prefix="pxrd-"))
    cfg.write_text(f"xrd.port {port}\nall.export /\noss.localroot {data}\n"
                   f"xrootd.chksum adler32\nall.adminpath {admin}\n"
                   f"all.pidpath {admin}\n")
    for p in (base, data, admin):
        shutil.chown(p, XROOTD_USER, XROOTD_USER)
    p = base.parent  # the xrootd user must be able to reach its folder
    while p != p.parent:
        mode = p.stat().st_mode
        if not mode & 0o001:
            p.chmod(mode | 0o001)
        p = p.parent
    log_path = base / "xrootd.log"
    out_path = base / "xrootd.out"  # what xrootd says before its log is open
    with open(out_path, "w") as out:
        proc = subprocess.Popen(["xrootd", "-R", XROOTD_USER, "-c", str(cfg), "-l",
                                 str(log_path), "-n", f"panda{port}"], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=str(base),
                                preexec_fn=_xrootd_fd_limit)
    server = RunningXrootd(url=f"root://{LOOPBACK}:{port}/", data=data, port=port, proc=proc,
                           log_path=base / f"panda{port}" / "xrootd.log", workdir=base,
                           admin=admin)
    try:
        _wait_tcp(port, timeout, proc, log_path)
    except Exception as exc:
        said = "".join(p.read_text(errors="replace")[-2000:]
                       for p in [out_path, *base.rglob("xrootd.log")])
        server.stop()
        crashed = proc.returncode is not None and proc.returncode < 0
        raise (_XrootdCrashed if crashed else RuntimeError)(
            f"xrootd did not start: {exc}\n{said}") from None
    return server
