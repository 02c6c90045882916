"""The web monitor shifters run the grid from: views, plots, alarms, incidents and history.

BigPanDA's conventions (docs/monitor.md): every view lives under ``/monitor/``, takes its
selection from the query string (BigPanDA's parameter names and value syntax) and answers
``?json`` with the same data. One module per responsibility: ``params`` and ``selection`` read
the URL into SQL; ``jobsview``, ``errorsview``, ``dash``, ``tasksview``, ``sitesview``,
``usersview``, ``jobpage``, ``logfiles``, ``plotsview`` aggregate in SQL; ``plots`` draws SVG;
``alarms``, ``notify``, ``operations``, ``analyzer``, ``history`` and ``incidents`` are the
operations side; ``views`` holds the thin Tornado handlers and ``api`` the alarm API methods.
"""
from __future__ import annotations

from .views import routes

__all__ = ["routes"]
