"""Built-in monitor plugins; each is registered through the ``panda.pilot`` entry points."""
