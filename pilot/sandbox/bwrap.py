"""``bwrap``: Debian's bubblewrap, unprivileged (user namespaces) or as root.

The payload sees: the system read-only (``/usr``, ``/etc``, the ``/bin``/``/lib`` links, the
site's ``sandbox.bind`` paths), its work dir read-write, the inputs it was given read-only, a
private ``/tmp`` and ``/var/tmp``, a fresh ``/proc`` of its own PID namespace (the pilot and
every other process of the node are not in it, so they can be neither read nor signalled), a
minimal ``/dev``, its own IPC and UTS namespaces and, with ``network: false``, no network but a
loopback. Nothing else of the host is mounted: not the job dir around the work dir (state file,
lock, the pilot's log), not the other jobs' dirs, not the pilot's token file; where one of those
lies below a path the payload does see, it is covered (an empty file or folder over it).

bwrap's own init process (pid 1 of the namespace) reaps the payload's orphans; it stays in the
session the pilot created, so the tree kill and the leftover sweep of pilot/payload.py reach it,
and a SIGKILL to it ends every process of the namespace.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from ..errors import ErrorCode
from .base import IN_SANDBOX_SHELL, Sandbox, SandboxError, SandboxSpec, Wrapped, install_key

log = logging.getLogger(__name__)

#: what of the host a payload sees read-only, where it exists (links are recreated as links)
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
PRIVATE_TMP = ("/tmp", "/var/tmp")
_NAMESPACE_HINTS = ("namespace", "uid map", "setting up uid", "clone", "operation not permitted")


class BwrapSandbox(Sandbox):
    name = "bwrap"

    def __init__(self, config=None) -> None:
        super().__init__(config)
        # found on PATH, as every program the pilot runs: never a path from the queue description
        self.program = shutil.which("bwrap")

    # --- the command line --------------------------------------------------------------------
    def _system(self) -> tuple[list[str], list[str]]:
        """(args, paths) for the read-only system and the site's extra paths."""
        args: list[str] = []
        seen: list[str] = []
        for path in SYSTEM_PATHS:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
                seen.append(path)
        for path in self.config.bind:
            real = os.path.realpath(path)
            args += ["--ro-bind-try", real, real]
            seen.append(real)
        return args, seen

    def _isolation(self) -> list[str]:
        args = ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--proc", "/proc", "--dev", "/dev"]
        if not self.config.network:
            args.append("--unshare-net")
        for path in PRIVATE_TMP:
            args += ["--tmpfs", path]
        return args

    def command(self, spec: SandboxSpec) -> list[str]:
        """bwrap's argv for ``spec`` (without the payload's argv)."""
        if self.program is None:
            raise SandboxError(ErrorCode.SANDBOX_NOT_INSTALLED, "bwrap (bubblewrap) is not "
                               "installed on this node, or not on the pilot's PATH")
        system, visible = self._system()
        args = [self.program, *system, *self._isolation()]
        if self.config.network:
            args += _resolver_binds(visible)
        workdir = os.path.realpath(spec.workdir)
        hidden = [os.path.realpath(h) for h in spec.hide]
        for path in hidden:
            args += _cover(path, visible)
        for path in spec.read_only:
            real = os.path.realpath(path)
            if any(_below(real, h) for h in hidden):   # an input never uncovers the pilot's
                log.warning("input %s lies below a path the payload must not see: not bound",
                            real)
            elif not _below(real, workdir) and os.path.exists(real):
                args += ["--ro-bind", real, real]
        args += ["--bind", workdir, workdir, "--chdir", workdir]
        return args

    def wrap(self, spec: SandboxSpec) -> Wrapped:
        if spec.image:
            log.warning("the job names the container %r; bwrap runs it on the node's own system",
                        spec.image[:200])
        env = dict(spec.env)
        # the host's HOME and TMPDIR are not mounted: the payload's are its work dir and /tmp
        env["HOME"] = os.path.realpath(spec.workdir)
        env["TMPDIR"] = "/tmp"
        # the payload's CPU time: a shell inside the PID namespace writes `times` at its end
        return Wrapped([*self.command(spec), "--", *IN_SANDBOX_SHELL, *spec.argv], env)

    # --- can this node do it ---------------------------------------------------------------------
    def probe_key(self) -> str | None:
        return install_key(self.program)

    def probe(self) -> None:
        """Run ``true`` in the sandbox once; a node without bwrap or without user namespaces
        takes no job (it would fail every one)."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="panda-bwrap-probe-") as tmp:
            argv = [*self.command(SandboxSpec(argv=[], env={}, workdir=Path(tmp))), "--", "true"]
            try:
                proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                      text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise SandboxError(ErrorCode.SANDBOX_FAILURE, f"bwrap does not start: {exc}"
                                   ) from None
        if proc.returncode != 0:
            why = " ".join(proc.stderr.split())[:300] or f"exit code {proc.returncode}"
            code = (ErrorCode.SANDBOX_USER_NAMESPACE
                    if any(h in why.lower() for h in _NAMESPACE_HINTS) else ErrorCode.SANDBOX_FAILURE)
            raise SandboxError(code, f"bwrap cannot sandbox payloads on this node: {why}")
        log.info("bwrap sandbox works on this node (%s)", self.program)


def _below(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _cover(hidden: str, visible: list[str]) -> list[str]:
    """Arguments that hide ``hidden`` if it lies below a path the payload sees."""
    if not any(_below(hidden, v) for v in visible):
        return []
    if os.path.isdir(hidden):
        return ["--tmpfs", hidden]       # the work dir, if below it, is bound again afterwards
    if os.path.exists(hidden):
        return ["--ro-bind", "/dev/null", hidden]
    return []


def _resolver_binds(visible: list[str]) -> list[str]:
    """``/etc/resolv.conf`` is often a link into ``/run``: bind its target so names resolve."""
    try:
        real = os.path.realpath("/etc/resolv.conf")
    except OSError:
        return []
    if os.path.isfile(real) and not any(_below(real, v) for v in visible):
        return ["--ro-bind", real, real]
    return []
