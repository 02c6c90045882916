"""Pilot error codes: one table, PanDA's numbers where PanDA has one.

Shared vocabulary: the pilot reports these codes (``pilotErrorCode``), the copytools raise them and
the server's monitor groups failures by them, so the table lives where all may import it.
``pilot.errors`` re-exports it together with the pilot's exception types. ``CodedError`` is the one
exception type that carries such a code, so a code is never lost between where a failure happened
and the report that names it.
"""
from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """PanDA pilot 3 numbers (pilot/common/errorcodes.py) where PanDA has one; 1500-1599 are
    panda-wms's own, for failures PanDA has no code for."""

    GENERAL = 1008                 # general pilot error, consult the pilot log
    NO_LOCAL_SPACE = 1098
    STAGEIN_FAILED = 1099
    WORKDIR_TOO_LARGE = 1104
    NO_PROXY = 1163                # no valid credential
    OUT_OF_MEMORY = 1212          # payload out of memory (oom)
    STAGEOUT_FAILED = 1137
    KILLED_BY_SERVER = 1144
    LOCAL_FILE_SIZE_MISMATCH = 1506  # size differs after transfer (no PanDA code)
    MD5_MISMATCH_OUT = 1141
    MD5_MISMATCH_IN = 1145
    LOOPING_JOB = 1150
    STAGEIN_TIMEOUT = 1151
    STAGEOUT_TIMEOUT = 1152
    NO_SUCH_FILE = 1165            # missing output file
    ADLER32_MISMATCH_IN = 1171
    ADLER32_MISMATCH_OUT = 1172
    PAYLOAD_EXECUTION_FAILURE = 1305
    SANDBOX_FAILURE = 1306         # the sandbox/container runtime failed (PanDA: SINGULARITYGENERALFAILURE)
    SANDBOX_NOT_INSTALLED = 1325   # the site's sandbox runtime is missing on the node
    SANDBOX_USER_NAMESPACE = 1340  # the runtime cannot create namespaces on this node
    BAD_QUEUE_CONFIG = 1341        # the queue description asks for something unusable
    SIGTERM = 1201
    SIGQUIT = 1202
    SIGSEGV = 1203
    SIGXCPU = 1204
    SIGUSR1 = 1207
    SIGBUS = 1206
    SIGINT = 1507                  # no PanDA code
    SIGKILL = 1508                 # no PanDA code
    REPLICA_EXISTS = 1509          # other bytes already at the stage-out destination (no PanDA code)
    BATCH_WALLTIME = 1213          # the batch system's wall time is about to run out
    PAYLOAD_WALLTIME = 1503       # job's own wall-time limit exceeded (no PanDA code)
    MEMORY_LIMIT = 1235
    PAYLOAD_STDOUT_SILENT = 1502   # no PanDA code (PanDA's 1236 is 'failed by server')
    TRANSFORM_NOT_FOUND = 1346     # the transformation could not be found or downloaded
    BAD_JOB_SPEC = 1500            # job definition unreadable or inconsistent (no PanDA code)
    BAD_SIGNATURE = 1501           # job spec signature does not verify (no PanDA code)
    HOSTILE_FILE_NAME = 1371       # a file name that would escape the work directory
    NO_HEARTBEAT_REACHED = 1317
    MISSING_INPUT = 1331
    PAYLOAD_FAILED = 1220         # non-zero exit code from the payload (PanDA: unknown payload failure)
    DISK_SPACE_LOW = 1505         # free disk below the site's minimum during the job (no PanDA code)
    RECOVERED_LOST = 1504          # a later pilot recovered the job of a pilot that died (no PanDA code)
    KILL_SIGNAL = 1200             # payload killed by a signal the pilot did not send
    COMMUNICATION_FAILURE = 1318   # the server could not be reached
    LOG_CREATION_FAILURE = 1320    # the log tarball could not be made
    NO_REMOTE_SPACE = 1333         # the storage element is full (stage-out)
    STAGEIN_AUTH_FAILURE = 1338    # the storage element refused our credentials (stage-in)
    STAGEOUT_AUTH_FAILURE = 1383   # the storage element refused our credentials (stage-out)


