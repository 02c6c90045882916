"""server/pilotfile.py and server/pilotstore.py: versions side by side, a pinned default,
what is refused, re-signing after a key change, other platforms' psutil."""
from __future__ import annotations

import shutil
import zipfile

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.pilotfile import FILE_NAME, MANIFEST, PilotFileError
from server.pilotstore import PilotFiles, Signer


def signer() -> Signer:
    return Signer(Ed25519PrivateKey.generate())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    key = Ed25519PrivateKey.generate()
    files = PilotFiles(tmp_path_factory.mktemp("pf") / "pilot", Signer(key))
    return files, files.current(), key


def test_current_is_built_once_signed_and_complete(built):
    files, version, key = built
    data = files.read(version)
    key.public_key().verify(files.read(version, signature=True), data)
    with zipfile.ZipFile(files.path(version)) as zf:
        names = set(zf.namelist())
    assert {"__main__.py", MANIFEST, "pilot/cli.py", "panda_core/ed25519.py",
            "copytools/local.py", "pluggy/__init__.py", "psutil/__init__.py",
            "panda_wms_pilot.dist-info/entry_points.txt"} <= names
    assert not any(n.startswith(("cryptography/", "stevedore/", "server/", "isal/"))
                   or "__pycache__" in n or n.endswith(".pyc") for n in names)
    assert [n for n in names if n.endswith(".so")] and \
        all(".abi3." in n for n in names if n.endswith(".so"))
    assert files.current() == version and files.default() == version


def test_old_versions_stay_beside_the_new_and_a_default_can_be_pinned(built, tmp_path):
    files, version, key = built
    shutil.copytree(files.root / version, files.root / "0.0.9-older")
    try:
        assert {i.version for i in files.versions()} == {version, "0.0.9-older"}
        pinned = PilotFiles(files.root, Signer(key), default="0.0.9-older")
        assert pinned.default() == "0.0.9-older"
        with pytest.raises(PilotFileError, match="not in"):
            PilotFiles(files.root, Signer(key), default="0.0.8-gone").default()
    finally:
        shutil.rmtree(files.root / "0.0.9-older")
    (files.root / "0.0.7-unsigned").mkdir()
    (files.root / "0.0.7-unsigned" / FILE_NAME).write_bytes(b"x")
    assert "0.0.7-unsigned" not in {i.version for i in files.versions()}   # no signature
    for bad in ("../keys", "", "a/b", "x" * 80):
        with pytest.raises(PilotFileError):
            files.read(bad)
    with pytest.raises(PilotFileError, match="not a pilot file version"):
        PilotFiles(files.root, Signer(key), default="../x")


def test_an_unusable_pilot_dir_is_an_os_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    files = PilotFiles(tmp_path / "file" / "pilot", signer())
    with pytest.raises(OSError):
        files.current()


def test_a_replaced_key_re_signs_the_current_version(built):
    files, version, _ = built
    new_key = Ed25519PrivateKey.generate()
    again = PilotFiles(files.root, Signer(new_key))
    assert again.current() == version
    new_key.public_key().verify(again.read(version, signature=True), again.read(version))


# --- a replaced job-signing key (issue 16's deployment leftovers, item 1) ----------------------

def _store_old_version(files: PilotFiles, base: str) -> tuple[str, bytes]:
    """An older version of the pilot file, as the server built and signed it then."""
    from server.pilotfile import build

    version, data = build(base)
    path = files.path(version)
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    path.with_name(FILE_NAME + ".sig").write_bytes(files.signer.sign(data))
    return version, data


def _verifies(key: Ed25519PrivateKey, files: PilotFiles, version: str) -> bool:
    from server.pilotstore import verifies
    return verifies(key.public_key(), files.read(version), files.read(version, signature=True))


