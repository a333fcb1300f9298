"""Types of the DIMSE tests' fixtures (``tests/node/conftest.py``)."""

from __future__ import annotations

from collections.abc import Callable

from nnunet_node.node.ae import DicomNode

NodeFactory = Callable[..., DicomNode]
"""``start_node(routing=None, archive_=None, **settings)``: a started :class:`DicomNode` on a free
loopback port, stopped at the end of the test."""
