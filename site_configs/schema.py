"""The JSON schema of a site config, and the checks a schema cannot express.

jsonschema checks shapes (every key known, every type right); the plugin checks look the scheduler
backend and the copytools up in the installed entry points, so a typo fails at ``panda sites
check`` rather than when the factory or the pilot first needs the plugin.
"""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

import jsonschema

from .errors import ConfigError
from panda_core import PILOT_VERSION_PATTERN
from panda_core.siteconfig import SITE_STATUSES

NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"


def _obj(properties: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": properties, "required": required,
            "additionalProperties": False}


def _int(minimum: int = 0, why: str = "") -> dict:
    """An integer of at least ``minimum``; ``why``, if given, ends the error of a smaller one."""
    return {"type": "integer", "minimum": minimum, **({"description": why} if why else {})}


_ENDPOINT = _obj({"name": {"type": "string", "pattern": NAME_PATTERN},
                  "url": {"type": "string", "minLength": 1}}, ["name", "url"])
_COPYTOOL = _obj({"name": {"type": "string", "minLength": 1},
                  "options": {"type": "object"}}, ["name"])


def _text(pattern: str, why: str) -> dict:
    """A string matching ``pattern``; ``why`` is the error message's reason."""
    return {"type": "string", "pattern": pattern, "description": why}


_TRUST = _obj({
    # empty strings are the defaults SiteConfig.to_dict() fills in: "not set"
    "server_key_fingerprint": _text(r"^((sha256|SHA256):[0-9a-fA-F:]{64,95})?$", "expected "
                                    "sha256:<64 hex digits> (panda token public-key --fingerprint)"),
    "server_public_key": {"type": "string"},
    "ca_bundle": {"type": "string"},
    "ca_dir": {"type": "string"},
    "copytool_programs": {"type": "array", "items": _text("^/", "expected an absolute path")},
    "payload_env": {"type": "array", "items": _text(r"^[A-Za-z_][A-Za-z0-9_]*\*?$", "expected a "
                                                    "variable name, or a prefix ending in *")},
}, [])

_SANDBOX = _obj({
    "runtime": {"type": "string", "minLength": 1},        # a panda.sandboxes entry point
    "network": {"type": "boolean"},
    # apptainer's --bind and pilot 3's container_options (a shell word) separate paths with
    # ',' and ':'; quotes, '$', '\\' and spaces would change what pilot 3 runs
    "bind": {"type": "array", "items": _text(r"^/[^,:\s\"'$`\\]*$", "expected an absolute "
                                                 "path without ',', ':', spaces, quotes, '$' or "
                                                 "'\\'")},
    "image": {"type": "string"},
}, [])

SCHEMA: dict[str, Any] = _obj({
    "name": {"type": "string", "pattern": NAME_PATTERN, "maxLength": 128},
    "region": {"type": "string"},
    "status": {"type": "string", "enum": list(SITE_STATUSES)},
    "resources": _obj({"cores": _int(1), "memory_mb": _int(1), "max_walltime_s": _int(1),
                       "max_disk_mb": _int(1)}, ["cores", "memory_mb", "max_walltime_s"]),
    "scheduler": _obj({"backend": {"type": "string", "minLength": 1},
                       "options": {"type": "object"}}, ["backend"]),
    # the site's job slots, which the brokerage weighs it by (docs/server.md, "Brokerage")
    "pilots": _obj({"max_queued": _int(0),
                    "max_running": _int(1, "the jobs the site runs at once (a site that must "
                                        "take no work: status offline or brokeroff)"),
                    "rate_per_minute": _int(0),
                    "walltime_s": _int(60), "timefloor": _int(0),
                    "version": {"type": "string",
                                "pattern": f"^({PILOT_VERSION_PATTERN})?$"}},
                   ["max_queued", "max_running"]),
    "storage": _obj({"input": _ENDPOINT, "output": _ENDPOINT}, ["input", "output"]),
    "copytools": _obj({"input": _COPYTOOL, "output": _COPYTOOL}, ["input", "output"]),
    "direct_read": {"type": "boolean"},
    "transfer": _obj({"timeout_s": _int(1), "retries": _int(0)}, []),
    "limits": _obj({"looping_s": _int(1), "min_free_disk_mb": _int(0), "max_workdir_mb": _int(1),
                    "heartbeat_s": _int(1), "stdout_silent_s": _int(0)}, []),
    "trust": _TRUST,
    "sandbox": _SANDBOX,
}, ["name", "status", "resources", "scheduler", "pilots", "storage", "copytools"])

_JSON_TYPES = {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer",
               float: "number", type(None): "null"}


