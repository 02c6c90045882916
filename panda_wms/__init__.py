"""Shared vocabulary and the ``panda`` command.

Nothing here imports tornado or sqlalchemy: the pilot (a worker-node agent) imports from this
package too, and must start fast.
"""
__version__ = "0.1.0"
