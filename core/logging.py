"""Logging set-up shared by the server, the DIMSE node and the command line."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str = "INFO") -> None:
    """Send records of every logger to stderr, one line each, at ``level``."""
    root = logging.getLogger()
    if any(getattr(h, "_nnunet_node", False) for h in root.handlers):
        root.setLevel(level.upper())
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler._nnunet_node = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Chatty at INFO: pynetdicom (every PDU), httpx (every request of `nnunet-node demo`),
    # alembic's plugin set-up. Keep them quiet unless asked.
    for name in ("pynetdicom", "httpx", "alembic.runtime.plugins"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
