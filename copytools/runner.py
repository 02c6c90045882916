"""Run one transfer attempt in its own process, so a hung transfer can really be killed.

A thread stuck in a C call (a socket read, gfal2, a child xrdcp) cannot be stopped from Python;
a forked process can, together with everything it started (it leads its own process group).
The pilot calls ``run_transfer``: attempts under a hard timeout, retries with backoff.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
import traceback

from panda_core.errorcodes import ErrorCode
from panda_core.retry import RetryPolicy

from .base import CopyTool, Transfer, TransferError, TransferResult

log = logging.getLogger(__name__)

#: seconds a killed attempt's process group gets to disappear before we stop waiting for it
_REAP_S = 5.0


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a pilot killed by the batch
    system must not leave transfers running). Also usable as a Popen ``preexec_fn``."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child(tool: CopyTool, t: Transfer, direction: str, timeout: float, conn) -> None:
    try:
        os.setpgrp()  # own process group: a kill takes xrdcp & co. with it
    except OSError:
        pass
    die_with_parent()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)  # the pilot's handlers are not this process's
    try:
        fn = tool.stage_in if direction == "in" else tool.stage_out
        conn.send(("ok", fn(t, timeout)))
    except TransferError as exc:
        conn.send(("err", exc))
    except BaseException as exc:  # noqa: BLE001 - everything must reach the parent as an error
        code = ErrorCode.STAGEIN_FAILED if direction == "in" else ErrorCode.STAGEOUT_FAILED
        conn.send(("err", TransferError(code, f"{tool.name}: unexpected "
                                        f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")))
    finally:
        conn.close()


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except (ProcessLookupError, AttributeError, ValueError):
        pass
    proc.join(_REAP_S)


def attempt(tool: CopyTool, t: Transfer, direction: str, timeout: float) -> TransferResult:
    """One attempt in a forked child, killed (with its process group) after ``timeout`` s."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(tool, t, direction, timeout, send),
                       name=f"copytool-{tool.name}-{t.lfn}", daemon=True)
    proc.start()
    send.close()
    failed = ErrorCode.STAGEIN_FAILED if direction == "in" else ErrorCode.STAGEOUT_FAILED
    try:
        try:
            ready = recv.poll(timeout)
        except BaseException:  # the pilot is being stopped (signal handler raised): stop the copy
            _kill(proc)
            tool.cleanup_after_kill(t, direction)
            raise
        if not ready:
            _kill(proc)
            tool.cleanup_after_kill(t, direction)
            code = ErrorCode.STAGEIN_TIMEOUT if direction == "in" else ErrorCode.STAGEOUT_TIMEOUT
            raise TransferError(code, f"{tool.name}: {t.lfn} not transferred within {timeout:g} s; "
                                "transfer killed", retryable=True)
        try:
            status, payload = recv.recv()
        except (EOFError, OSError):
            proc.join(_REAP_S)
            tool.cleanup_after_kill(t, direction)
            raise TransferError(failed, f"{tool.name}: transfer process died (exit code "
                                f"{proc.exitcode}) while moving {t.lfn}", retryable=True) from None
    finally:
        recv.close()
    proc.join(1.0)  # the result is in hand: whatever still lingers (library threads) is killed
    if proc.is_alive():
        log.debug("transfer process %d lingered after its result; killing it", proc.pid)
        _kill(proc)
    if status == "ok":
        return payload
    raise payload


def run_transfer(tool: CopyTool, transfer: Transfer, direction: str, timeout: float,
                 retries: int = 2, backoff: float = 1.0) -> TransferResult:
    """Move one file in ("in") or out ("out"): up to ``1 + retries`` attempts, each killed after
    ``timeout`` s (1151/1152), waiting as ``RetryPolicy`` says (from ``backoff`` s, doubling,
    jittered) between retryable failures.

    Raises the last TransferError when no attempt succeeded.
    """
    if direction not in ("in", "out"):
        raise ValueError(f"direction must be 'in' or 'out', not {direction!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, not {timeout!r}")
    policy = RetryPolicy(attempts=1 + max(0, int(retries)), backoff_s=backoff)
    waits = policy.waits()
    for n in range(policy.attempts):
        try:
            result = attempt(tool, transfer, direction, timeout)
            log.info("%s stage-%s of %s:%s done (%d bytes, adler32 %s, attempt %d)", tool.name,
                     direction, transfer.scope, transfer.lfn, result.fsize, result.adler32, n + 1)
            return result
        except TransferError as exc:
            delay = next(waits, None)
            if not exc.retryable or delay is None:
                log.warning("%s stage-%s of %s failed for good: %s", tool.name, direction,
                            transfer.lfn, exc)
                raise
            log.warning("%s stage-%s of %s failed (attempt %d of %d), retrying in %.1f s: %s",
                        tool.name, direction, transfer.lfn, n + 1, policy.attempts, delay, exc)
            time.sleep(delay)
    raise AssertionError("unreachable")
