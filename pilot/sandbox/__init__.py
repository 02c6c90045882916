"""Payload sandboxes: one stevedore driver each in ``panda.sandboxes`` (docs/pilot.md,
"Sandboxes"), chosen by the site config's ``sandbox.runtime``."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from panda_core.drivers import installed_names, load_driver
from panda_core.siteconfig import SandboxConfig

from .base import Sandbox, SandboxError, SandboxSpec, UnknownSandbox, Wrapped

__all__ = ["GROUP", "Sandbox", "SandboxError", "SandboxSpec", "UnknownSandbox", "Wrapped",
           "available", "load", "ready"]

log = logging.getLogger(__name__)

GROUP = "panda.sandboxes"
PROBE_FILE = ".sandbox-probe-{name}.json"   # in the job dirs' base, shared by a node's pilots
PROBE_VALID_S = 6 * 3600


def available() -> list[str]:
    """Names of the installed sandbox runtimes."""
    return installed_names(GROUP)


def load(config: SandboxConfig) -> Sandbox:
    """The runtime the site config names, constructed with its ``sandbox`` section.

    ``none``, the default, is not looked up: it starts where the installed metadata predates
    this group (an editable install not reinstalled). The others come from the entry-point
    scan the pilot's monitors were found in (``panda_core.drivers.entry_points``), not from a
    second scan by stevedore: the lookup was ~3 ms of what the sandbox added before the
    payload (docs/pilot.md, "Performance")."""
    if config.runtime == "none":
        from .none import NoSandbox

        return NoSandbox(config)
    return load_driver(GROUP, config.runtime, invoke_kwds={"config": config},
                       error=UnknownSandbox, kind="sandbox runtime", use_stevedore=False)


def ready(config: SandboxConfig, cache_dir: Path | None = None) -> Sandbox:
    """The site's runtime, known to work on this node: probed, unless a pilot of this node and
    user probed the same install since the last boot, less than ``PROBE_VALID_S`` ago (recorded
    in ``cache_dir``, the job dirs' base, where no sandboxed payload can write). Raises
    SandboxError saying why it cannot work; a failed probe is never recorded."""
    sandbox = load(config)
    key = sandbox.probe_key()
    record = cache_dir / PROBE_FILE.format(name=sandbox.name) if cache_dir and key else None
    stamp = {"key": key, "uid": os.getuid(), "boot": _boot_id()}
    if record is not None:
        try:
            seen = json.loads(record.read_text())
            if {k: seen.get(k) for k in stamp} == stamp \
                    and 0 <= time.time() - float(seen["time"]) < PROBE_VALID_S:
                return sandbox
        except (OSError, ValueError, KeyError, TypeError):
            pass
    sandbox.probe()
    if record is not None:
        try:
            tmp = record.with_name(f".{record.name}.{os.getpid()}")
            tmp.write_text(json.dumps({**stamp, "time": time.time()}))
            os.replace(tmp, record)
        except OSError as exc:   # a read-only base: the next pilot probes again, that is all
            log.debug("sandbox probe not recorded: %s", exc)
    return sandbox


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
