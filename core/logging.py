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
    # pynetdicom logs every PDU at INFO; keep it quiet unless asked.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
