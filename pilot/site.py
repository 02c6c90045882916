"""The site as the pilot sees it: the site config inside the queue description (``queuedata``).

The server serves pilot 3's queuedata shape with our extra key ``panda_wms`` holding the site
config dict (docs/contracts.md) and ``panda_wms_signature``, the server's signature of it, which
the pilot checks (``pilot.signature.Trust``) before acting on it. It becomes the same
``SiteConfig`` the server loaded, with the
defaults of missing optional keys, so an older or smaller site config still gives a working pilot;
a value of the wrong type is a PilotError naming the key, never a stray TypeError.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from panda_core.canonical import QUEUEDATA_SIGNATURE_KEY
from panda_core.siteconfig import SiteConfig, SiteConfigError

from .errors import ErrorCode, PilotError


def queuedata_site_config(queuedata: dict[str, Any], site_name: str) -> tuple[dict, Any]:
    """The site config dict in a queuedata dict (pilot 3 shape, our site config under
    ``panda_wms``; PanDA's files may hold ``{site: queuedata}``) and the signature beside it
    (None when there is none)."""
    if not isinstance(queuedata, dict):
        raise PilotError(ErrorCode.GENERAL, "queuedata is not a JSON object")
    holder = queuedata
    if not isinstance(holder.get("panda_wms"), dict) and isinstance(queuedata.get(site_name),
                                                                     dict):
        holder = queuedata[site_name]
    cfg = holder.get("panda_wms")
    if not isinstance(cfg, dict):
        raise PilotError(ErrorCode.GENERAL,
                         f"queuedata for {site_name} has no 'panda_wms' site config")
    return cfg, holder.get(QUEUEDATA_SIGNATURE_KEY)


def site_from_queuedata(queuedata: dict[str, Any], site_name: str) -> SiteConfig:
    """The SiteConfig in a queuedata dict (see ``queuedata_site_config``)."""
    cfg, _ = queuedata_site_config(queuedata, site_name)
    try:
        return SiteConfig.from_dict({"name": site_name, **cfg})
    except SiteConfigError as exc:
        raise PilotError(ErrorCode.GENERAL, f"queuedata for {site_name}: site config {exc}"
                         ) from None


def load_queuedata_file(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PilotError(ErrorCode.GENERAL, f"cannot read queuedata {path}: {exc}") from None
