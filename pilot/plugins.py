"""Load the pilot's pluggy plugins: every installed ``panda.pilot`` entry point, built-ins too."""
from __future__ import annotations

import logging
from typing import Any, Iterable

log = logging.getLogger(__name__)


def make_manager(extra: Iterable[Any] = (), entry_points: bool = True):
    """A PluginManager with the hookspecs, all entry-point plugins and ``extra`` objects.

    A plugin that fails to load is logged and left out: a broken add-on must not stop a pilot
    (and with it a batch slot) from running jobs under the other monitors. Plugins are asked in
    the order they were found (entry points, then ``extra``), so with ``firstresult`` hooks
    (``pilot_monitor_check``) the first found that answers wins."""
    import pluggy

    from . import hookspecs

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if entry_points:
        from panda_core.drivers import entry_points as eps   # one scan, shared with drivers

        for ep in eps(hookspecs.PROJECT):
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            try:
                pm.register(ep.load(), name=ep.name)
            except Exception as exc:  # import errors, bad hook signatures, ...
                log.error("pilot plugin %r (%s) not loaded: %s: %s", ep.name, ep.value,
                          type(exc).__name__, exc)
    for plugin in extra:
        pm.register(plugin)
    # pluggy asks the last-registered plugin first: register them again, in reverse
    found = pm.list_name_plugin()
    for _, plugin in found:
        pm.unregister(plugin)
    for name, plugin in reversed(found):
        pm.register(plugin, name=name)
    log.debug("pilot plugins: %s", [name for name, _ in found])
    return pm


def notify(pm, hook: str, **kwargs: Any) -> None:
    """Call a lifecycle hook; a failing plugin is logged and never stops the job."""
    if pm is None:
        return
    try:
        getattr(pm.hook, hook)(**kwargs)
    except Exception:  # a plugin's bug must not fail the job
        log.exception("plugin hook %s failed", hook)