def test_a_replaced_key_re_signs_every_version_this_server_built(tmp_path, caplog):
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    records = tmp_path / "keys" / "pilot-built"
    before = PilotFiles(tmp_path / "pilot", Signer(old), records=records)
    older, _ = _store_old_version(before, "0.0.5")
    assert {i.version for i in before.versions()} == {before.current(), older}   # recorded
    assert (records / f"{older}.json").exists() and (records / f"{before.current()}.json").exists()

    after = PilotFiles(tmp_path / "pilot", Signer(new), records=records)
    with caplog.at_level("WARNING", logger="server.pilotstore"):
        results = {r.version: r.action for r in after.check_all()}
    assert results == {before.current(): "re-signed", older: "re-signed"}
    assert "the job-signing key was replaced" in caplog.text
    assert {i.version for i in after.versions()} == {older, after.current()}
    assert _verifies(new, after, older) and not _verifies(old, after, older)
    assert {r.action for r in after.check_all()} == {"valid"}        # once is enough


def test_a_file_changed_after_it_was_recorded_is_never_signed(tmp_path, caplog):
    from server.pilotstore import PilotFileUnvouched

    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    records = tmp_path / "pilot-built"
    before = PilotFiles(tmp_path / "pilot", Signer(old), records=records)
    version, data = _store_old_version(before, "0.0.5")
    assert before.check(version).action == "valid"                  # now recorded
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x01
    before.path(version).write_bytes(bytes(bad))
    sig = before.path(version).with_name(FILE_NAME + ".sig").read_bytes()

    after = PilotFiles(tmp_path / "pilot", Signer(new), records=records)
    with caplog.at_level("ERROR", logger="server.pilotstore"):
        with pytest.raises(PilotFileUnvouched, match="the file was changed since"):
            after.read(version)
    assert f"pilot file {version} is not served" in caplog.text
    assert after.path(version).with_name(FILE_NAME + ".sig").read_bytes() == sig  # untouched
    assert version not in {i.version for i in after.versions()}
    # the same key: a changed file is not served either (its signature no longer verifies)
    with pytest.raises(PilotFileUnvouched):
        before.read(version, signature=True)


def test_without_a_record_only_the_operators_previous_key_vouches(tmp_path):
    old, new, other = (Ed25519PrivateKey.generate() for _ in range(3))
    before = PilotFiles(tmp_path / "pilot", Signer(old))          # an old server: no records
    version, _ = _store_old_version(before, "0.0.4")
    (tmp_path / "pilot" / "0.0.3-unsigned").mkdir()
    (tmp_path / "pilot" / "0.0.3-unsigned" / FILE_NAME).write_bytes(b"PK not signed")

    after = PilotFiles(tmp_path / "pilot", Signer(new), records=tmp_path / "records")
    judged = after.judge(version, *after.load(version))
    assert judged.action == "refused" and "no build record or previous key" in judged.reason
    assert "panda pilotfile resign --previous-key OLD.pem" in judged.reason
    assert after.check(version, [other.public_key()]).action == "refused"   # not that key
    assert after.check(version, [old.public_key()]).action == "re-signed"
    assert _verifies(new, after, version)
    assert after.check("0.0.3-unsigned", [old.public_key()]).action == "refused"
    assert "no signature and no build record" in after.check("0.0.3-unsigned").reason


