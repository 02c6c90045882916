"""``none``: the payload runs as the pilot's own user with the pilot's view of the node (what
pilots did before sandboxes; docs/pilot.md says what that leaves readable)."""
from __future__ import annotations

import logging

from .base import Sandbox, SandboxSpec, Wrapped

log = logging.getLogger(__name__)


class NoSandbox(Sandbox):
    name = "none"

    def wrap(self, spec: SandboxSpec) -> Wrapped:
        if spec.image:
            log.warning("the job names the container %r; this site runs payloads without one "
                        "(sandbox runtime 'none')", spec.image[:200])
        return Wrapped(list(spec.argv), dict(spec.env))
