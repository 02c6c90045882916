"""Where a file lives on a storage element: one deterministic rule for every component.

Like Rucio's deterministic layout, a replica's path is derived from its scope and name only, with
two levels of hash directories so no directory grows to millions of entries. The pilot (stage-in
and stage-out), the data service and the demo all build paths through this module.
"""
from __future__ import annotations

import hashlib
import re

#: the longest name: a file system takes 255 bytes per name, and every temporary name made from
#: a replica's name must fit too (the copytools' ``.<name>.panda-part``, the data service's
#: ``.<name>.part-<8 hex>``: 15 more); 25 bytes stay free for tools to come
MAX_NAME_LENGTH = 230
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+:-]{0,%d}" % (MAX_NAME_LENGTH - 1))


class BadFileName(ValueError):
    """A logical file name or scope that could escape its directory or break a path."""


def check_name(name: str, what: str = "file name") -> str:
    """Return ``name`` if it is a safe logical name, else raise BadFileName.

    Refuses '..', '/', NUL, newlines, empty names, leading dots and dashes, and anything over
    ``MAX_NAME_LENGTH`` characters: such names come from users and must never become a path
    outside a work directory or storage element. The whole string must match (``fullmatch``:
    ``$`` would let a trailing newline through).
    """
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise BadFileName(f"refusing {what} {str(name)[:300]!r}: only letters, digits and ._+:- "
                          f"are allowed, no '..', no leading '.' or '-', 1 to {MAX_NAME_LENGTH} "
                          "characters")
    return name


def replica_path(scope: str, lfn: str) -> str:
    """Relative path of ``scope:lfn`` below a storage element's root: the scope's dotted parts
    as folders (``user.alice`` is ``user/alice``), then the hash folders, as Rucio's
    deterministic layout and PanDA's pilot 3 write it."""
    check_name(scope, "scope")
    check_name(lfn)
    digest = hashlib.md5(f"{scope}:{lfn}".encode()).hexdigest()
    folders = "/".join(part for part in scope.split(".") if part)
    return f"{folders}/{digest[0:2]}/{digest[2:4]}/{lfn}"


def same_location(reported: str, expected: str) -> bool:
    """Whether a SURL a pilot reported names the replica at ``expected`` (``replica_url``):
    the same scheme, host and path; ``file:`` without a host, with ``localhost`` or as a plain
    path are one; repeated slashes count once. A '..' segment never matches."""
    from urllib.parse import unquote, urlsplit

    def norm(url: str) -> tuple[str, str, str, str]:
        parts = urlsplit(url if "://" in url else "file://" + url)
        scheme, host = parts.scheme.lower(), parts.netloc.lower()
        if scheme == "file" and host == "localhost":
            host = ""
        return scheme, host, re.sub(r"/+", "/", unquote(parts.path)), parts.query

    if ".." in reported.split("?")[0].split("/") or "\0" in reported:
        return False
    return norm(reported) == norm(expected)


def replica_url(se_url: str, scope: str, lfn: str) -> str:
    """Full URL of ``scope:lfn`` on the storage element whose root URL is ``se_url``."""
    return se_url.rstrip("/") + "/" + replica_path(scope, lfn)
