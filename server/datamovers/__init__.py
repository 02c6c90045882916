"""Data movers: how the data service copies a replica from one storage element to another.

One driver per protocol family in the stevedore group ``panda.datamovers`` (``local`` for
``file://``, ``http`` for HTTP/WebDAV with third-party COPY, ``xrootd`` for ``root://`` with
``xrdcp --tpc``); the data service picks, per copy, the first configured mover that handles both
ends (:meth:`DataMover.can_copy`). The contract and its failures are in :mod:`.base`.
"""
from .base import (DataMover, Deadline, DestinationExists, FileRef, SourceError, TransferFailed,
                   load_mover, load_movers, mismatch)

__all__ = ["DataMover", "Deadline", "DestinationExists", "FileRef", "SourceError",
           "TransferFailed", "load_mover", "load_movers", "mismatch"]
