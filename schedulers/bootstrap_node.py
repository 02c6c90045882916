"""What the batch script runs on the worker node: fetch, verify, cache and start the pilot file.

Not imported by the factory: ``schedulers/bootstrap.py`` pastes this source, after
``panda_core/ed25519.py``'s, into the batch script, so the node runs it with nothing but
``python3`` (standard library only; ``verify`` is ed25519's). Written for the oldest Python the
pilot claims; the line that starts it refuses older ones before this is even compiled.

Steps: the cache ``$PANDA_PILOT_CACHE`` (default ``${XDG_CACHE_HOME:-~/.cache}/panda-pilot``,
else ``$TMPDIR/panda-pilot-<uid>``) must be the user's own and writable by nobody else; a
version already unpacked there for this platform (``<cache>/<version>/<platform>``: a home
shared by nodes of several machines keeps one copy each) runs at once (warm start). Otherwise
the file and its detached signature are fetched (https verified against the given CA
bundle/dir, else the system's), the signature checked with the pinned key, the file's manifest
must name the version asked for (a validly signed old file served as another version is
refused) and list this platform; it is unpacked, with this platform's compiled code in place
of the file's own (``_platforms/<platform>/``), into a fresh folder renamed into place (a
neighbour pilot unpacking the same version at the same time loses nothing), and run, with
``PANDA_PILOT_VERSION`` and ``PANDA_PILOT_SERVER_KEY`` (the pinned key's hex, so a pilot pinned
by the key's fingerprint need not fetch the key) in its environment. Every
refusal is one line on stderr starting with ``panda-pilot bootstrap:`` and its own exit code
(EXIT_*).
"""
import hashlib
import io
import json
import os
import shutil
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile

EXIT_USAGE = 2
EXIT_FETCH = 3          # the server did not deliver the file
EXIT_REFUSED = 4        # the file is not the server's, or not the version asked for
EXIT_CACHE = 5          # the node's cache is unusable or not trustworthy
EXIT_PLATFORM = 6       # the file was built for another platform
MANIFEST = "PANDA_PILOT.json"
FILE_NAME = "panda-pilot.pyz"
PLATFORMS_DIR = "_platforms"     # server/pilotfile.py: other platforms' compiled code
RETRIES = 3
VERSION_CHARS = set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ._-")
MAX_FILE_BYTES = 64 * 2 ** 20    # before its signature is checked, a file is only bytes
MAX_SIGNATURE_BYTES = 1024


class BootstrapError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def cache_root():
    """The per-user cache folder, created 0700 and checked to be the user's alone."""
    root = os.environ.get("PANDA_PILOT_CACHE")
    if not root:
        home = os.environ.get("XDG_CACHE_HOME") or (
            os.path.join(os.environ["HOME"], ".cache") if os.environ.get("HOME") else "")
        root = os.path.join(home, "panda-pilot") if home else ""
        if root:
            try:
                os.makedirs(root, mode=0o700, exist_ok=True)
            except OSError:
                root = ""
        if not root:
            root = os.path.join(tempfile.gettempdir(), "panda-pilot-%d" % os.getuid())
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        st = os.stat(root)
    except OSError as exc:
        raise BootstrapError(EXIT_CACHE, "cannot create the cache %s: %s" % (root, exc))
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise BootstrapError(EXIT_CACHE, "the cache %s is not this user's alone (owner uid %d, "
                             "mode %o): another user could change the pilot there; set "
                             "PANDA_PILOT_CACHE" % (root, st.st_uid, st.st_mode & 0o777))
    return root


