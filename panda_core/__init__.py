"""panda_core: the ground every part of panda-wms imports (standard library only).

Job states, error codes, replica paths and the name check, the job wire format, the canonical JSON
that signatures cover, the site-config dataclasses and the client of the server's two protocols.
The pilot imports this package on a bare worker node, so nothing here may import a third-party
package (a test over the import graph keeps it so; see docs/architecture.md).
"""
__version__ = "0.1.0"

#: the oldest Python the pilot runs on (setup.py's python_requires): the one-file pilot's
#: manifest says it and the batch script refuses an older ``python3`` with a clear message
PYTHON_REQUIRES = (3, 10)

#: a one-file pilot version (``0.1.0-6d829af3f767``): it names a folder on the server and in
#: every node's cache, so no ``/`` and no leading dot
PILOT_VERSION_PATTERN = r"[0-9A-Za-z][0-9A-Za-z._-]{0,63}"
