"""What the pilot needs from the queue description (``queuedata``): storage, copytools, limits.

The server serves pilot 3's queuedata shape with our extra key ``panda_wms`` holding the site
config dict (docs/contracts.md). Missing keys fall back to the contract's defaults, so an older or
smaller site config still gives a working pilot.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ErrorCode, PilotError


@dataclass
class Limits:
    looping_s: float = 7200
    min_free_disk_mb: float = 500
    max_workdir_mb: float = 20000
    heartbeat_s: float = 1800
    stdout_silent_s: float = 0          # 0 = the stdout-silence monitor is off
    memory_mb: float = 0                # site's memory per slot (per job when the job says none)
    walltime_s: float = 0               # site's longest job


@dataclass
class SiteInfo:
    name: str
    input_se: str = ""
    output_se: str = ""
    input_tool: str = "cp"
    input_options: dict[str, Any] = field(default_factory=dict)
    output_tool: str = "cp"
    output_options: dict[str, Any] = field(default_factory=dict)
    direct_read: bool = False
    transfer_timeout_s: float = 600
    transfer_retries: int = 2
    limits: Limits = field(default_factory=Limits)
    raw: dict[str, Any] = field(default_factory=dict)


def _num(d: dict, key: str, default: float) -> float:
    value = d.get(key, default)
    try:
        return float(value) if value is not None else default
    except (TypeError, ValueError):
        raise PilotError(ErrorCode.GENERAL,
                         f"site config: {key}={value!r} is not a number") from None


def site_from_queuedata(queuedata: dict[str, Any], site_name: str) -> SiteInfo:
    """Build SiteInfo from a queuedata dict (pilot 3 shape, our site config under ``panda_wms``).

    Anything malformed is a PilotError naming the problem, never a stray TypeError."""
    try:
        return _site_from_queuedata(queuedata, site_name)
    except PilotError:
        raise
    except (TypeError, ValueError, AttributeError) as exc:
        raise PilotError(ErrorCode.GENERAL, f"queuedata for {site_name} is malformed: "
                         f"{type(exc).__name__}: {exc}") from None


def _site_from_queuedata(queuedata: dict[str, Any], site_name: str) -> SiteInfo:
    if not isinstance(queuedata, dict):
        raise PilotError(ErrorCode.GENERAL, "queuedata is not a JSON object")
    cfg = queuedata.get("panda_wms")
    if not isinstance(cfg, dict):
        # PanDA's file may hold {site: queuedata}: accept that shape too
        inner = queuedata.get(site_name)
        cfg = inner.get("panda_wms") if isinstance(inner, dict) else None
    if not isinstance(cfg, dict):
        raise PilotError(ErrorCode.GENERAL,
                         f"queuedata for {site_name} has no 'panda_wms' site config")
    storage = cfg.get("storage") or {}
    tools = cfg.get("copytools") or {}
    transfer = cfg.get("transfer") or {}
    lim = cfg.get("limits") or {}
    res = cfg.get("resources") or {}
    tin, tout = tools.get("input") or {}, tools.get("output") or {}
    limits = Limits(looping_s=_num(lim, "looping_s", 7200),
                    min_free_disk_mb=_num(lim, "min_free_disk_mb", 500),
                    max_workdir_mb=_num(lim, "max_workdir_mb", _num(res, "max_disk_mb", 20000)),
                    heartbeat_s=_num(lim, "heartbeat_s", 1800),
                    stdout_silent_s=_num(lim, "stdout_silent_s", 0),
                    memory_mb=_num(res, "memory_mb", 0), walltime_s=_num(res, "max_walltime_s", 0))
    return SiteInfo(
        name=str(cfg.get("name") or site_name),
        input_se=str((storage.get("input") or {}).get("url") or ""),
        output_se=str((storage.get("output") or {}).get("url") or ""),
        input_tool=str(tin.get("name") or "cp"), input_options=dict(tin.get("options") or {}),
        output_tool=str(tout.get("name") or "cp"), output_options=dict(tout.get("options") or {}),
        direct_read=bool(cfg.get("direct_read", False)),
        transfer_timeout_s=_num(transfer, "timeout_s", 600),
        transfer_retries=int(_num(transfer, "retries", 2)),
        limits=limits, raw=cfg)


def load_queuedata_file(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PilotError(ErrorCode.GENERAL, f"cannot read queuedata {path}: {exc}") from None
