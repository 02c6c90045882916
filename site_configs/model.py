"""Site config dataclasses: the typed shape of one site (docs/contracts.md, "Site config").

Values arrive here already checked by the schema, so constructors only convert; defaults mirror
the schema's optional keys so that ``to_dict()`` always carries every key.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SITE_STATUSES = ("online", "offline", "test", "brokeroff")


@dataclass
class Resources:
    cores: int
    memory_mb: int
    max_walltime_s: int
    max_disk_mb: int = 20000


@dataclass
class SchedulerConfig:
    backend: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PilotLimits:
    max_queued: int
    max_running: int
    rate_per_minute: int = 60
    walltime_s: int = 3600


@dataclass
class Endpoint:
    """A storage element: its name (ddmEndPoint) and root URL."""
    name: str
    url: str


@dataclass
class StorageConfig:
    input: Endpoint
    output: Endpoint


@dataclass
class CopytoolRef:
    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class CopytoolsConfig:
    input: CopytoolRef
    output: CopytoolRef


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


@dataclass(kw_only=True)
class SiteConfig:
    """One site (= PanDA queue). ``source`` is the file it came from and is not part of to_dict()."""
    name: str
    region: str = ""
    status: str
    resources: Resources
    scheduler: SchedulerConfig
    pilots: PilotLimits
    storage: StorageConfig
    copytools: CopytoolsConfig
    direct_read: bool = False
    transfer: TransferConfig = field(default_factory=TransferConfig)
    limits: Limits = field(default_factory=Limits)
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
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> "SiteConfig":
        """Build from an already validated dict (use ``site_configs.parse_site_config`` to check)."""
        return cls(
            name=data["name"],
            status=data["status"],
            region=data.get("region", ""),
            resources=Resources(**data["resources"]),
            scheduler=SchedulerConfig(**data["scheduler"]),
            pilots=PilotLimits(**data["pilots"]),
            storage=StorageConfig(input=Endpoint(**data["storage"]["input"]),
                                  output=Endpoint(**data["storage"]["output"])),
            copytools=CopytoolsConfig(input=CopytoolRef(**data["copytools"]["input"]),
                                      output=CopytoolRef(**data["copytools"]["output"])),
            direct_read=bool(data.get("direct_read", False)),
            transfer=TransferConfig(**data.get("transfer", {})),
            limits=Limits(**data.get("limits", {})),
            source=source,
        )
