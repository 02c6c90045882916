"""Debug mode in the pilot: the built-in views of a running job (``pilot.debug.views``) that the
server's ``debug`` command asks for (``panda_core.debugview``)."""
