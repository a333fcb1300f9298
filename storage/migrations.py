"""Schema migrations: Alembic, configured in code (no ``alembic.ini``).

Migrations are the only way the schema is made (``nnunet-node db upgrade``, and the server at
start).
The scripts live in the repository's ``alembic/`` folder, which the distribution ships as
``nnunet_node/alembic`` and :mod:`importlib.resources` finds, installed or not.
"""

from __future__ import annotations

import logging
from importlib.resources import as_file, files
from pathlib import Path

from alembic import command
from alembic.config import Config

LOGGER = logging.getLogger(__name__)


def script_location() -> Path:
    """The folder of the migration scripts inside the installed ``nnunet_node`` package.

    Raises ``FileNotFoundError`` when the distribution was built without them.
    """
    resource = files("nnunet_node") / "alembic"
    # A wheel or an editable install gives a real folder; a zipped install is not supported
    # (Alembic needs a directory), so as_file's temporary copy would vanish: refuse it.
    with as_file(resource) as path:
        location = Path(path)
    if not (location / "env.py").is_file():
        raise FileNotFoundError(f"alembic scripts not found at {location}")
    return location


def alembic_config(url: str) -> Config:
    """An Alembic configuration for ``url`` with the package's migration scripts."""
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    # ConfigParser interpolation: a literal % in a URL (escaped passwords) must be doubled.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    # Keep the host application's logging set-up (Alembic's fileConfig is never called).
    config.attributes["configure_logger"] = False
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision`` (default: the newest)."""
    LOGGER.info("migrating %s up to %s", _safe(url), revision)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``base`` drops everything)."""
    LOGGER.info("migrating %s down to %s", _safe(url), revision)
    command.downgrade(alembic_config(url), revision)


def current(url: str) -> str | None:
    """The revision the database at ``url`` is at (None before the first migration)."""
    from alembic.runtime.migration import MigrationContext

    from nnunet_node.storage.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head() -> str | None:
    """The newest revision among the package's migration scripts."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
