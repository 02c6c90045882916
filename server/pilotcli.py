"""``panda pilotfile``: the operator's view of the one-file pilot's stored versions.

``list`` shows every stored version and what the server would do with it (serve it, re-sign
it, refuse it and why); ``resign`` re-signs, with the key dir's current job-signing key, every
version whose signature is not that key's and that the server can vouch for (its build
records, or ``--previous-key OLD.pem`` when the old key signed it); ``build`` builds this
code's version now (with ``--pilot-wheel`` for other platforms) instead of on the first request.
Nothing here creates a key: a key dir without one is an error.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .cli import DEFAULT_KEYS
from .pilotfile import PilotFileError
from .pilotstore import RECORDS_DIR, PilotFiles, Signer, load_public_key

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="panda pilotfile", description="The one-file pilot's stored versions: list them, "
        "re-sign them after the job-signing key was replaced, build this code's version.",
        epilog="examples: panda pilotfile list; panda pilotfile resign --previous-key old.pem; "
        "panda pilotfile build --pilot-wheel wheels/")
    p.add_argument("action", choices=["list", "resign", "build"])
    p.add_argument("--key-dir", default=str(DEFAULT_KEYS),
                   help="the server's --key-dir (default: %(default)s)")
    p.add_argument("--pilot-dir", metavar="DIR",
                   help="the server's --pilot-dir (default: KEY_DIR/pilot)")
    p.add_argument("--previous-key", action="append", default=[], metavar="PEM",
                   help="list, resign: the public key (PEM) that signed versions before the key "
                        "was replaced ('panda token public-key' of the old key dir; repeatable)")
    p.add_argument("--pilot-wheel", action="append", default=[], metavar="PATH",
                   help="build: psutil's abi3 wheel for another platform (as 'panda server "
                        "--pilot-wheel')")
    p.add_argument("--log-level", default=None)
    return p


def main(argv: list[str]) -> int:
    from panda_core.logs import setup_logging

    from .auth import SIGNING_KEY_FILE

    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    key_dir = Path(args.key_dir)
    key_file = key_dir / SIGNING_KEY_FILE
    if not key_file.is_file():
        sys.stderr.write(f"panda pilotfile: no job-signing key {key_file}: is {key_dir} the "
                         "server's --key-dir?\n")
        return 2
    try:
        signer = Signer.from_pem_file(key_file)
        previous = [load_public_key(path) for path in args.previous_key]
    except (OSError, ValueError, TypeError) as exc:
        sys.stderr.write(f"panda pilotfile: {exc}\n")
        return 2
    files = PilotFiles(args.pilot_dir or key_dir / "pilot", signer,
                       records=key_dir / RECORDS_DIR, wheels=args.pilot_wheel)
    try:
        if args.action == "build":
            version = files.current()
            info = files.info(version)
            sys.stdout.write(f"{version}  {info.size if info else '?'} bytes  platforms "
                             f"{', '.join(info.platforms) if info else '?'}\n")
            return 0
        refused = 0
        for version in files.stored():
            if args.action == "resign":
                result = files.check(version, previous)
            else:
                result = files.judge(version, *files.load(version), tuple(previous))
            info = files.info(version)
            refused += not result.servable
            where = f"  {', '.join(info.platforms)}  {info.size} bytes" if info else ""
            sys.stdout.write(f"{version}  {result.action}{where}"
                             f"{'  (' + result.reason + ')' if result.reason else ''}\n")
        if not files.stored():
            sys.stdout.write(f"no pilot file in {files.root}\n")
        sys.stdout.write(f"signed by {signer.fingerprint}\n")
        return 1 if refused else 0
    except (PilotFileError, OSError) as exc:
        sys.stderr.write(f"panda pilotfile {args.action}: {exc}\n")
        return 1
