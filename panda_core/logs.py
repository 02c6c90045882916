"""Logging set-up for the commands (library code only ever gets loggers)."""
from __future__ import annotations

import logging
import os


def setup_logging(level: str | None = None) -> None:
    """Configure the root logger once: ``level``, else $PANDA_LOG_LEVEL, else INFO."""
    level = (level or os.environ.get("PANDA_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    # alembic says which plugin it set up and which migration it runs at INFO: noise to an
    # operator (``panda db upgrade`` prints its own one line); shown at debug
    logging.getLogger("alembic").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