def fetch(url, context, what, limit):
    last = None
    for attempt in range(RETRIES):
        if attempt:
            time.sleep(min(30, 2 ** attempt))
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "panda-pilot-bootstrap"})
            with urllib.request.urlopen(req, timeout=60, context=context) as reply:
                data = reply.read(limit + 1)
            if len(data) > limit:
                raise BootstrapError(EXIT_FETCH, "the %s %s is larger than %d bytes: refused "
                                     "unread" % (what, url, limit))
            return data
        except urllib.error.HTTPError as exc:
            last = "HTTP %d %s" % (exc.code, exc.reason)
            if 400 <= exc.code < 500:
                break                       # asking again gets the same answer
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            last = str(reason)
            if isinstance(reason, ssl.SSLError):
                break                       # a refused certificate stays refused
    raise BootstrapError(EXIT_FETCH, "cannot fetch the %s %s: %s" % (what, url, last))


def check(data, signature, key, version, url):
    """Raise BootstrapError unless ``data`` is the server's signed file of ``version``."""
    fingerprint = hashlib.sha256(SPKI_PREFIX + key).hexdigest()
    if not verify(key, signature, data):
        raise BootstrapError(EXIT_REFUSED, "REFUSED %s: its signature does not verify with the "
                             "pinned server key sha256:%s: the file was altered or is not this "
                             "server's; nothing was run" % (url, fingerprint))
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            manifest = json.loads(zf.read(MANIFEST).decode())
    except (zipfile.BadZipFile, KeyError, ValueError):
        raise BootstrapError(EXIT_REFUSED, "REFUSED %s: signed, but not a pilot file (no "
                             "manifest)" % url)
    if manifest.get("version") != version:
        raise BootstrapError(EXIT_REFUSED, "REFUSED %s: it is version %r, not the %r asked for"
                             % (url, manifest.get("version"), version))
    return manifest


def node_platform():
    """This node as the pilot file names platforms: ``linux-x86_64``, ``linux-aarch64``.
    ``PANDA_PILOT_TEST_PLATFORM`` stands in for it in tests (a fake aarch64 node); on a real
    node it could only make the pilot load code it cannot run."""
    return (os.environ.get("PANDA_PILOT_TEST_PLATFORM")
            or "%s-%s" % (sys.platform, os.uname().machine))   # platform.machine(), unimported


def file_platforms(manifest):
    """The platforms a manifest says the file serves (an older file: only its own)."""
    platforms = manifest.get("platforms")
    if isinstance(platforms, list):
        return [str(p) for p in platforms]
    return [manifest["platform"]] if manifest.get("platform") else []


def check_node(manifest, version):
    """Raise BootstrapError unless this node's platform and Python are the file's."""
    here = node_platform()
    platforms = file_platforms(manifest)
    if platforms and here not in platforms:
        raise BootstrapError(EXIT_PLATFORM, "the pilot file %s is built for %s; this node is "
                             "%s (its server's operator can add it: 'panda server "
                             "--pilot-wheel', docs/pilot.md)" % (
                                 version, ", ".join(platforms), here))
    try:
        needed = tuple(int(p) for p in str(manifest.get("python_requires") or "0").split("."))
    except ValueError:
        needed = (0,)
    if sys.version_info[:len(needed)] < needed:
        raise BootstrapError(EXIT_PLATFORM, "the pilot file %s needs Python %s or newer, this "
                             "node's %s is %s (set PANDA_PYTHON)" % (
                                 version, manifest.get("python_requires"), sys.executable,
                                 sys.version.split()[0]))


def members(names, manifest, here):
    """(name in the file, path unpacked) of what this platform runs: the file's own compiled
    code replaced by this platform's where that is not the file's own."""
    for name in names:
        if name.startswith("/") or ".." in name.split("/"):
            raise BootstrapError(EXIT_REFUSED, "the pilot file holds a bad path %r" % name)
    own = here == manifest.get("platform") or not manifest.get("platform")
    prefix = "%s/%s/" % (PLATFORMS_DIR, here)
    for name in names:
        if name.startswith(PLATFORMS_DIR + "/"):
            if not own and name.startswith(prefix) and len(name) > len(prefix):
                yield name, name[len(prefix):]
        elif own or not name.endswith(".so"):
            yield name, name


