"""Whether a submitter may name a VO and a working group: the token's groups decide.

Groups come from the token (``wlcg.groups`` / ``groups``, as a WLCG token or ``panda token issue
--group`` gives them), compared without leading slashes. A task may name

- ``vo: atlas`` when the token has the group ``atlas`` or one below it (``atlas/phys-higgs``);
- ``working_group: phys-higgs`` when it has ``phys-higgs`` or a group ending in
  ``/phys-higgs`` (and, with a ``vo``, that group must be below the VO).

Admins may name any. A certificate (X.509) identity carries no groups: it may name none.
"""
from __future__ import annotations


def refusal(identity, vo: str | None, working_group: str | None) -> str | None:
    """None if ``identity`` may submit for this VO and working group, else why not."""
    if identity is None or identity.role == "admin" or (vo is None and working_group is None):
        return None
    groups = [g.strip("/") for g in getattr(identity, "groups", ()) or ()]
    shown = ", ".join(groups) or "none"
    if vo is not None and not any(g == vo or g.startswith(vo + "/") for g in groups):
        return f"VO {vo!r} is not among your token's groups ({shown})"
    if working_group is not None:
        ok = [g for g in groups if g == working_group or g.endswith("/" + working_group)]
        if vo is not None:
            ok = [g for g in ok if g == working_group or g.startswith(vo + "/")]
        if not ok:
            return (f"working group {working_group!r} is not among your token's groups "
                    f"({shown})")
    return None
