"""server/pilotfile.py: versions side by side, a pinned default, what is refused."""
from __future__ import annotations

import shutil
import zipfile

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.pilotfile import FILE_NAME, MANIFEST, PilotFileError, PilotFiles


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    key = Ed25519PrivateKey.generate()
    files = PilotFiles(tmp_path_factory.mktemp("pf") / "pilot", key.sign)
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
        pinned = PilotFiles(files.root, key.sign, default="0.0.9-older")
        assert pinned.default() == "0.0.9-older"
        with pytest.raises(PilotFileError, match="not in"):
            PilotFiles(files.root, key.sign, default="0.0.8-gone").default()
    finally:
        shutil.rmtree(files.root / "0.0.9-older")
    (files.root / "0.0.7-unsigned").mkdir()
    (files.root / "0.0.7-unsigned" / FILE_NAME).write_bytes(b"x")
    assert "0.0.7-unsigned" not in {i.version for i in files.versions()}   # no signature
    for bad in ("../keys", "", "a/b", "x" * 80):
        with pytest.raises(PilotFileError):
            files.read(bad)
    with pytest.raises(PilotFileError, match="not a pilot file version"):
        PilotFiles(files.root, key.sign, default="../x")


def test_an_unusable_pilot_dir_is_an_os_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    files = PilotFiles(tmp_path / "file" / "pilot", Ed25519PrivateKey.generate().sign)
    with pytest.raises(OSError):
        files.current()


def test_a_replaced_key_re_signs_the_current_version(built):
    files, version, _ = built
    new_key = Ed25519PrivateKey.generate()
    again = PilotFiles(files.root, new_key.sign)
    assert again.current() == version
    new_key.public_key().verify(again.read(version, signature=True), again.read(version))
