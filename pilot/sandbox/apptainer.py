"""``apptainer``: the job's ``container_name`` (or the site's ``sandbox.image``) run with
apptainer, or singularity where only that is installed, found on the pilot's PATH.

``apptainer exec`` with ``--contain`` (private ``/tmp``, ``/var/tmp`` and home, a minimal
``/dev``), ``--ipc --pid`` (own namespaces: the pilot is invisible and cannot be signalled),
``--cleanenv`` (the host environment stays out; the payload's own variables go in as
``APPTAINERENV_*``, which apptainer hands to the payload without the prefix), ``--no-home``,
the work dir bound read-write and made the current folder, inputs bound read-only, the site's
``bind`` paths bound read-only, and with ``network: false`` ``--net --network none``. A bind never names (or lies below) the pilot's hidden paths (token
file, job dirs' base).

Not covered here (no apptainer can be installed on the test machine; the tests check the
command line against a fake): image pulls and their cache (``docker://`` names need the
network and a writable ``APPTAINER_CACHEDIR``), what the node's ``apptainer.conf`` binds by
default (it may mount more of the host, ``/etc/hosts`` and ``/etc/localtime`` usually), and
``--network none`` needs a setuid install or root on most versions.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess

from ..errors import ErrorCode
from .base import Sandbox, SandboxError, SandboxSpec, Wrapped, install_key

log = logging.getLogger(__name__)

PROGRAMS = ("apptainer", "singularity")
_ENV_PREFIX = "APPTAINERENV_"
#: what apptainer itself needs of the environment to run (the payload gets none of it)
_RUNTIME_ENV = ("PATH", "LANG", "TZ")


class ApptainerSandbox(Sandbox):
    name = "apptainer"
    runs_images = True

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.program = next((p for p in map(shutil.which, PROGRAMS) if p), None)

    def image_for(self, spec: SandboxSpec) -> str:
        image = spec.image or self.config.image
        if not image:
            raise SandboxError(ErrorCode.BAD_QUEUE_CONFIG, "the job names no container "
                               "(container_name) and the site's sandbox.image is empty")
        if image.startswith("-") or "\n" in image or "\0" in image:
            raise SandboxError(ErrorCode.BAD_QUEUE_CONFIG,
                               f"unusable container name {image[:200]!r}")
        return image

    def command(self, spec: SandboxSpec) -> list[str]:
        if self.program is None:
            raise SandboxError(ErrorCode.SANDBOX_NOT_INSTALLED, "neither apptainer nor "
                               "singularity is installed on this node (or on the pilot's PATH)")
        workdir = os.path.realpath(spec.workdir)
        args = [self.program, "exec", "--contain", "--ipc", "--pid", "--cleanenv", "--no-home",
                "--bind", f"{workdir}:{workdir}:rw", "--pwd", workdir]
        if not self.config.network:
            args += ["--net", "--network", "none"]
        hidden = [os.path.realpath(h) for h in spec.hide]
        for path in [*self.config.bind, *spec.read_only]:
            real = os.path.realpath(path)
            if any(real == h or real.startswith(h.rstrip("/") + "/") for h in hidden):
                log.warning("%s lies below a path the payload must not see: not bound", real)
            elif os.path.exists(real) and not real.startswith(workdir.rstrip("/") + "/"):
                args += ["--bind", f"{real}:{real}:ro"]
        return [*args, self.image_for(spec)]

    def wrap(self, spec: SandboxSpec) -> Wrapped:
        env = {k: v for k, v in spec.env.items() if k in _RUNTIME_ENV}
        workdir = os.path.realpath(spec.workdir)
        inner = {**spec.env, "HOME": workdir, "TMPDIR": "/tmp"}
        inner.pop("PATH", None)   # the image's own PATH, not the node's
        env.update({_ENV_PREFIX + k: v for k, v in inner.items()})
        return Wrapped([*self.command(spec), *spec.argv], env)

    def probe_key(self) -> str | None:
        return install_key(self.program)

    def probe(self) -> None:
        if self.program is None:
            raise SandboxError(ErrorCode.SANDBOX_NOT_INSTALLED, "neither apptainer nor "
                               "singularity is installed on this node (or on the pilot's PATH)")
        try:
            proc = subprocess.run([self.program, "--version"], capture_output=True, text=True,
                                  timeout=30, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SandboxError(ErrorCode.SANDBOX_FAILURE, f"{self.program} does not start: "
                               f"{exc}") from None
        if proc.returncode != 0:
            raise SandboxError(ErrorCode.SANDBOX_FAILURE, f"{self.program} --version failed: "
                               + " ".join(proc.stderr.split())[:300])
        log.info("container runtime: %s", proc.stdout.strip()[:100])
