"""The node's application entity: a non-blocking pynetdicom server with the node's handlers.

- AE title, address and port from the settings (port 0 picks a free one: :attr:`DicomNode.port`).
- ``NNUNET_NODE_ALLOWED_AES``: when set, an association from any other calling AE title is
  rejected (A-ASSOCIATE-RJ: rejected-permanent, service-user, calling AE title not recognised;
  PS3.8 9.3.4). Rejecting the association, rather than answering 0x0124 per operation, keeps
  unknown peers from even echoing, querying or retrieving.
- Any called AE title is accepted, so that rules can route by ``called_ae`` (one node, several
  titles for several purposes).
- The maximum PDU the node receives is 128 KiB (FACTS: 1.5x the rate of pynetdicom's 16 KiB
  default for CT slices; larger PDUs gained nothing more); ``TCP_NODELAY`` is set on every socket.
"""

from __future__ import annotations

import logging
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from nnunet_node.core.settings import Settings
from nnunet_node.node.contexts import add_supported_contexts
from nnunet_node.node.handlers import NodeHandlers
from nnunet_node.node.transport import ServerAE
from nnunet_node.pipeline.routing import RoutingTable
from nnunet_node.storage.archive import Archive

LOGGER = logging.getLogger(__name__)

MAX_PDU = 131072
MAX_ASSOCIATIONS = 32


class DicomNode:
    """Start and stop the node's DIMSE server."""

    def __init__(
        self,
        settings: Settings,
        archive: Archive,
        routing: RoutingTable,
        *,
        host: str | None = None,
        port: int | None = None,
        max_pdu: int = MAX_PDU,
        event_driven: bool = True,
    ) -> None:
        self.settings = settings
        self.host = host if host is not None else settings.dicom_host
        self._requested_port = port if port is not None else settings.dicom_port
        self.handlers = NodeHandlers(archive, routing, max_pdu=max_pdu)
        self.ae = ServerAE(ae_title=settings.ae_title, event_driven=event_driven)
        self.ae.store_sink = self.handlers.open_store_sink
        self.ae.maximum_pdu_size = max_pdu
        self.ae.maximum_associations = MAX_ASSOCIATIONS
        self.ae.require_calling_aet = list(settings.allowed_calling_aes)
        self.ae.require_called_aet = False
        add_supported_contexts(self.ae)
        self._server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        """The port the server listens on (the chosen one when the settings said 0)."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        if self._server is not None:
            return
        self._server = self.ae.start_server(
            (self.host, self._requested_port),
            block=False,
            evt_handlers=self.handlers.bindings(),
        )
        LOGGER.info(
            "DICOM node %s listening on %s:%d%s",
            self.settings.ae_title,
            self.host,
            self.port,
            f" (calling AEs allowed: {', '.join(self.settings.allowed_calling_aes)})"
            if self.settings.allowed_calling_aes
            else "",
        )

    def stop(self) -> None:
        """Stop accepting, then end the associations still open (abort after their timeout)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        for assoc in list(self.ae.active_associations):
            assoc.abort()
        self.ae.shutdown()  # the archive is closed by whoever made it (NodeContext.close)
        LOGGER.info("DICOM node %s stopped", self.settings.ae_title)

    def active_associations(self) -> list[Any]:
        return list(self.ae.active_associations)