def unpack(data, root, version, manifest):
    """Unpack into ``root/version/<platform>`` through a fresh folder renamed into place."""
    here = node_platform()
    parent = os.path.join(root, version)
    target = os.path.join(parent, here)
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise BootstrapError(EXIT_CACHE, "cannot create %s: %s" % (parent, exc))
    tmp = tempfile.mkdtemp(prefix=".%s." % here, dir=parent)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for name, dest in members(zf.namelist(), manifest, here):
                if name.endswith("/"):
                    continue
                path = os.path.join(tmp, *dest.split("/"))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with zf.open(name) as src, open(path, "wb") as out:
                    shutil.copyfileobj(src, out)
        with open(os.path.join(tmp, FILE_NAME + ".sha256"), "w") as fh:
            fh.write(hashlib.sha256(data).hexdigest() + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.exists(os.path.join(target, MANIFEST)):
                raise
            shutil.rmtree(tmp, ignore_errors=True)   # a neighbour unpacked it first
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BootstrapError(EXIT_CACHE, "cannot unpack the pilot into %s: %s" % (target, exc))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def prepare(server, version, key_hex, ca_file, ca_dir):
    """The folder of the verified, unpacked pilot ``version`` (fetched if not cached)."""
    root = cache_root()
    target = os.path.join(root, version, node_platform())
    try:
        with open(os.path.join(target, MANIFEST)) as fh:
            check_node(json.load(fh), version)
        return target
    except (OSError, ValueError):
        pass                             # not unpacked yet
    try:
        key = bytes.fromhex(key_hex)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise BootstrapError(EXIT_USAGE, "the pinned key is not 64 hex digits")
    context = None
    if server.startswith("https://"):
        context = ssl.create_default_context(cafile=ca_file or None, capath=ca_dir or None)
    url = "%s/pilot/%s/%s" % (server.rstrip("/"), version, FILE_NAME)
    data = fetch(url, context, "pilot file", MAX_FILE_BYTES)
    signature = fetch(url + ".sig", context, "pilot file signature", MAX_SIGNATURE_BYTES)
    manifest = check(data, signature, key, version, url)
    check_node(manifest, version)
    return unpack(data, root, version, manifest)


def main(argv):
    """argv: SERVER VERSION KEY_HEX CA_FILE CA_DIR -- PILOT ARGS..."""
    if len(argv) < 6 or argv[5] != "--":
        sys.stderr.write("panda-pilot bootstrap: usage: SERVER VERSION KEY CA_FILE CA_DIR -- "
                         "PILOT_ARGS\n")
        return EXIT_USAGE
    server, version, key_hex, ca_file, ca_dir = argv[:5]
    if not version[:1].isalnum() or not set(version) <= VERSION_CHARS or len(version) > 64:
        sys.stderr.write("panda-pilot bootstrap: %r is not a pilot version\n" % version[:80])
        return EXIT_USAGE
    here = node_platform()
    if not here[:1].isalnum() or not set(here) <= VERSION_CHARS or len(here) > 64:
        sys.stderr.write("panda-pilot bootstrap: %r is not a platform\n" % here[:80])
        return EXIT_USAGE
    try:
        folder = prepare(server, version, key_hex, ca_file, ca_dir)
    except BootstrapError as exc:
        sys.stderr.write("panda-pilot bootstrap: %s\n" % exc)
        return exc.code
    os.environ["PANDA_PILOT_VERSION"] = version
    # the key the file was verified with: a pilot pinned by fingerprint need not fetch it
    # (pilot/cli.py checks it has the fingerprint)
    os.environ["PANDA_PILOT_SERVER_KEY"] = key_hex
    sys.argv = [os.path.join(folder, "__main__.py")] + argv[6:]
    sys.path.insert(0, folder)
    import runpy
    runpy.run_path(folder, run_name="__main__")
    return 0