def test_pilotfile_command_lists_and_re_signs(tmp_path, capsys):
    """``panda pilotfile``: list judges without writing; resign re-signs what it can vouch
    for, with --previous-key for a version built before the records; exit 1 while any is left."""
    from cryptography.hazmat.primitives import serialization

    from server.auth import SIGNING_KEY_FILE
    from server.pilotcli import main

    key_dir = tmp_path / "keys"
    assert main(["list", "--key-dir", str(key_dir)]) == 2          # no key: nothing created
    assert "no job-signing key" in capsys.readouterr().err and not key_dir.exists()
    key_dir.mkdir()
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()

    def pem(key):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    (key_dir / SIGNING_KEY_FILE).write_bytes(pem(old))
    assert main(["build", "--key-dir", str(key_dir)]) == 0
    built = capsys.readouterr().out.split()[0]
    unrecorded, _ = _store_old_version(PilotFiles(key_dir / "pilot", Signer(old)), "0.0.2")
    (key_dir / SIGNING_KEY_FILE).write_bytes(pem(new))              # the key is replaced
    old_pem = tmp_path / "old.pem"
    old_pem.write_bytes(old.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    assert main(["list", "--key-dir", str(key_dir)]) == 1
    out = capsys.readouterr().out
    assert f"{built}  re-sign" in out and f"{unrecorded}  refused" in out
    files = PilotFiles(key_dir / "pilot", Signer(new))
    assert not _verifies(new, PilotFiles(key_dir / "pilot", Signer(old)), built)  # list wrote nothing
    assert main(["resign", "--key-dir", str(key_dir)]) == 1
    assert f"{built}  re-signed" in capsys.readouterr().out
    assert main(["resign", "--key-dir", str(key_dir), "--previous-key", str(old_pem)]) == 0
    out = capsys.readouterr().out
    assert f"{built}  valid" in out and f"{unrecorded}  re-signed" in out
    assert _verifies(new, files, built) and _verifies(new, files, unrecorded)
    assert main(["resign", "--key-dir", str(key_dir), "--previous-key",
                 str(tmp_path / "none.pem")]) == 2


def test_a_restarted_server_with_a_new_key_re_signs_or_refuses_with_409(tmp_path):
    """Through ``panda server``: the key dir's key replaced between two runs. At start the
    server re-signs the version it built (its record vouches), refuses one whose bytes changed
    (409 with the reason, logged) and lists only what it serves."""
    import requests
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from server.auth import SIGNING_KEY_FILE
    from server.pilotstore import verifies
    from testkit import start_server, stop_server, wait_for

    server = start_server(tmp_path / "srv")
    try:
        version = requests.get(server.url + "/pilot/", timeout=30).json()["default"]
    finally:
        stop_server(server)
    root = server.key_dir / "pilot"
    shutil.copytree(root / version, root / "0.0.1-changed")
    shutil.copy(server.key_dir / "pilot-built" / f"{version}.json",
                server.key_dir / "pilot-built" / "0.0.1-changed.json")
    with open(root / "0.0.1-changed" / FILE_NAME, "ab") as fh:
        fh.write(b"\0")                      # changed after the server recorded it
    (server.key_dir / SIGNING_KEY_FILE).write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))

    server = start_server(tmp_path / "srv")
    try:
        wait_for(lambda: "re-signed with sha256:" in server.log(), "the re-signing at start")
        assert "pilot file 0.0.1-changed is not served: its sha256" in server.log()
        key = load_pem_public_key(requests.get(
            server.url + "/.well-known/panda-jobspec-key.pem", timeout=10).content)
        data = requests.get(f"{server.url}/pilot/{version}/panda-pilot.pyz", timeout=30).content
        sig = requests.get(f"{server.url}/pilot/{version}/panda-pilot.pyz.sig", timeout=30)
        assert verifies(key, data, sig.content)
        for name in ("panda-pilot.pyz", "panda-pilot.pyz.sig"):
            reply = requests.get(f"{server.url}/pilot/0.0.1-changed/{name}", timeout=30)
            assert reply.status_code == 409, reply.status_code
            assert "is not served: its sha256" in reply.reason and "Traceback" not in reply.text
            assert "panda pilotfile resign --previous-key" in reply.text
        listing = requests.get(server.url + "/pilot/", timeout=30).json()
        assert [v["version"] for v in listing["versions"]] == [version]
    finally:
        stop_server(server)


# --- other platforms (item 2) -----------------------------------------------------------------

def _fake_wheel(folder, name: str, members: dict[str, bytes] | None = None):
    """A wheel-shaped zip for the refusals (none of these ever reaches a file)."""
    path = folder / name
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in (members or {"psutil/_psutil_linux.abi3.so": b"\x7fELF"}).items():
            zf.writestr(member, data)
    return path