def _type_name(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _path(parts) -> str:
    return ".".join(str(p) for p in parts)


def _errors_of(err: jsonschema.ValidationError, file: str) -> list[ConfigError]:
    """Turn one jsonschema error into errors whose key path points at the offending key."""
    path = list(err.absolute_path)
    if err.validator == "required":
        missing = [k for k in err.validator_value if k not in err.instance]
        return [ConfigError(file, _path(path + [k]), "missing required key") for k in missing]
    if err.validator == "additionalProperties":
        known = set(err.schema.get("properties", {}))
        extra = sorted(str(k) for k in err.instance if k not in known)
        return [ConfigError(file, _path(path + [k]),
                            f"unknown key (known keys: {', '.join(sorted(known))})") for k in extra]
    if err.validator == "type":
        want = {"object": "mapping", "integer": "integer", "string": "string",
                "boolean": "boolean (true/false)"}.get(err.validator_value, err.validator_value)
        return [ConfigError(file, _path(path),
                            f"wrong type: expected {want}, got {_type_name(err.instance)} "
                            f"{err.instance!r}")]
    if err.validator == "enum":
        return [ConfigError(file, _path(path), f"unknown value {err.instance!r}: must be one of "
                            f"{', '.join(map(str, err.validator_value))}")]
    if err.validator == "pattern":
        why = err.schema.get("description") or "only letters, digits and _.- are allowed"
        return [ConfigError(file, _path(path), f"bad value {err.instance!r}: {why}")]
    if err.validator == "minimum":
        why = err.schema.get("description")
        return [ConfigError(file, _path(path), f"value {err.instance!r} is below the minimum "
                            f"{err.validator_value}" + (f": {why}" if why else ""))]
    return [ConfigError(file, _path(path), err.message)]


def plugin_names(group: str) -> list[str]:
    """Names registered in an entry-point group (without importing the plugins)."""
    return sorted({ep.name for ep in entry_points(group=group)})


def validate(data: Any, file: str) -> list[ConfigError]:
    """Every problem of one site config dict (already ``${VAR}``-expanded), sorted by key path."""
    if not isinstance(data, dict):
        return [ConfigError(file, "", f"a site config must be a mapping, got {_type_name(data)}")]
    validator = jsonschema.Draft202012Validator(SCHEMA)
    errors: list[ConfigError] = []
    for err in validator.iter_errors(data):
        errors.extend(_errors_of(err, file))
    errors.extend(_plugin_errors(data, file))
    errors.extend(_timefloor_errors(data, file))
    unique = {(e.key_path, e.reason): e for e in errors}      # one error per key and reason
    return sorted(unique.values(), key=lambda e: e.key_path)


def _plugin_errors(data: dict, file: str) -> list[ConfigError]:
    errors = []
    sched = data.get("scheduler")
    if isinstance(sched, dict) and isinstance(sched.get("backend"), str) and sched["backend"]:
        known = plugin_names("panda.schedulers")
        if sched["backend"] not in known:
            errors.append(ConfigError(file, "scheduler.backend",
                                      f"unknown scheduler backend {sched['backend']!r} "
                                      f"(installed: {', '.join(known) or 'none'})"))
    sandbox = data.get("sandbox")
    if isinstance(sandbox, dict) and isinstance(sandbox.get("runtime"), str) \
            and sandbox["runtime"]:
        known = sorted({"none", *plugin_names("panda.sandboxes")})   # none: built in
        if sandbox["runtime"] not in known:
            errors.append(ConfigError(file, "sandbox.runtime",
                                      f"unknown sandbox runtime {sandbox['runtime']!r} "
                                      f"(installed: {', '.join(known) or 'none'})"))
    tools = data.get("copytools")
    if isinstance(tools, dict):
        known = plugin_names("panda.copytools")
        for direction in ("input", "output"):
            ref = tools.get(direction)
            if isinstance(ref, dict) and isinstance(ref.get("name"), str) and ref["name"]:
                if ref["name"] not in known:
                    errors.append(ConfigError(file, f"copytools.{direction}.name",
                                              f"unknown copytool {ref['name']!r} "
                                              f"(installed: {', '.join(known) or 'none'})"))
    return errors


def _timefloor_errors(data: dict, file: str) -> list[ConfigError]:
    """A pilot that may take new jobs until its batch wall time is over is killed by the batch
    system in the middle of its last job: ``timefloor`` must end before ``walltime_s`` does."""
    pilots = data.get("pilots")
    if not isinstance(pilots, dict):
        return []
    floor, walltime = pilots.get("timefloor", 0), pilots.get("walltime_s", 3600)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (floor, walltime)):
        return []                                   # the schema reports the wrong types
    if floor and floor * 60 >= walltime:
        return [ConfigError(file, "pilots.timefloor",
                            f"{floor} minutes is not shorter than the pilot's wall time "
                            f"(pilots.walltime_s: {walltime} s): its last job would be killed")]
    return []
