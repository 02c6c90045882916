"""Bearer tokens as the grid issues them: this server's JWTs (WLCG profile) read by PanDA's own
client and by any JWT library through the published JWKS, tokens of an external OIDC issuer
(one this test runs over https) mapped to roles, revocation by jti, panda-client's login
document. One server for the module."""
from __future__ import annotations

import http.server
import json
import ssl
import sys
import subprocess
import threading
import time
import uuid
from pathlib import Path

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from compatkit import SITE, CertAuthority
from panda_core.client import ApiClient, ClientError
from testkit import EXAMPLE_SITES, start_server, stop_server, wait_for

AUDIENCE = "https://panda.example.test"
TASK = {"name": "tok", "transformation": "/bin/true", "n_jobs": 1, "site": SITE}


class OidcProvider:
    """An OIDC provider's discovery and JWKS over https, and tokens signed with its keys."""

    def __init__(self, folder: Path, ca: CertAuthority):
        self.keys: dict[str, object] = {"k1": ec.generate_private_key(ec.SECP256R1())}
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": f"{issuer.url}/jwk",
                            "device_authorization_endpoint": f"{issuer.url}/devicecode",
                            "token_endpoint": f"{issuer.url}/token"}
                elif self.path == "/jwk":
                    body = {"keys": [issuer.jwk(kid, key) for kid, key in issuer.keys.items()]}
                elif self.path == "/huge":          # a broken or hostile provider
                    body = {"keys": [], "padding": "x" * (2 << 20)}
                elif self.path == "/odd":
                    body = {"keys": ["not a key", 7]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        cert, key = ca.issue("localhost", server=True)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def jwk(kid: str, key) -> dict:
        alg = jwt.algorithms.ECAlgorithm if isinstance(key, ec.EllipticCurvePrivateKey) \
            else jwt.algorithms.RSAAlgorithm
        return {**json.loads(alg.to_jwk(key.public_key())), "kid": kid, "use": "sig"}

    def token(self, kid: str = "k1", groups=("atlas",), aud=AUDIENCE, lifetime=600, **extra):
        key = self.keys[kid]
        alg = "ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256"
        now = int(time.time())
        claims = {"iss": self.url, "sub": str(uuid.uuid4()), "aud": aud, "iat": now, "nbf": now,
                  "exp": now + lifetime, "jti": str(uuid.uuid4()), "scope": "openid profile",
                  "wlcg.ver": "1.0", "wlcg.groups": [f"/{g}" for g in groups],
                  "preferred_username": "carol", "name": "Carol Example", **extra}
        return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tokens")
    ca = CertAuthority(tmp / "pki")
    idp = OidcProvider(tmp, ca)
    issuers = tmp / "issuers.yaml"
    issuers.write_text(json.dumps({"issuers": [{
        "issuer": idp.url, "audience": [AUDIENCE], "ca_bundle": str(ca.ca_file),
        "roles": {"atlas": "user", "/atlas/production": "pilot", "atlas/admins": "admin"},
        "vo": "atlas", "client_id": "panda-cli"}]}))
    sites = tmp / "sites"
    sites.mkdir()
    (sites / f"{SITE}.yaml").write_text((EXAMPLE_SITES / f"{SITE}.yaml").read_text())
    server = start_server(tmp / "srv", site_dir=sites, extra=[
        "--token-issuers", str(issuers), "--token-issuer", "https://panda.example.test"],
        env={"PANDA_SE_ROOT": str(tmp / "se")})
    server.tmp = tmp
    yield server, idp
    stop_server(server)
    idp.stop()


def api(server, method, path, bearer=None, **body):
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    kw = {"json": body} if method == "POST" else {"params": body}
    return requests.request(method, f"{server.url}/api/v1/{path}", headers=headers, timeout=10,
                            **kw)


def test_own_tokens_follow_the_wlcg_profile_and_verify_with_the_jwks(world):
    server, _ = world
    token = server.token("user", "alice")
    jwks = requests.get(f"{server.url}/.well-known/jwks.json", timeout=5).json()
    conf = requests.get(f"{server.url}/.well-known/openid-configuration", timeout=5).json()
    assert conf["issuer"] == "https://panda.example.test"
    assert conf["jwks_uri"] == "https://panda.example.test/.well-known/jwks.json"
    # any JWT library verifies it with nothing but the published keys
    header = jwt.get_unverified_header(token)
    (key,) = [k for k in jwks["keys"] if k["kid"] == header["kid"]]
    claims = jwt.decode(token, jwt.PyJWK(key).key, algorithms=["ES256"],
                        audience="https://panda.example.test", issuer=conf["issuer"])
    for name in ("iss", "sub", "aud", "exp", "iat", "nbf", "jti", "scope", "wlcg.ver", "groups",
                 "name", "preferred_username"):
        assert name in claims, name
    assert (claims["sub"], claims["preferred_username"], claims["wlcg.ver"]) == \
        ("alice", "alice", "1.0")
    assert claims["exp"] > claims["iat"] and len(claims["jti"]) >= 32
    # our own client and pilot protocol take it as they took the old tokens
    assert ApiClient(server.url, token).call("system", "whoami")["subject"] == "alice"
    # panda token show reads it
    shown = subprocess.run([sys.executable, "-m", "panda_wms.cli", "token", "show", "--key-dir",
                            str(server.key_dir), "--token-file", "-"], input=token,
                           capture_output=True, text=True, check=True).stdout
    assert json.loads(shown)["jti"] == claims["jti"]


def test_pandaclient_reads_the_user_name_from_the_token(world, compat_venv):
    """PanDA's own client, unmodified: get_user_name_from_token() (what prun and pathena ask
    through PsubUtils.get_proxy_info before they submit)."""
    server, _ = world
    probe = ("import json\nfrom pandaclient import Client, PsubUtils\n"
             "print(json.dumps([Client.get_user_name_from_token(),"
             " PsubUtils.get_proxy_info(False, False)]))\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(server.tmp), "PANDA_CONFIG_ROOT": str(server.tmp),
           "PANDA_URL_SSL": server.url + "/server/panda", "PANDA_URL": server.url + "/server/panda",
           "PANDA_AUTH": "oidc", "PANDA_AUTH_VO": "panda-wms", "PANDA_BEHIND_REAL_LB": "1",
           "PANDA_AUTH_ID_TOKEN": server.token("user", "alice")}
    proc = subprocess.run([str(compat_venv / "bin" / "python"), "-c", probe], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (name, groups, nickname), (status, info) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (name, nickname) == ("Alice", "alice") and groups == ["panda/user"]
    assert status == 0 and info == ["Alice", ["panda/user"], "alice"]


def test_external_issuer_groups_map_to_roles(world):
    server, idp = world
    user = idp.token(groups=("atlas",))
    reply = api(server, "GET", "system/whoami", user).json()["data"]
    assert (reply["subject"], reply["role"]) == ("carol", "user")
    assert api(server, "POST", "task/submit", user, task_parameters=TASK).json()["success"]
    admin = idp.token(groups=("atlas", "atlas/admins"))
    assert api(server, "GET", "system/whoami", admin).json()["data"]["role"] == "admin"
    pilot = idp.token(groups=("atlas/production",))
    reply = requests.post(f"{server.url}/server/panda/getJob", data={"siteName": SITE},
                          headers={"Authorization": f"Bearer {pilot}",
                                   "Accept": "application/json"}, timeout=10).json()
    assert reply["StatusCode"] == 0 and reply["PandaID"]


@pytest.mark.parametrize("case", ["no-role", "audience", "expired", "foreign-key", "issuer",
                                  "alg-none", "hs256-with-public-key", "huge", "not-ascii"])
def test_bad_tokens_are_refused_with_a_reason(world, case):
    server, idp = world
    if case == "no-role":
        token, why, status = idp.token(groups=("cms",)), "no group", 403
    elif case == "audience":
        token, why, status = idp.token(aud="https://elsewhere"), "another audience", 403
    elif case == "expired":
        token, why, status = idp.token(lifetime=-600), "expired", 403
    elif case == "foreign-key":
        claims = jwt.decode(idp.token(), options={"verify_signature": False})
        token = jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
                           headers={"kid": "k1"})
        why, status = "does not verify", 403
    elif case == "issuer":
        claims = jwt.decode(idp.token(), options={"verify_signature": False})
        token = jwt.encode({**claims, "iss": "https://evil.example"},
                           ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
        why, status = "does not trust", 403
    elif case == "alg-none":
        token = jwt.encode({"iss": "https://panda.example.test", "sub": "root", "role": "admin",
                            "exp": time.time() + 600, "iat": time.time(),
                            "aud": "https://panda.example.test"}, None, algorithm="none")
        why, status = "refused", 403
    elif case == "hs256-with-public-key":
        jwks = requests.get(f"{server.url}/.well-known/jwks.json", timeout=5).text
        # made by hand: PyJWT itself (2.10+) refuses a JWK-looking HMAC secret, an attacker won't
        import base64
        import hashlib
        import hmac

        def b64(data: bytes) -> bytes:
            return base64.urlsafe_b64encode(data).rstrip(b"=")
        signing_input = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + b"." + b64(
            json.dumps({"iss": "https://panda.example.test", "sub": "root", "role": "admin",
                        "exp": int(time.time()) + 600, "iat": int(time.time()),
                        "aud": "https://panda.example.test"}).encode())
        token = (signing_input + b"." + b64(hmac.new(jwks.encode(), signing_input,
                                                     hashlib.sha256).digest())).decode()
        why, status = "refused", 403
    elif case == "huge":
        token, why, status = "a" * 20000 + "." + "b" * 10 + ".c", "malformed", 403
    else:
        token, why, status = "eyJ\u00e9.x.y", None, None
    if status is None:     # not even sendable as an HTTP header value by requests: raw bytes
        resp = requests.get(f"{server.url}/api/v1/system/whoami", timeout=5,
                            headers={"Authorization": b"Bearer eyJ\xc3\xa9.x.y"})
        assert resp.status_code in (400, 403), resp.text
        return
    resp = api(server, "POST", "task/submit", token, task_parameters=TASK)
    assert resp.status_code == status and why in resp.json()["message"], resp.text
    assert "Traceback" not in server.log()


def test_a_rotated_issuer_key_is_fetched_again(world):
    """The provider publishes a new key: the first token with it is refused ("try again"), the
    server fetches the keys in the background, and then accepts it."""
    server, idp = world
    idp.keys["k2"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = idp.token(kid="k2")
    first = api(server, "GET", "system/whoami", token)
    assert first.status_code == 403 and "try again" in first.json()["message"]
    wait_for(lambda: api(server, "GET", "system/whoami", token).status_code == 200,
             "the rotated key to be fetched", timeout=25)


def test_revocation_by_token_by_jti_and_from_the_command_line(world):
    server, idp = world
    # whoever holds a token may end it
    token = server.token("user", "dave")
    assert api(server, "GET", "system/whoami", token).json()["data"]["subject"] == "dave"
    reply = api(server, "POST", "auth/revoke_token", token, token=token, reason="laptop lost")
    assert reply.json()["data"]["revoked"] is True
    refused = api(server, "POST", "task/submit", token, task_parameters=TASK)
    assert refused.status_code == 403 and "revoked" in refused.json()["message"]
    # an admin revokes an external issuer's token by its jti; a user may not
    external = idp.token()
    jti = jwt.decode(external, options={"verify_signature": False})["jti"]
    admin, user = server.token("admin", "ops"), server.token("user", "erin")
    assert api(server, "POST", "auth/revoke_token", user, jti=jti).status_code == 403
    assert api(server, "POST", "auth/revoke_token", admin, jti=jti).json()["success"]
    assert "revoked" in api(server, "GET", "system/whoami", external).json()["message"]
    listed = api(server, "GET", "auth/list_revoked", admin).json()["data"]
    assert {r["jti"] for r in listed} >= {jti} and \
        [r["reason"] for r in listed if r["subject"] == "dave"] == ["laptop lost"]
    # bad requests: neither or both, a token that does not verify
    for body in ({}, {"token": token, "jti": "x"}, {"token": "not.a.token"}):
        resp = api(server, "POST", "auth/revoke_token", admin, **body)
        assert resp.status_code == 200 and resp.json()["success"] is False, resp.text
    # the command line writes to the database; the server picks it up within seconds
    pilot = server.token("pilot", "wn-7", site=SITE)
    token_file = server.tmp / "pilot.token"
    token_file.write_text(pilot)
    assert ApiClient(server.url, pilot).call("system", "whoami")["subject"] == "wn-7"
    done = subprocess.run([sys.executable, "-m", "panda_wms.cli", "token", "revoke", "--key-dir",
                           str(server.key_dir), "--db", server.db_url, "--token-file",
                           str(token_file)], capture_output=True, text=True)
    assert done.returncode == 0 and "revoked" in done.stdout, done.stderr

    def refused_now():
        try:
            ApiClient(server.url, pilot).call("system", "whoami")
        except ClientError as exc:
            return "revoked" in str(exc)
        return False
    wait_for(refused_now, "the server to refuse the revoked pilot token", timeout=15)


def test_login_document_for_pandaclient(world):
    """/auth/<vo>_auth_config.json: what panda-client's device-code login asks for first."""
    server, idp = world
    doc = requests.get(f"{server.url}/auth/atlas_auth_config.json", timeout=5).json()
    assert doc == {"vo": "atlas", "client_id": "panda-cli", "client_secret": "",
                   "audience": AUDIENCE,
                   "oidc_config_url": f"{idp.url}/.well-known/openid-configuration"}
    missing = requests.get(f"{server.url}/auth/cms_auth_config.json", timeout=5)
    assert missing.status_code == 404 and "cms" in missing.json()["error"]


def test_a_broken_issuers_file_stops_the_server_with_a_reason(tmp_path):
    bad = tmp_path / "issuers.yaml"
    bad.write_text("issuers:\n  - issuer: http://plain.example\n    audience: x\n"
                   "    roles: {atlas: user}\n")
    proc = subprocess.run([sys.executable, "-m", "panda_wms.cli", "server", "--db",
                           f"sqlite:///{tmp_path / 'db.sqlite'}", "--port", "0", "--key-dir",
                           str(tmp_path / "keys"), "--token-issuers", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "issuers[0].issuer: expected the provider's https:// URL" in proc.stderr


def test_a_hostile_provider_document_is_refused_not_kept(world, tmp_path):
    """Keys are fetched with a size limit and a shape check; a failed fetch keeps nothing."""
    from server.tokens import TokenService, TrustedIssuer

    _, idp = world
    ca = str(world[0].tmp / "pki" / "ca.pem")
    for path in ("/huge", "/odd", "/nothing-here"):
        trusted = TrustedIssuer(issuer=idp.url, audience=[AUDIENCE], roles={"atlas": "user"},
                                jwks_uri=idp.url + path, ca_bundle=ca)
        assert TokenService.refresh_keys(trusted) is (path == "/odd")
        assert trusted.keys == {}
    plain = TrustedIssuer(issuer=idp.url, audience=[AUDIENCE], roles={"atlas": "user"},
                          jwks_uri="http://127.0.0.1:1/jwk")
    assert TokenService.refresh_keys(plain) is False