def test_wheels_for_other_platforms_are_checked_before_any_build(tmp_path):
    import importlib.metadata

    from server.pilotfile import platform_wheels

    v = importlib.metadata.version("psutil")
    cases = {
        f"psutil-0.0.1-cp36-abi3-manylinux2014_aarch64.whl": "but the server carries psutil",
        f"psutil-{v}-cp312-cp312-manylinux2014_aarch64.whl": "not abi3",
        f"psutil-{v}-cp36-abi3-musllinux_1_2_aarch64.whl": "is not glibc Linux",
        f"psutil-{v}-cp36-abi3-macosx_11_0_arm64.whl": "is not glibc Linux",
        f"psutil-{v}-cp36-abi3-manylinux2014_x86_64.whl": "the server's own platform",
        f"pluggy-{v}-cp36-abi3-manylinux2014_aarch64.whl": "not of psutil",
        "psutil.zip": "not a wheel file name",
    }
    for name, message in cases.items():
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        with pytest.raises(PilotFileError, match=message):
            platform_wheels([_fake_wheel(folder, name)])
    good = f"psutil-{v}-cp36-abi3-manylinux2014_aarch64.manylinux_2_17_aarch64.whl"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PilotFileError, match="no abi3 extension"):
        platform_wheels([_fake_wheel(empty, good, {"psutil/__init__.py": b""})])
    twice = tmp_path / "twice"
    twice.mkdir()
    _fake_wheel(twice, good)
    _fake_wheel(twice, good.replace("manylinux2014", "manylinux_2_28"))
    with pytest.raises(PilotFileError, match="a second wheel for linux-aarch64"):
        platform_wheels([twice])
    with pytest.raises(PilotFileError, match="no such wheel file"):
        platform_wheels([tmp_path / "nothing-here"])
    (tmp_path / "no-wheels").mkdir()
    with pytest.raises(PilotFileError, match=r"no wheel \(\*.whl\) in the folder"):
        platform_wheels([tmp_path / "no-wheels"])
    assert list(platform_wheels([_fake_wheel(tmp_path, good)])) == ["linux-aarch64"]


def test_a_file_for_two_platforms_carries_each_extension_once(tmp_path):
    """With psutil's real aarch64 wheel: the file has the server's extension at its root and
    the aarch64 one under _platforms/, the manifest lists both, and the version is another."""
    import json

    from server.pilotfile import build, platform_tag
    from testkit import elf_machine, psutil_wheel

    wheel = psutil_wheel()
    plain, _ = build()
    version, data = build(wheels=[wheel])
    assert version != plain and build(wheels=[wheel.parent]) == (version, data)
    (tmp_path / "f.pyz").write_bytes(data)
    with zipfile.ZipFile(tmp_path / "f.pyz") as zf:
        manifest = json.loads(zf.read(MANIFEST))
        sos = sorted(n for n in zf.namelist() if n.endswith(".so"))
        (tmp_path / "arm.so").write_bytes(zf.read(
            "_platforms/linux-aarch64/psutil/_psutil_linux.abi3.so"))
    assert manifest["platform"] == platform_tag()
    assert manifest["platforms"] == sorted([platform_tag(), "linux-aarch64"])
    assert sos == ["_platforms/linux-aarch64/psutil/_psutil_linux.abi3.so",
                   "psutil/_psutil_linux.abi3.so"]
    assert elf_machine(tmp_path / "arm.so") == 183


def test_a_build_record_that_cannot_be_written_does_not_stop_serving(tmp_path, caplog):
    (tmp_path / "records").write_text("a file where the folder should be")
    files = PilotFiles(tmp_path / "pilot", signer(), records=tmp_path / "records" / "x")
    with caplog.at_level("WARNING", logger="server.pilotstore"):
        version = files.current()
        assert files.read(version)
    assert "cannot record it in" in caplog.text and "--previous-key" in caplog.text
