"""The batch script of a one-file pilot: the argv every backend runs on the worker node.

One line of POSIX sh finds ``python3`` (or ``$PANDA_PYTHON``) and hands it the node program
(``schedulers/bootstrap_node.py`` after ``panda_core/ed25519.py``, compressed and base64'd into
one word) with readable arguments: the server, the pilot version, the pinned server key (the
32 key bytes in hex, which the factory checked against the pinned fingerprint), the CA bundle
and folder for https, then ``--`` and the pilot's own arguments. Why one line and not a script
file: every backend already carries an argv faithfully (Slurm's ``exec``, HTCondor's
``arguments``, which admit no newline, A-REX's job script, the local backend's ``sh``), so the
same words run everywhere and nothing has to be staged to the node beside them. Why Python for
fetch and verify, not curl and openssl: ``python3`` is the one thing the node must have, and
openssl on older nodes (1.0.x) has no Ed25519. ``node_program()`` is the node program in clear
(docs/pilot.md: how to read it out of a batch script).
"""
from __future__ import annotations

import base64
import zlib
from pathlib import Path

from panda_core import PYTHON_REQUIRES, ed25519
from panda_core.trust import key_fingerprint, public_key_der

from .base import SchedulerError

_HERE = Path(__file__).resolve().parent


def node_program() -> str:
    """The Python the node runs, in clear: the verifier, the bootstrap, the call."""
    return (Path(ed25519.__file__).read_text() + "\n"
            + (_HERE / "bootstrap_node.py").read_text()
            + "\nsys.exit(main(sys.argv[1:]))\n")


def _shell_line() -> str:
    blob = base64.b64encode(zlib.compress(node_program().encode(), 9)).decode()
    need = ".".join(map(str, PYTHON_REQUIRES))
    py = (f'import sys;sys.version_info<{PYTHON_REQUIRES} and sys.exit("panda-pilot bootstrap: '
          f'Python %s is too old: the pilot needs {need} or newer (set PANDA_PYTHON)"'
          '%sys.version.split()[0]);import base64,zlib;exec(compile(zlib.decompress('
          f'base64.b64decode("{blob}")),"panda-pilot-bootstrap","exec"))')
    return ('py="${PANDA_PYTHON:-python3}"; command -v "$py" >/dev/null 2>&1 || { echo '
            '"panda-pilot bootstrap: no $py on this node (set PANDA_PYTHON)" >&2; exit 127; }; '
            f"exec \"$py\" -E -s -c '{py}' \"$@\"")


def raw_key(pem: str | bytes, fingerprint: str | None) -> bytes:
    """The 32 key bytes of the server's PEM, once it has the pinned ``fingerprint``."""
    try:
        if fingerprint is not None and key_fingerprint(pem) != fingerprint:
            raise SchedulerError(f"the server's key {key_fingerprint(pem)} is not the pinned key "
                                 f"{fingerprint}: no pilot is started with it")
        return ed25519.raw_public_key(public_key_der(pem))
    except ValueError as exc:
        raise SchedulerError(f"the server's key is unusable: {exc}") from None


def batch_command(server_url: str, version: str, key: bytes, pilot_args: list[str], *,
                  ca_file: str | None = None, ca_dir: str | None = None) -> list[str]:
    """The argv of a one-file pilot's batch job."""
    if len(key) != 32:
        raise SchedulerError("the pinned server key must be 32 bytes")
    return ["/bin/sh", "-c", _shell_line(), "panda-pilot", server_url.rstrip("/"), version,
            key.hex(), ca_file or "", ca_dir or "", "--", *pilot_args]
