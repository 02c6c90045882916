"""The ``panda`` command and the demo: the top, which imports the parts and is imported by none.

The shared vocabulary lives in ``panda_core``; see docs/architecture.md.
"""
from panda_core import __version__

__all__ = ["__version__"]
