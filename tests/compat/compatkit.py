"""Shared names of the compatibility tests (a uniquely named module: several test folders have a
conftest.py, so tests import from here, not from ``conftest``)."""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from testkit import free_port

VENV = Path(os.environ.get("PANDA_WMS_PILOT3_VENV", "/var/tmp/panda-wms-pilot3-venv"))
PILOT_USER = "pandap3"          # made for these tests; pilot 3 never runs as root
SITE = "LOCAL_DEMO"


def adler32_hex(data: bytes) -> str:
    return f"{zlib.adler32(data):08x}"


# ---------------------------------------------------------------------- a test PKI and a TLS server
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "CH"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "panda-wms test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, issuer, key, signing_key, ca=False, server=False):
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CertAuthority:
    """A CA, the server's certificate and client certificates, written as PEM files."""

    def __init__(self, folder: Path, cn: str = "panda-wms test CA"):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = _cert(_name(cn), _name(cn), self.key, self.key, ca=True)
        self.ca_file = folder / "ca.pem"
        self.ca_file.write_bytes(_pem(self.cert))

    def issue(self, cn: str, server: bool = False) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(_name(cn), self.cert.subject, key, self.key, server=server)
        cert_file, key_file = self.folder / f"{cn}.crt", self.folder / f"{cn}.key"
        cert_file.write_bytes(_pem(cert))
        key_file.write_bytes(_pem(key))
        key_file.chmod(0o600)
        return cert_file, key_file


def dn(cn: str) -> str:
    return f"/C=CH/O=panda-wms test/CN={cn}"


def start_tls_server(tmp: Path, site_dir: Path, ca: "CertAuthority", admin_dns=(), pilot_dns=()
                     ) -> tuple[str, subprocess.Popen]:
    """``panda server`` over https with client certificates verified against ``ca``."""
    server_cert, server_key = ca.issue("localhost", server=True)
    port = free_port()
    log_path = tmp / "tls-server.log"
    cmd = [sys.executable, "-m", "panda_wms.cli", "server", "--db",
           f"sqlite:///{tmp / 'tls.db'}", "--host", "127.0.0.1", "--port", str(port),
           "--key-dir", str(tmp / "keys"), "--site-configs", str(site_dir),
           "--certfile", str(server_cert), "--keyfile", str(server_key), "--ca", str(ca.ca_file)]
    for d in admin_dns:
        cmd += ["--admin-dn", d]
    for d in pilot_dns:
        cmd += ["--pilot-dn", d]
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                env={**os.environ, "PANDA_CACHE_DIR": str(tmp / "cache")},
                                start_new_session=True)
    url = f"https://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            requests.get(f"{url}/api/v1/system/is_alive", verify=str(ca.ca_file), timeout=1)
            return url, proc
        except requests.RequestException:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"TLS server did not start:\n{log_path.read_text()}")
            time.sleep(0.1)


def stop_process(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
