"""The node's application entity: a non-blocking pynetdicom server with the node's handlers.

- AE title, address and port from the settings (port 0 picks a free one: :attr:`DicomNode.port`);
  the address is loopback unless ``NNUNET_NODE_DICOM_HOST`` says otherwise.
- With ``NNUNET_NODE_DICOM_TLS_PORT``, a second server on that port speaks TLS (PS3.15 B.1) with
  the node's certificate (core/tls.py), checking client certificates against
  ``NNUNET_NODE_TLS_CA`` when it is set. Both ports serve the same AE and handlers.
- Access control (node/access.py): declared peers, ``NNUNET_NODE_DICOM_ACCESS``, checked when
  an association is requested; the start-up log says how open the node is.
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

import contextlib
import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.transport import ThreadedAssociationServer

from nnunet_node.core import metrics
from nnunet_node.core.errors import ConfigError
from nnunet_node.core.settings import Settings
from nnunet_node.core.tls import client_context, server_context
from nnunet_node.node.access import AccessPolicy, effective_mode
from nnunet_node.node.contexts import add_supported_contexts
from nnunet_node.node.handlers import NodeHandlers
from nnunet_node.node.transport import ServerAE
from nnunet_node.pipeline.pynetdicom_internals import after_run
from nnunet_node.pipeline.routing import RoutingTable
from nnunet_node.storage.archive import Archive

LOGGER = logging.getLogger(__name__)

MAX_PDU = 131072
MAX_ASSOCIATIONS = 32
TLS_HANDSHAKE_TIMEOUT_S = 30.0

_NOT_TLS = "not a TLS handshake (plain DICOM sent to the TLS port?)"
TLS_REFUSALS = {
    "WRONG_VERSION_NUMBER": _NOT_TLS,
    "UNKNOWN_PROTOCOL": _NOT_TLS,
    "HTTP_REQUEST": "an HTTP request, not a TLS handshake",
    "CERTIFICATE_VERIFY_FAILED": "its certificate is not signed by a CA of NNUNET_NODE_TLS_CA",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "it sent no certificate (NNUNET_NODE_TLS_CA asks for one)",
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust the node's certificate (its CA)",
}
"""OpenSSL's reason for a failed handshake -> what the refusal's log line says (the reason too)."""


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake moved from the accepting thread
    (where one silent client would hold up every other connection) into the connection's own
    thread, bounded by :data:`TLS_HANDSHAKE_TIMEOUT_S`. A failed handshake (an untrusted or
    missing client certificate, plain DICOM on the TLS port) closes the connection and is logged
    as one WARNING line. A plain connection's association is started from the accepting thread
    (:meth:`process_request`), and there is no forced garbage collection between requests
    (:meth:`service_actions`)."""

    def service_actions(self) -> None:
        """Nothing between requests. pynetdicom's server runs a full ``gc.collect()`` every 60
        turns of its accept loop; in a process that holds torch and nnU-Net (~400k tracked
        objects) that holds the GIL for 100-300 ms, and every association waits. Python's own
        collector still frees reference cycles (finished associations included)."""

    hand_over: Callable[[socket.socket, Any, bool], bool] | None = None
    """Set on the node's process when receiver processes serve connections too
    (node/receivers.py): called with each accepted connection, its address and whether it
    came to the TLS port; True when it went to a receiver (the call closed this process's
    copy), False to serve it here."""
    connection_dropped: Callable[[], None] | None = None
    """Called for a connection that ends without ever becoming an association (a failed TLS
    handshake, an error while making it), so that the balancing counts stay right."""

    def process_request(self, request: Any, client_address: Any) -> None:
        """A connection goes to a receiver process when :attr:`hand_over` sends it there;
        otherwise a plain TCP connection's association is made and started here, in the
        accepting thread (about 0.5 ms), rather than in a thread started only to start the
        association's own; a TLS connection still gets that thread, for its handshake."""
        if self.hand_over is not None and self.hand_over(
            request, client_address, self.ssl_context is not None
        ):
            return
        if self.ssl_context is not None:
            super().process_request(request, client_address)
            return
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)
            self._dropped()

    def _dropped(self) -> None:
        if self.connection_dropped is not None:
            self.connection_dropped()

    def get_request(self) -> Any:
        assert self.socket is not None
        return self.socket.accept()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is not None:
            try:
                request.settimeout(TLS_HANDSHAKE_TIMEOUT_S)
                request = self.ssl_context.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except (OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
                meaning = TLS_REFUSALS.get(str(reason))
                LOGGER.warning(
                    "TLS connection from %s refused: %s",
                    client_address[0],
                    f"{meaning} ({reason})" if meaning else reason,
                )
                with contextlib.suppress(OSError):
                    request.close()
                self._dropped()
                return
        super().process_request_thread(request, client_address)


class NodeServerAE(ServerAE):
    """The node's AE: its servers are :class:`NodeServer`, and each accepted association goes to
    the ``association_hooks`` (the access check, node/access.py) before it starts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.association_hooks: list[Callable[[Any], None]] = []
        self.association_ended: list[Callable[[], None]] = []
        """Called in an accepted association's thread when it ends, however it ends."""

    def make_server(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("server_class") in (None, ThreadedAssociationServer):
            kwargs["server_class"] = NodeServer
        return super().make_server(*args, **kwargs)

    def on_accepted(self, assoc: Any) -> None:
        if self.association_ended:
            after_run(assoc, self.notify_ended)
        for hook in self.association_hooks:
            hook(assoc)
        super().on_accepted(assoc)

    def notify_ended(self) -> None:
        """Call the :attr:`association_ended` callbacks: an association ended, or a connection
        that never became one (a failed TLS handshake, an error while making it)."""
        for callback in self.association_ended:
            callback()


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
        tls_port: int | None = None,
        max_pdu: int = MAX_PDU,
        event_driven: bool = True,
        listening: bool = True,
    ) -> None:
        """``listening=False`` (a receiver process, node/receivers.py): no port is listened on;
        the node's process hands connections over and :meth:`serve_connection` serves them."""
        self.settings = settings
        self.host = host if host is not None else settings.dicom_host
        self._requested_port = port if port is not None else settings.dicom_port
        self._requested_tls_port = tls_port if tls_port is not None else settings.dicom_tls_port
        self.handlers = NodeHandlers(
            archive, routing, max_pdu=max_pdu, tls_client=self._tls_client(settings, routing)
        )
        self.access = AccessPolicy(
            effective_mode(settings.dicom_access, self.host),
            list(routing.peers),
            check_host=settings.dicom_check_host,
        )
        metrics.declare_calling_aes(peer.ae_title for peer in routing.peers)
        self.ae = NodeServerAE(ae_title=settings.ae_title, event_driven=event_driven)
        self.listening = listening
        self.ae.store_sink = self.access.guard_store_sink(self.handlers.open_store_sink)
        self.ae.request_screen = self.handlers.screen_request
        self.ae.find_service = self.handlers.find_encoded
        self.ae.association_hooks.append(self.access.guard_association)
        self.ae.maximum_pdu_size = max_pdu
        self.ae.maximum_associations = MAX_ASSOCIATIONS
        self.ae.require_calling_aet = list(settings.allowed_calling_aes)
        self.ae.require_called_aet = False
        add_supported_contexts(self.ae)
        self._server: NodeServer | None = None
        self._tls_server: NodeServer | None = None
        self._started = False

    @staticmethod
    def _tls_client(settings: Settings, routing: RoutingTable) -> ssl.SSLContext | None:
        """The context of C-MOVE sub-associations to TLS peers (None when no peer uses TLS)."""
        if not any(peer.tls for peer in routing.peers):
            return None
        return client_context(settings.tls_cert, settings.tls_key, settings.tls_ca)

    @property
    def port(self) -> int:
        """The port the server listens on (the chosen one when the settings said 0)."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The TLS port (the chosen one when the settings said 0); None without one."""
        if self._tls_server is None:
            return self._requested_tls_port
        return int(self._tls_server.server_address[1])

    @property
    def running(self) -> bool:
        """Whether the node accepts new connections (started, and not yet stopping)."""
        return self._server is not None

    def _bindings(self) -> list[Any]:
        """The handlers' bindings, C-STORE behind the access policy's per-message check."""
        return [
            (event, self.access.guard_store(handler) if event is evt.EVT_C_STORE else handler)
            for event, handler in self.handlers.bindings()
        ]

    def _listen(self, port: int, variable: str, context: ssl.SSLContext | None) -> NodeServer:
        if not self.listening:
            # A server that never accepts: made on a loopback port that is closed at once; it
            # only serves the connections handed over (serve_connection).
            server = self.ae.make_server(
                ("127.0.0.1", 0), evt_handlers=self._bindings(), ssl_context=context
            )
            server.server_close()
            server.connection_dropped = self.ae.notify_ended
            return server
        try:
            server = self.ae.start_server(
                (self.host, port), block=False, evt_handlers=self._bindings(), ssl_context=context
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"port {port} on {self.host} is already in use: set {variable} to a free port"
                ) from exc
            raise ConfigError(
                f"cannot listen on {self.host}:{port} ({variable}, NNUNET_NODE_DICOM_HOST): "
                f"{exc.strerror or exc}"
            ) from exc
        assert isinstance(server, NodeServer)  # block=False returns the server
        server.connection_dropped = self.ae.notify_ended
        return server

    def start(self) -> None:
        """Listen on the plain port, and on the TLS port when one is set. Raises
        :class:`ConfigError` naming the setting when a port is taken or the TLS files are bad."""
        if self._started:
            return
        tls_context = None
        if self._requested_tls_port is not None:
            settings = self.settings
            if settings.tls_cert is None or settings.tls_key is None:
                raise ConfigError(
                    "NNUNET_NODE_DICOM_TLS_PORT needs NNUNET_NODE_TLS_CERT and NNUNET_NODE_TLS_KEY"
                )
            tls_context = server_context(settings.tls_cert, settings.tls_key, settings.tls_ca)
        self._server = self._listen(self._requested_port, "NNUNET_NODE_DICOM_PORT", None)
        self._started = True
        if tls_context is not None and self._requested_tls_port is not None:
            try:
                self._tls_server = self._listen(
                    self._requested_tls_port, "NNUNET_NODE_DICOM_TLS_PORT", tls_context
                )
            except ConfigError:
                self.stop()
                raise
        tls = (
            f", TLS on port {self.tls_port}"
            + (" (client certificates checked)" if self.settings.tls_ca else "")
            if self._tls_server is not None
            else ""
        )
        if not self.listening:
            return
        LOGGER.info(
            "DICOM node %s listening on %s:%d%s; %s%s",
            self.settings.ae_title,
            self.host,
            self.port,
            tls,
            self.access.describe(),
            f"; calling AEs allowed: {', '.join(self.settings.allowed_calling_aes)}"
            if self.settings.allowed_calling_aes
            else "",
        )

    def stop_accepting(self) -> None:
        """Accept no new connection from now on: the listening sockets are closed, so that a
        new connection is refused (the peer's ``connect`` fails with ECONNREFUSED, which a
        sender retries later, as for any node that is down); a receiver process's node
        (``listening=False``) serves no further connection handed over. The associations open
        go on. Returns once the accepting threads have ended (up to their 0.5 s poll)."""
        server, self._server = self._server, None
        tls_server, self._tls_server = self._tls_server, None
        if self.listening:  # the others never served (their sockets are closed)
            for listener in (server, tls_server):
                if listener is not None:
                    listener.shutdown()

    def open_associations(self) -> int:
        """How many associations peers requested are open (the node's own requests for C-MOVE
        sub-operations, inside one of them, not counted)."""
        return sum(1 for assoc in self.ae.active_associations if assoc.is_acceptor)

    def wait_for_associations(self, grace_s: float, abort: Callable[[], bool] | None = None) -> int:
        """Wait until no association peers requested is open, for at most ``grace_s`` seconds
        or until ``abort()`` says True (looked at every 50 ms: it may read a flag a signal
        handler sets, which must take no lock); the number still open."""
        deadline = time.monotonic() + grace_s
        while (still_open := self.open_associations()) and (
            left := deadline - time.monotonic()
        ) > 0:
            if abort is not None and abort():
                break
            time.sleep(min(0.05, left))
        return still_open

    def stop(self, grace_s: float = 0.0, abort: Callable[[], bool] | None = None) -> int:
        """Stop accepting (:meth:`stop_accepting`), let the associations open end by
        themselves for up to ``grace_s`` seconds (0, the default: not at all) or until
        ``abort()`` says True, then abort those still open (A-ABORT, PS3.8 7.3) and shut the AE
        down. Returns how many associations peers requested were aborted. Logs nothing about
        them: the caller (node/service.py, node/receivers.py) reports the whole node's."""
        if not self._started:
            return 0
        self.stop_accepting()
        if grace_s > 0:
            self.wait_for_associations(grace_s, abort)
        aborted = self.open_associations()
        for assoc in list(self.ae.active_associations):
            assoc.abort()
        self.ae.shutdown()  # the archive is closed by whoever made it (NodeContext.close)
        self._started = False
        LOGGER.info("DICOM node %s stopped", self.settings.ae_title)
        return aborted

    def hand_over_with(self, hand_over: Callable[[socket.socket, Any, bool], bool] | None) -> None:
        """Give each connection the servers accept to ``hand_over`` first (node/receivers.py);
        None serves them all here again."""
        for server in (self._server, self._tls_server):
            if server is not None:
                server.hand_over = hand_over

    def serve_connection(self, sock: socket.socket, address: Any, *, tls: bool) -> None:
        """Serve a connection that another process accepted on the plain or the TLS port
        (node/receivers.py): as if this node's own server had accepted it. Raises
        RuntimeError when the node is not started or has no TLS port for a TLS connection."""
        server = self._tls_server if tls else self._server
        if server is None:
            raise RuntimeError("the DICOM node is not started" + (" with TLS" if tls else ""))
        server.process_request(sock, address)

    def active_associations(self) -> list[Any]:
        return list(self.ae.active_associations)
