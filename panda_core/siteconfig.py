"""Site config dataclasses: the typed shape of one site (docs/contracts.md, "Site config").

Written once for every part: ``site_configs`` validates a sysadmin's YAML against its JSON schema
and builds these; the server stores ``to_dict()``; the pilot rebuilds them from the queue
description the server serves. ``from_dict`` checks every value's type against the field it fills
(the pilot reads it from the network, without the schema), fills the defaults of missing optional
keys and raises ``SiteConfigError`` naming the key path, never a stray TypeError.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field
from typing import Any

SITE_STATUSES = ("online", "offline", "test", "brokeroff")

#: seconds a pilot keeps before its wall time ends, for stage-out and the final report (the
#: pilot's ``--reserve``); it asks for jobs that fit its wall time minus this
PILOT_RESERVE_S = 60
#: the wall time of a job whose task does not say: it fits the default pilot
#: (``PilotLimits.walltime_s``, 3600 s) after the reserve and the pilot's start, with room left
DEFAULT_JOB_WALLTIME_S = 3000


class SiteConfigError(ValueError):
    """A value of the wrong type or a missing key; the message starts with the key path."""


@dataclass
class Resources:
    cores: int = 0                # 0: not said (the pilot uses the node's)
    memory_mb: int = 0            # 0: no limit
    max_walltime_s: int = 0       # 0: no limit
    max_disk_mb: int = 20000


@dataclass
class SchedulerConfig:
    backend: str = "local"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PilotLimits:
    max_queued: int = 0
    max_running: int = 0
    rate_per_minute: int = 60
    walltime_s: int = 3600
    timefloor: int = 0            # minutes: a pilot asks for another job while it has run less
                                  # (PanDA's queue-description field); 0: one job per pilot
    version: str = ""             # the one-file pilot version to run ("": the server's default)


@dataclass
class Endpoint:
    """A storage element: its name (ddmEndPoint) and root URL."""
    name: str = ""
    url: str = ""


@dataclass
class StorageConfig:
    input: Endpoint = field(default_factory=Endpoint)
    output: Endpoint = field(default_factory=Endpoint)


@dataclass
class CopytoolRef:
    name: str = "cp"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class CopytoolsConfig:
    input: CopytoolRef = field(default_factory=CopytoolRef)
    output: CopytoolRef = field(default_factory=CopytoolRef)


@dataclass
class TransferConfig:
    timeout_s: int = 600
    retries: int = 2


@dataclass
class Limits:
    looping_s: int = 7200
    min_free_disk_mb: int = 500
    max_workdir_mb: int = 20000
    heartbeat_s: int = 1800
    stdout_silent_s: int = 0      # payload silent on stdout this long -> killed (1502); 0: off


@dataclass
class TrustConfig:
    """What the factory hands every pilot it starts (docs/security.md): the pinned server key,
    the CA bundle for https, the programs a copytool option may name and the variables the
    payload gets beyond the default ones. The factory reads these from the sysadmin's file; a
    pilot never takes them from the queue description."""
    server_key_fingerprint: str = ""     # sha256:<hex> of the server's job-signing key
    server_public_key: str = ""          # or the key itself: a PEM file on the factory's host
    ca_bundle: str = ""                  # CA bundle (file) on the worker nodes, for https
    ca_dir: str = ""                     # or a folder of hashed CA certificates
    copytool_programs: list[str] = field(default_factory=list)  # absolute paths
    payload_env: list[str] = field(default_factory=list)        # names, fnmatch patterns


@dataclass
class SandboxConfig:
    """How the pilot isolates payloads (docs/site-configs.md, "sandbox"): ``runtime`` names a
    ``panda.sandboxes`` plugin (``none``, ``bwrap``, ``apptainer``); ``network`` false cuts the
    payload off the network; ``bind`` lists host paths (``/cvmfs``) the payload sees read-only
    besides the system; ``image`` is apptainer's image for jobs that name no ``container_name``."""
    runtime: str = "none"
    network: bool = True
    bind: list[str] = field(default_factory=list)
    image: str = ""


@dataclass(kw_only=True)
class SiteConfig:
    """One site (= PanDA queue). ``source`` is the file it came from and is not part of to_dict()."""
    name: str
    region: str = ""
    status: str = "online"
    resources: Resources = field(default_factory=Resources)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    pilots: PilotLimits = field(default_factory=PilotLimits)
    storage: StorageConfig = field(default_factory=StorageConfig)
    copytools: CopytoolsConfig = field(default_factory=CopytoolsConfig)
    direct_read: bool = False
    transfer: TransferConfig = field(default_factory=TransferConfig)
    limits: Limits = field(default_factory=Limits)
    trust: TrustConfig = field(default_factory=TrustConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    source: str | None = field(default=None, compare=False)

    @property
    def online(self) -> bool:
        return self.status == "online"

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able dict the server stores and ``panda sites sync`` posts."""
        data = asdict(self)
        data.pop("source", None)
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> "SiteConfig":
        """Build from a dict (validated by ``site_configs`` or read from the queue description);
        SiteConfigError names the first key whose value does not fit."""
        config = _build(cls, data, "", skip=("source",))
        config.source = source
        return config


_HINTS: dict[type, dict[str, Any]] = {}


def _build(cls: type, data: Any, path: str, skip: tuple[str, ...] = ()) -> Any:
    if not isinstance(data, dict):
        raise SiteConfigError(f"{path or '(site)'}: expected a mapping, got {type(data).__name__}")
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    prefix = f"{path}." if path else ""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name not in data:
            if (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                    and f.name not in skip):
                raise SiteConfigError(f"{prefix}{f.name}: missing")
            continue
        kwargs[f.name] = _value(hints[f.name], data[f.name], prefix + f.name)
    return cls(**kwargs)


def _value(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise SiteConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise SiteConfigError(f"{path}: expected a number, got {value!r}")
        return int(value) if float(value).is_integer() else value
    if hint is str:
        if not isinstance(value, str):
            raise SiteConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if typing.get_origin(hint) is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SiteConfigError(f"{path}: expected a list of strings, got {value!r}")
        return list(value)
    if typing.get_origin(hint) is dict:
        if not isinstance(value, dict):
            raise SiteConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    return value