ERROR_TEXT: dict[int, str] = {
    ErrorCode.GENERAL: "general pilot error",
    ErrorCode.NO_LOCAL_SPACE: "not enough local space",
    ErrorCode.STAGEIN_FAILED: "stage-in failed",
    ErrorCode.WORKDIR_TOO_LARGE: "work directory too large",
    ErrorCode.NO_PROXY: "no valid credential",
    ErrorCode.OUT_OF_MEMORY: "payload ran out of memory",
    ErrorCode.STAGEOUT_FAILED: "stage-out failed",
    ErrorCode.KILLED_BY_SERVER: "killed by the server",
    ErrorCode.LOCAL_FILE_SIZE_MISMATCH: "file size mismatch after transfer",
    ErrorCode.MD5_MISMATCH_OUT: "md5 checksum mismatch on stage-out",
    ErrorCode.MD5_MISMATCH_IN: "md5 checksum mismatch on stage-in",
    ErrorCode.LOOPING_JOB: "looping job: no output file changed for too long",
    ErrorCode.STAGEIN_TIMEOUT: "stage-in timed out",
    ErrorCode.STAGEOUT_TIMEOUT: "stage-out timed out",
    ErrorCode.NO_SUCH_FILE: "missing output file",
    ErrorCode.ADLER32_MISMATCH_IN: "adler32 checksum mismatch on stage-in",
    ErrorCode.ADLER32_MISMATCH_OUT: "adler32 checksum mismatch on stage-out",
    ErrorCode.PAYLOAD_EXECUTION_FAILURE: "payload could not be executed",
    ErrorCode.SANDBOX_FAILURE: "the payload's sandbox failed",
    ErrorCode.SANDBOX_NOT_INSTALLED: "the site's sandbox runtime is not installed on this node",
    ErrorCode.SANDBOX_USER_NAMESPACE: "the sandbox runtime cannot create namespaces on this node",
    ErrorCode.BAD_QUEUE_CONFIG: "bad queue configuration",
    ErrorCode.SIGTERM: "pilot received SIGTERM",
    ErrorCode.SIGQUIT: "pilot received SIGQUIT",
    ErrorCode.SIGSEGV: "pilot received SIGSEGV",
    ErrorCode.SIGXCPU: "pilot received SIGXCPU",
    ErrorCode.SIGUSR1: "pilot received SIGUSR1",
    ErrorCode.SIGBUS: "pilot received SIGBUS",
    ErrorCode.SIGINT: "pilot received SIGINT",
    ErrorCode.SIGKILL: "pilot received SIGKILL",
    ErrorCode.BATCH_WALLTIME: "batch system wall time reached",
    ErrorCode.PAYLOAD_WALLTIME: "job wall time limit exceeded",
    ErrorCode.MEMORY_LIMIT: "memory limit exceeded",
    ErrorCode.PAYLOAD_STDOUT_SILENT: "payload wrote nothing to stdout for too long",
    ErrorCode.TRANSFORM_NOT_FOUND: "transformation not found",
    ErrorCode.BAD_JOB_SPEC: "bad job definition",
    ErrorCode.BAD_SIGNATURE: "job definition signature does not verify",
    ErrorCode.REPLICA_EXISTS: "a different file already exists at the stage-out destination",
    ErrorCode.HOSTILE_FILE_NAME: "refused a hostile file name",
    ErrorCode.NO_HEARTBEAT_REACHED: "no heartbeat reached the server for too long",
    ErrorCode.MISSING_INPUT: "missing input file",
    ErrorCode.PAYLOAD_FAILED: "payload exited with a non-zero code",
    ErrorCode.DISK_SPACE_LOW: "free disk space below the site's minimum",
    ErrorCode.RECOVERED_LOST: "job recovered from a pilot that died",
    ErrorCode.KILL_SIGNAL: "payload killed by a signal",
    ErrorCode.COMMUNICATION_FAILURE: "failed to communicate with the server",
    ErrorCode.LOG_CREATION_FAILURE: "failed to create the log tarball",
    ErrorCode.NO_REMOTE_SPACE: "no space left on the storage element",
    ErrorCode.STAGEIN_AUTH_FAILURE: "authentication failure during stage-in",
    ErrorCode.STAGEOUT_AUTH_FAILURE: "authentication failure during stage-out",
}


def error_text(code: int) -> str:
    """Short text for ``code``; unknown codes get a generic text, never an exception."""
    return ERROR_TEXT.get(code, f"pilot error {code}")


#: server-side (dispatcher/watcher) codes, jobDispatcherErrorCode
class DispatcherCode(IntEnum):
    LOST_HEARTBEAT = 100
    RECOVERY_FAILED = 101
    NO_REPLY = 102
    HOLDING_TIMEOUT = 103
    TRANSFERRING_TIMEOUT = 104
    TIMEOUT = 105


class CodedError(Exception):
    """A failure with a PanDA error code and a short diagnostic (the pilot's ``PilotError``)."""

    def __init__(self, code: int, diag: str = "") -> None:
        self.code = int(code)
        self.diag = diag or error_text(code)
        super().__init__(f"[{self.code}] {self.diag}")
