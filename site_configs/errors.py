"""The one error type of site configs: which file, which key, and why."""
from __future__ import annotations


class ConfigError(ValueError):
    """A site config problem, located by file and dotted key path (``""`` = the file itself)."""

    def __init__(self, file: str, key_path: str, reason: str) -> None:
        self.file = str(file)
        self.key_path = key_path
        self.reason = reason
        self.errors: list[ConfigError] = [self]   # every error of the same file, when known
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.key_path or "(file)"
        return f"{self.file}: {where}: {self.reason}"

    def to_dict(self) -> dict:
        return {"file": self.file, "key_path": self.key_path, "reason": self.reason}
