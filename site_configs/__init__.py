"""Site configs: what a sysadmin writes to describe a site, its schema and its loader.

The dataclasses live in ``panda_core.siteconfig`` (the pilot builds them too, without YAML or
jsonschema); they are re-exported here for the sysadmin's side.

The example configs ship as package data in this directory (``EXAMPLES_DIR``): ``LOCAL_DEMO.yaml``
is the demo site, ``examples/`` has one site per scheduler backend.
"""
from __future__ import annotations

from pathlib import Path

from panda_core.siteconfig import (SITE_STATUSES, CopytoolRef, CopytoolsConfig, Endpoint, Limits,
                                   PilotLimits, Resources, SchedulerConfig, SiteConfig,
                                   StorageConfig, TransferConfig)

from .errors import ConfigError
from .loader import (check_dict, check_file, expand, load_dir, load_site_config,
                     parse_site_config, validate_dict)
from .schema import SCHEMA, validate

EXAMPLES_DIR = Path(__file__).resolve().parent

__all__ = [
    "EXAMPLES_DIR", "SCHEMA", "SITE_STATUSES", "ConfigError", "CopytoolRef", "CopytoolsConfig",
    "Endpoint", "Limits", "PilotLimits", "Resources", "SchedulerConfig", "SiteConfig",
    "StorageConfig", "TransferConfig", "check_dict", "check_file", "expand", "load_dir",
    "load_site_config", "parse_site_config", "validate", "validate_dict",
]
