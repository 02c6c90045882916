"""A job has one pilot: who holds a dispatched job, and whether an updateJob comes from it.

``getJob`` records the holder in the job's row: the token subject (``pilot_owner``), the
``pilotID`` and ``node`` the pilot sent, and the SHA-256 of its ``pilotNonce`` (our pilot sends
a fresh secret nonce with every getJob and repeats it in every updateJob of that job; pilot 3
sends none). :func:`refusal` says why an update is not the holder's, or None. The hot path
(``server/pghot.py``) applies the same rules as a guard in its statements; an update its guard
stops goes to the general path, which answers with this module's reason.

What binds: the nonce, when the dispatch had one (a secret between the pilot and the server:
another pilot of the same site, with the same token, cannot know it; a later pilot recovering
the job from the dead one's work dir reads it there). Without a nonce (pilot 3): the token
subject, and the ``pilotID``/``node`` when both the dispatch and the update name one. An admin
identity is not held to the token subject (operators), but is to the nonce.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from .auth import Identity


def nonce_digest(nonce: str | None) -> str | None:
    """What the job row keeps of a pilot's nonce (never the nonce itself: job views show rows)."""
    if not nonce:
        return None
    return hashlib.sha256(nonce.encode()).hexdigest()


@dataclass(frozen=True)
class Claim:
    """What an updateJob says about the pilot sending it."""
    pilot_id: str | None = None
    node: str | None = None
    nonce: str | None = None

    @property
    def digest(self) -> str | None:
        return nonce_digest(self.nonce)


def refusal(job: dict[str, Any], identity: Identity | None, claim: Claim) -> str | None:
    """Why ``identity`` sending ``claim`` may not update ``job`` (its row: ``pilot_owner``,
    ``pilot_id``, ``node``, ``pilot_nonce``), or None when it is the job's pilot."""
    panda_id = job.get("panda_id")
    held_nonce = job.get("pilot_nonce")
    if held_nonce:
        given = claim.digest
        if given is None or not hmac.compare_digest(given, held_nonce):
            return (f"job {panda_id} is held by the pilot it was dispatched to; this update "
                    "does not carry that dispatch's pilotNonce")
    owner = job.get("pilot_owner")
    if (owner and identity is not None and identity.role != "admin"
            and identity.subject != owner):
        return f"job {panda_id} is held by {owner}, not {identity.subject}"
    if not held_nonce:
        if job.get("pilot_id") and claim.pilot_id and claim.pilot_id != job["pilot_id"]:
            return (f"job {panda_id} is held by pilot {job['pilot_id']!r}, not "
                    f"{claim.pilot_id!r}")
        if job.get("node") and claim.node and claim.node != job["node"]:
            return f"job {panda_id} is held by a pilot on {job['node']!r}, not {claim.node!r}"
    return None
