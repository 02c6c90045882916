"""Alembic environment for panda-wms.

The server runs migrations in-process (``server.db.upgrade_schema``), handing alembic an open
connection in ``config.attributes["connection"]``; the ``alembic`` command line works too when
``sqlalchemy.url`` is set (``alembic -c server/alembic.ini -x url=... upgrade head``).
"""
from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from server.db import declared_on, metadata

config = context.config
target_metadata = metadata


def _url() -> str:
    return context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url")


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    conn = config.attributes.get("connection")
    if conn is not None:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True,
                          include_object=declared_on(conn.dialect.name))
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(_url())
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True,
                          include_object=declared_on(conn.dialect.name))
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
