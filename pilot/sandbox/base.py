"""The contract of a payload sandbox (plugin group ``panda.sandboxes``): what it is given, what
it returns.

A sandbox never starts anything itself: it turns the payload's argv and environment into the
command line that runs the same payload isolated (``wrap``), and says once per pilot whether it
can work on this node at all (``probe``). The pilot starts what ``wrap`` returns exactly as it
starts an unsandboxed payload (pilot/payload.py), so the monitors, the tree kill, the exit code
and the CPU time work the same with every runtime.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from panda_core.siteconfig import SandboxConfig

from ..errors import ErrorCode, PilotError


class SandboxError(PilotError):
    """The sandbox cannot run this payload (or any, on this node); carries the code to report."""


class UnknownSandbox(SandboxError):
    """The site config names a runtime that is not installed (or does not load)."""

    def __init__(self, diag: str) -> None:
        super().__init__(ErrorCode.BAD_QUEUE_CONFIG, diag)


@dataclass
class SandboxSpec:
    """One payload to isolate.

    ``read_only``: host paths the payload must read besides its work dir (inputs that are links to
    a storage element, direct-read ``file://`` replicas); ``hide``: the pilot's own paths (token
    file, job dirs' base) that must stay invisible even where they lie below a path the payload
    sees (a token file in ``/etc``); ``image``: the container image the job asked for
    (``container_name``), empty when none."""
    argv: list[str]
    env: dict[str, str]
    workdir: Path
    read_only: list[Path] = field(default_factory=list)
    hide: list[Path] = field(default_factory=list)
    image: str = ""


#: where a runtime's in-sandbox shell leaves ``times`` (its children's CPU) in the work dir: a
#: PID namespace keeps the payload's CPU out of the wait status the pilot collects (measured:
#: bwrap --unshare-pid reports 0.001 s for a payload that used 0.3 s)
TIMES_FILE = ".payload_times"
IN_SANDBOX_SHELL = ["/bin/sh", "-c", '"$@"; rc=$?; times > ' + TIMES_FILE + ' 2>/dev/null; '
                    'exit "$rc"', "payload"]


def children_cpu_s(workdir) -> float:
    """The children's user + system seconds from a ``times`` file in ``workdir`` (0 if none or
    unreadable: the payload owns the folder and may have removed or changed it)."""
    import re
    try:
        lines = (Path(workdir) / TIMES_FILE).read_text()[:200].splitlines()
    except OSError:
        return 0.0
    if len(lines) < 2:
        return 0.0
    total = 0.0
    for minutes, seconds in re.findall(r"(\d+)m([\d.]+)s", lines[1])[:2]:
        total += int(minutes) * 60 + float(seconds)
    return total


@dataclass
class Wrapped:
    """What the pilot starts: the runtime's command line ending in the payload's, and its
    environment."""
    argv: list[str]
    env: dict[str, str]


class Sandbox:
    """A runtime: constructed once per pilot with the site's ``sandbox`` section."""

    name = "?"
    #: whether the runtime can give a job the image it names (``container_name``)
    runs_images = False

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()

    def probe(self) -> None:
        """Raise SandboxError if this node cannot run payloads in this sandbox (runtime missing,
        no user namespaces); called once, before the pilot asks for a job."""

    def probe_key(self) -> str | None:
        """What identifies this runtime's install (program and its mtime), so a node's pilots
        probe it once (``pilot.sandbox.ready``); None: probe every time (or nothing to probe)."""
        return None

    def wrap(self, spec: SandboxSpec) -> Wrapped:
        raise NotImplementedError


def install_key(program: str | None) -> str | None:
    """``path:mtime:size`` of a runtime's program; None when it is missing (nothing to record)."""
    if not program:
        return None
    try:
        st = os.stat(program)
    except OSError:
        return None
    return f"{os.path.realpath(program)}:{st.st_mtime_ns}:{st.st_size}"
