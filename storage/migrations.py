"""Schema migrations: Alembic, configured in code (no ``alembic.ini``).

Migrations are the only way the schema is made (``nnunet-node db upgrade``, and the server at
start).
The scripts live in the repository's ``alembic/`` folder, found next to this package.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config

LOGGER = logging.getLogger(__name__)

SCRIPT_LOCATION = Path(__file__).resolve().parents[1] / "alembic"


def alembic_config(url: str) -> Config:
    """An Alembic configuration for ``url`` with the repository's scripts."""
    if not (SCRIPT_LOCATION / "env.py").is_file():
        raise FileNotFoundError(f"alembic scripts not found at {SCRIPT_LOCATION}")
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
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

    from storage.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
