"""The event service in the pilot: a job whose payload processes event ranges fetched from the
server as it goes (``session``), spoken to through a line protocol over two named pipes
(``protocol``; docs/eventranges.md). ``reference_payload.py`` is a payload (and merge) that
speaks it, with nothing but Python's standard library."""
