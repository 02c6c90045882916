"""Issue 13 item 7: certificate subjects are compared as structured names (RFC 4514 /
``x509.Name``), never as slash-joined strings. A real ``panda server`` over https, client
certificates of one test CA."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from compatkit import SITE, CertAuthority, _cert, _pem, start_tls_server, stop_process
from testkit import EXAMPLE_SITES

ADMIN_DN = "/C=CH/O=panda-wms test/CN=admin/CN=42"          # three RDNs below C


def _issue(ca: CertAuthority, attrs: list[list[tuple]], stem: str):
    """A client certificate whose subject has exactly the RDNs ``attrs`` (lists of (oid, value)
    pairs: several in one list make a multi-valued RDN)."""
    name = x509.Name([x509.RelativeDistinguishedName([x509.NameAttribute(o, v) for o, v in rdn])
                      for rdn in attrs])
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert(name, ca.cert.subject, key, ca.key)
    cert_file, key_file = ca.folder / f"{stem}.crt", ca.folder / f"{stem}.key"
    cert_file.write_bytes(_pem(cert))
    key_file.write_bytes(_pem(key))
    return str(cert_file), str(key_file)


C = [(NameOID.COUNTRY_NAME, "CH")]
O = [(NameOID.ORGANIZATION_NAME, "panda-wms test")]


@pytest.fixture(scope="module")
def dn_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dn")
    sites = tmp / "sites"
    sites.mkdir()
    shutil.copy(EXAMPLE_SITES / f"{SITE}.yaml", sites)
    ca = CertAuthority(tmp / "pki")
    url, proc = start_tls_server(tmp, sites, ca, admin_dns=[ADMIN_DN],
                                 pilot_dns=["CN=pilot-wn,O=panda-wms test,C=CH"])
    yield url, ca
    stop_process(proc)


def whoami(url, ca, cert) -> dict:
    return requests.get(f"{url}/api/v1/system/whoami", cert=cert, verify=str(ca.ca_file),
                        timeout=10).json()["data"]


def test_a_cn_holding_slashes_is_not_the_admin(dn_server):
    url, ca = dn_server
    forged = _issue(ca, [C, O, [(NameOID.COMMON_NAME, "admin/CN=42")]], "forged")
    me = whoami(url, ca, forged)
    assert me["role"] == "user", me
    # its subject string is escaped: it cannot pass for the admin's DN anywhere (task owners)
    assert me["subject"] == "/C=CH/O=panda-wms test/CN=admin\\/CN=42"
    real = _issue(ca, [C, O, [(NameOID.COMMON_NAME, "admin")], [(NameOID.COMMON_NAME, "42")]],
                  "real")
    me = whoami(url, ca, real)
    assert me == {"subject": ADMIN_DN, "role": "admin", "site": None}


def test_rfc4514_dn_and_multi_valued_rdns(dn_server):
    url, ca = dn_server
    wn = _issue(ca, [C, O, [(NameOID.COMMON_NAME, "pilot-wn")]], "wn")
    assert whoami(url, ca, wn)["role"] == "pilot"
    # CN and UID in one RDN are not the CN alone, nor CN then UID
    multi = _issue(ca, [C, O, [(NameOID.COMMON_NAME, "pilot-wn"), (NameOID.USER_ID, "x")]],
                   "multi")
    me = whoami(url, ca, multi)
    assert me["role"] == "user" and me["subject"].endswith("/UID=x+CN=pilot-wn"), me


def test_unreadable_admin_dn_stops_the_server_with_a_reason(tmp_path):
    r = subprocess.run([sys.executable, "-m", "panda_wms.cli", "server", "--db",
                        f"sqlite:///{tmp_path / 'x.db'}", "--key-dir", str(tmp_path / "k"),
                        "--port", "0", "--admin-dn", "/O=org/XX=admin"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "--admin-dn" in r.stderr and "'XX=admin'" in r.stderr and "Traceback" not in r.stderr
