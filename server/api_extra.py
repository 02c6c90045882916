"""API methods of the server's logic: global shares, the data service, the watcher.

Served under ``/api/v1`` beside ``server/api.py`` (``app.API_MODULES``). Reads are open,
changes need the admin role.
"""
from __future__ import annotations

import logging

from .apibase import ADMIN, ApiError, ApiMethods, Context, Param, int_param
from .eventranges import EventRangeService
from .shares import ShareChooser, ShareError, ShareStore, parse_shares, targets

log = logging.getLogger(__name__)

api = ApiMethods()


# ---------------------------------------------------------------------- global shares
def _tree_view(tree) -> dict:
    return {"shares": [s.to_dict() for s in tree],
            "targets": {k: round(v, 6) for k, v in targets(tree).items()}}


@api("shares", "list")
def shares_list(ctx: Context, params: dict) -> dict:
    """The share tree and each share's target fraction of the whole."""
    return _tree_view(ShareStore(ctx.tb).load())


@api("shares", "set", ("POST",), ADMIN, params=(
    Param("shares", "array", description="the whole tree: [{name, value, children}]"),
    Param("values", "object", description="{share: percent}")))
def shares_set(ctx: Context, params: dict) -> dict:
    """Replace the tree (``shares``: [{name, value, children}]) or change some values
    (``values``: {name: percent}); siblings must still add up to 100."""
    store = ShareStore(ctx.tb)
    try:
        if params.get("shares") is not None:
            tree = parse_shares(params["shares"])
            store.save(tree)
        elif isinstance(params.get("values"), dict) and params["values"]:
            tree = store.set_values(params["values"])
        else:
            raise ApiError("give 'shares' (the whole tree) or 'values' ({share: percent})")
    except ShareError as exc:
        raise ApiError(f"bad shares: {exc}") from None
    ctx.message = f"global shares updated by {ctx.identity.subject}"
    return _tree_view(tree)


@api("shares", "usage", params=(
    Param("site", required=True, max_length=128, description="a site's name"),))
def shares_usage(ctx: Context, params: dict) -> dict:
    """At one site: cores in use and activated jobs per share there, the cores in use per
    share over the whole grid (what the order is computed from), and the order the next pilot
    gets."""
    site = str(params.get("site", ""))
    ctx.tb.sites.get(site)          # an unknown site: its message
    chooser = ShareChooser(ctx.tb, ttl_s=0)
    grid = chooser.grid_running()
    order, running, waiting = chooser.ranking(site, grid=grid)
    return {"site": site, "order": order, "running": running, "activated": waiting,
            "grid_running": grid}


# ---------------------------------------------------------------------- event ranges
@api("event", "summary", params=(
    Param("task_id", "integer", True, "a jediTaskID", minimum=1),))
def event_summary(ctx: Context, params: dict) -> dict:
    """Event ranges of a task per status."""
    task_id = int_param(params, "task_id")
    ctx.tb.tasks.get(task_id)
    return EventRangeService(ctx.tb).summary(task_id)
