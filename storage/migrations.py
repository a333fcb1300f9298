"""Schema migrations: Alembic, configured in code (no ``alembic.ini``).

Migrations are the only way the schema is made (``nnunet-node db upgrade``, and the server at
start).
The scripts live in the repository's ``alembic/`` folder, which the distribution ships as
``nnunet_node/alembic`` and :mod:`importlib.resources` finds, installed or not.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config

from nnunet_node.core.errors import ConfigError

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
    """Migrate the database at ``url`` up to ``revision`` (default: the newest).

    Raises :class:`ConfigError` when the database cannot be reached (:func:`check_database`)."""
    check_database(url)
    LOGGER.info("migrating %s up to %s", safe_url(url), revision)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``base`` drops everything).

    Raises :class:`ConfigError` when the database cannot be reached (:func:`check_database`)."""
    check_database(url)
    LOGGER.info("migrating %s down to %s", safe_url(url), revision)
    command.downgrade(alembic_config(url), revision)


def current(url: str) -> str | None:
    """The revision the database at ``url`` is at (None before the first migration).

    Raises :class:`ConfigError` when the database cannot be reached (:func:`check_database`)."""
    from alembic.runtime.migration import MigrationContext

    with _connection(url) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def check_database(url: str) -> None:
    """Connect to the database at ``url`` once and let go.

    Raises :class:`ConfigError` in one line, naming ``NNUNET_NODE_DB_URL`` and the URL without
    its password, when the URL cannot be parsed, names an unknown dialect or a driver that is
    not installed, or the server refuses or does not answer (the driver's reason, its first
    line): what an operator sees at start instead of SQLAlchemy's traceback."""
    with _connection(url):
        pass


@contextlib.contextmanager
def _connection(url: str) -> Iterator[Any]:
    """One connection to the database at ``url``, its engine disposed of afterwards; whatever
    fails on the way is :class:`ConfigError` in one line (:func:`check_database`)."""
    engine = _connectable(url)
    try:
        with engine.connect() as conn:
            yield conn
    except ConfigError:
        raise
    except Exception as exc:
        raise _unreachable(url, exc) from exc
    finally:
        engine.dispose()


def _connectable(url: str) -> Any:
    """The engine for ``url``; :class:`ConfigError` for a URL SQLAlchemy cannot use."""
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    from nnunet_node.storage.db import make_engine

    try:
        return make_engine(url)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise ConfigError(
            f"NNUNET_NODE_DB_URL: {safe_url(url)!s} is not a database URL SQLAlchemy knows "
            f"({exc}); for PostgreSQL: postgresql+psycopg://user:password@host/database"
        ) from None
    except ImportError as exc:
        raise ConfigError(
            f"NNUNET_NODE_DB_URL: the database driver for {safe_url(url)} is not installed "
            f"({exc}); for PostgreSQL use psycopg 3 (pip install 'nnunet-node[postgresql]') "
            "and postgresql+psycopg://user:password@host/database"
        ) from None


def _unreachable(url: str, exc: BaseException) -> ConfigError:
    reason = getattr(exc, "orig", None) or exc
    text = " ".join(str(reason).split()) or type(reason).__name__
    return ConfigError(f"NNUNET_NODE_DB_URL: cannot use the database {safe_url(url)}: {text}")


def head() -> str | None:
    """The newest revision among the package's migration scripts."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def safe_url(url: str) -> str:
    """``url`` with its password shown as ``***`` (for logs and messages); a string that is no
    URL comes back as it is."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url
