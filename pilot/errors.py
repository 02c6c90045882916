"""The pilot's error vocabulary: PanDA's code table plus exception types that always carry a code.

Every failure the pilot reports (``pilotErrorCode``/``pilotErrorDiag``) comes from a ``PilotError``,
so a code can never be forgotten on the way from where it happened to the final update.
``ServerUnreachable`` (every try of a server call failed) comes from the protocol client.
"""
from __future__ import annotations

from panda_core.client import ServerUnreachable
from panda_core.errorcodes import ERROR_TEXT, CodedError, DispatcherCode, ErrorCode, error_text

__all__ = ["ErrorCode", "ERROR_TEXT", "DispatcherCode", "error_text", "PilotError",
           "ServerUnreachable", "BadJobSpec", "BadSignature", "PayloadKilled", "StageError"]


#: a failure with a PanDA pilot error code and a short diagnostic for the server; the ground's
#: coded errors (a job spec that does not decode, a server that stays away) are PilotErrors too
PilotError = CodedError


class BadJobSpec(PilotError):
    def __init__(self, diag: str) -> None:
        super().__init__(ErrorCode.BAD_JOB_SPEC, diag)


class BadSignature(PilotError):
    def __init__(self, diag: str) -> None:
        super().__init__(ErrorCode.BAD_SIGNATURE, diag)


class PayloadKilled(PilotError):
    """The pilot killed the payload (monitor verdict, server command, signal)."""


class StageError(PilotError):
    """A stage-in or stage-out failed; ``lfn`` names the file."""

    def __init__(self, code: int, diag: str, lfn: str = "") -> None:
        self.lfn = lfn
        super().__init__(code, diag)


def diag_limit(text: str, limit: int = 250) -> str:
    """PanDA's pilotErrorDiag column is short: keep the end, which usually holds the reason."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else "..." + text[-(limit - 3):]
