"""Read site config files: YAML -> ``${VAR}`` expansion -> schema -> SiteConfig.

A broken file never stops the others (``load_dir``): sysadmins edit these files by hand, and one
typo at one site must not take every other site off the server.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError
from panda_core.siteconfig import SiteConfig
from .schema import validate
from .yamlsafe import load as load_yaml

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 1 << 20          # a site config is a few hundred bytes; refuse anything absurd
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
SUFFIXES = (".yaml", ".yml")


def expand(value: Any, file: str, env: Mapping[str, str] | None = None,
           path: str = "") -> tuple[Any, list[ConfigError]]:
    """Expand ``${VAR}`` / ``${VAR:-default}`` in every string of ``value``.

    A string that is exactly one ``${...}`` is re-read as a YAML scalar after expansion, so
    ``max_queued: ${MAXQ:-4}`` gives the integer 4. An unset variable without default is an error.
    """
    env = os.environ if env is None else env
    errors: list[ConfigError] = []
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out[k], errs = expand(v, file, env, f"{path}.{k}" if path else str(k))
            errors.extend(errs)
        return out, errors
    if isinstance(value, list):
        items = []
        for i, v in enumerate(value):
            item, errs = expand(v, file, env, f"{path}.{i}" if path else str(i))
            items.append(item)
            errors.extend(errs)
        return items, errors
    if not isinstance(value, str) or "${" not in value:
        return value, errors

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in env and (env[name] != "" or default is None):
            return env[name]
        if default is not None:
            return default
        errors.append(ConfigError(file, path, f"environment variable {name} is not set "
                                  f"(write ${{{name}:-default}} to give a default)"))
        return ""

    result = _VAR.sub(sub, value)
    if _VAR.fullmatch(value) and not errors:
        try:
            scalar = yaml.safe_load(result) if result.strip() else result
        except yaml.YAMLError:
            scalar = result
        if isinstance(scalar, (int, float, bool)):
            return scalar, errors
    return result, errors


def outside_folder(path: Path) -> bool:
    """A symlink (or a path through one) that leads out of the file's own folder: such a file
    is refused unread, so its content (say /etc/shadow) never reaches an error message."""
    folder = path.absolute().parent
    try:
        return not path.resolve(strict=True).is_relative_to(folder.resolve(strict=True))
    except (OSError, RuntimeError):       # dangling, or a symlink loop
        return True


def read_yaml(path: Path) -> tuple[Any, list[ConfigError]]:
    """Parse one file, turning every way it can be unreadable into a ConfigError."""
    file = str(path)
    if path.is_symlink() and outside_folder(path):
        return None, [ConfigError(file, "", "a symlink that leads out of its folder: refused "
                                  "unread (copy the file into the folder instead)")]
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            return None, [ConfigError(file, "", f"file too large ({size} bytes, at most "
                                      f"{MAX_FILE_BYTES})")]
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, [ConfigError(file, "", f"not UTF-8 text: {exc.reason} at byte {exc.start}")]
    except OSError as exc:
        return None, [ConfigError(file, "", f"cannot read: {exc.strerror or exc}")]
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        return None, [ConfigError(file, "", f"not valid YAML{where}: {problem}")]
    if data is None:
        return None, [ConfigError(file, "", "empty file")]
    return data, []


def check_dict(data: Any, file: str = "<dict>",
               env: Mapping[str, str] | None = None) -> tuple[SiteConfig | None, list[ConfigError]]:
    """Expand and validate one config dict; return the SiteConfig or every error found."""
    if isinstance(data, dict):
        data, errors = expand(data, file, env)
    else:
        errors = []
    errors += validate(data, file)
    if errors:
        return None, errors
    return SiteConfig.from_dict(data, source=file), []


def parse_site_config(data: Any, file: str = "<dict>",
                      env: Mapping[str, str] | None = None) -> SiteConfig:
    """Like ``load_site_config`` for a dict (e.g. one the server received); raises ConfigError."""
    config, errors = check_dict(data, file, env)
    if errors:
        raise _first(errors)
    return config


def validate_dict(data: Any, source: str = "<dict>") -> dict:
    """Check a posted config dict (no ``${VAR}`` expansion: the server's environment is not the
    sysadmin's) and return its normalised ``to_dict()`` with every default filled in."""
    errors = validate(data, source)
    if errors:
        raise _first(errors)
    return SiteConfig.from_dict(data, source=source).to_dict()


def check_file(path: str | os.PathLike,
               env: Mapping[str, str] | None = None) -> tuple[SiteConfig | None, list[ConfigError]]:
    """Load one file; return the SiteConfig or every error found in it."""
    path = Path(path)
    data, errors = read_yaml(path)
    if errors:
        return None, errors
    return check_dict(data, str(path), env)


def _first(errors: list[ConfigError]) -> ConfigError:
    err = errors[0]
    err.errors = errors            # every error of the file, for callers that want them all
    return err


def load_site_config(path: str | os.PathLike, env: Mapping[str, str] | None = None) -> SiteConfig:
    """Load one site config file; raise ConfigError (its ``.errors`` lists every problem)."""
    config, errors = check_file(path, env)
    if errors:
        raise _first(errors)
    return config


def config_files(directory: Path) -> list[Path]:
    """The site config files of a directory (not recursive; hidden files skipped), sorted."""
    return sorted(p for p in directory.iterdir()
                  if p.suffix in SUFFIXES and not p.name.startswith(".") and p.is_file())


def load_dir(directory: str | os.PathLike, env: Mapping[str, str] | None = None
             ) -> tuple[list[SiteConfig], list[ConfigError]]:
    """Load every ``*.yaml``/``*.yml`` of a directory: the good ones, and the errors of the others.

    Duplicate site names are an error of the later file (in sorted order); the first one stays.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return [], [ConfigError(str(directory), "", "not a directory")]
    configs: list[SiteConfig] = []
    errors: list[ConfigError] = []
    seen: dict[str, str] = {}
    for path in config_files(directory):
        config, errs = check_file(path, env)
        if errs:
            errors.extend(errs)
            continue
        if config.name in seen:
            errors.append(ConfigError(str(path), "name", f"duplicate site name {config.name!r} "
                                      f"(already defined in {seen[config.name]})"))
            continue
        seen[config.name] = str(path)
        configs.append(config)
    for err in errors:
        log.info("site config error: %s", err)
    return configs, errors
