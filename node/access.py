"""Who may use the DICOM node, and for what: known peers, declared once in the spec.

In the manner of Orthanc's ``DicomModalities`` and dcm4chee's AE list: every peer the node knows
is declared under ``peers:`` (pipeline/routing.py) with its AE title, host, port and what it may
do (``allow``: ``store``, ``find``, ``get``, ``move``). ``NNUNET_NODE_DICOM_ACCESS`` says what the
node does with AEs it does not know:

============  ===========================================================================
mode          an undeclared calling AE
============  ===========================================================================
``peers``     is rejected (A-ASSOCIATE-RJ, PS3.8 9.3.4: rejected-permanent, service-user,
              calling AE title not recognised)
``open-store`` may C-ECHO and C-STORE, not query or retrieve (the open store-only mode)
``open``      may do anything
``auto``      ``open`` while the node listens on a loopback address only, else ``peers``
============  ===========================================================================

A declared peer may always C-ECHO and may use what it ``allow``s. With ``check_host`` (the peer's
own, or ``NNUNET_NODE_DICOM_CHECK_HOST`` for all) a peer is recognised only when it calls from
the address its ``host`` resolves to; from elsewhere it counts as undeclared.

The check runs when the A-ASSOCIATE-RQ arrives, before presentation contexts are negotiated
(:func:`guard_association`): an AE that may do nothing is rejected; otherwise the node accepts
only the presentation contexts of the services it may use (PS3.8 9.3.3.2: the others are
answered "abstract syntax not supported"), so a C-FIND, C-GET or C-MOVE it may not make cannot
even be sent. One service needs a per-message check: a peer allowed to C-GET but not to C-STORE
still needs the storage contexts (in the SCP role, PS3.4 C.4.3) to receive its instances, so a
C-STORE request from it is answered 0x0124 Refused: Not authorised (PS3.7 C.5.x general status)
and nothing of it is written (:meth:`AccessPolicy.guard_store`).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Literal

from nnunet_node.core import metrics
from nnunet_node.node.contexts import FIND_MODELS, GET_MODELS, MOVE_MODELS, QUERY_RETRIEVE
from nnunet_node.pipeline.pynetdicom_internals import check_before_negotiation
from nnunet_node.pipeline.routing import SERVICES, Peer

LOGGER = logging.getLogger(__name__)

Mode = Literal["peers", "open-store", "open"]

NOT_AUTHORISED = 0x0124
"""PS3.7 C.5: Refused: Not authorised (a general failure status)."""

# Rejected-permanent (1), DICOM UL service-user (1), calling AE title not recognised (3).
REJECT_CALLING_AE = (0x01, 0x01, 0x03)

_VERIFICATION = "1.2.840.10008.1.1"
_QR_SERVICE = {
    **dict.fromkeys(FIND_MODELS, "find"),
    **dict.fromkeys(GET_MODELS, "get"),
    **dict.fromkeys(MOVE_MODELS, "move"),
}
_GRANT = "_nnunet_node_grant"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address to listen on) is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def effective_mode(setting: str, listen_host: str) -> Mode:
    """``NNUNET_NODE_DICOM_ACCESS`` with ``auto`` resolved against the listening address."""
    if setting == "auto":
        return "open" if is_loopback(listen_host) else "peers"
    if setting not in ("peers", "open-store", "open"):
        raise ValueError(f"unknown DICOM access mode {setting!r}")
    return setting  # type: ignore[return-value]


@dataclass(frozen=True)
class Grant:
    """What one association may do: the services (``echo`` and those of :data:`SERVICES`) and
    the peer it was recognised as (None: undeclared)."""

    services: frozenset[str]
    peer: Peer | None = None

    def allows_context(self, abstract_syntax: str) -> bool:
        """Whether a presentation context of this SOP class is offered to the association."""
        if abstract_syntax == _VERIFICATION:
            return "echo" in self.services
        service = _QR_SERVICE.get(abstract_syntax)
        if service is not None:
            return service in self.services
        if abstract_syntax in {str(uid) for uid in QUERY_RETRIEVE}:
            return False
        # Storage SOP classes: C-STORE to the node, or C-GET's sub-operations to the peer.
        return bool({"store", "get"} & self.services)


def _addresses(host: str) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError as exc:
        LOGGER.warning("peer host %r does not resolve (%s): it is never recognised", host, exc)
        return set()


class AccessPolicy:
    """Decides what a calling AE may do (module docstring). ``peers`` are the spec's."""

    def __init__(self, mode: Mode, peers: Collection[Peer], *, check_host: bool = False) -> None:
        self.mode = mode
        self.check_host = check_host
        self._peers = {peer.ae_title: peer for peer in peers}

    def grant(self, calling_ae: str, address: str) -> Grant:
        """What ``calling_ae`` calling from ``address`` may do (an empty set: reject it)."""
        peer = self._peers.get(calling_ae.strip())
        checked = peer is not None and (self.check_host or peer.check_host)
        if peer is not None and checked and address not in _addresses(peer.host):
            LOGGER.warning(
                "%s called from %s, not from its declared host %s: treated as undeclared",
                calling_ae.strip(),
                address,
                peer.host,
            )
            peer = None
        if self.mode == "open":
            return Grant(frozenset({"echo", *SERVICES}), peer)
        if peer is not None:
            return Grant(frozenset({"echo", *peer.allow}), peer)
        if self.mode == "open-store":
            return Grant(frozenset({"echo", "store"}))
        return Grant(frozenset())

    def describe(self) -> str:
        """One line for the start-up log saying how open the node is."""
        names = ", ".join(
            f"{p.ae_title} ({'/'.join(sorted(p.allow))})" for p in self._peers.values()
        )
        known = f"declared peers: {names}" if names else "no declared peers"
        if self.mode == "open":
            return f"access OPEN: any calling AE may store, query and retrieve ({known})"
        if self.mode == "open-store":
            return f"access open for C-STORE: any calling AE may store; {known} may do more"
        return f"access by declared peers only: {known}"

    # --- the hooks ----------------------------------------------------------------------
    def guard_association(self, assoc: Any) -> None:
        """Wrap an accepted connection's negotiation (pynetdicom's ACSE, acceptor side) so that
        the calling AE is checked before its presentation contexts are negotiated."""

        def check() -> bool:
            request = assoc.requestor.primitive
            calling = str(request.calling_ae_title).strip()
            address = str(assoc.requestor.address)
            grant = self.grant(calling, address)
            setattr(assoc, _GRANT, grant)
            if not grant.services:
                LOGGER.warning(
                    "association from %s at %s rejected: not a declared peer", calling, address
                )
                # (EVT_REJECTED is not triggered: its handler would log this a second time.)
                assoc.requestor.ae_title = request.calling_ae_title
                assoc.acse.send_reject(*REJECT_CALLING_AE)
                assoc.kill()
                return False
            contexts = assoc.acceptor.supported_contexts
            assoc.acceptor.supported_contexts = [
                cx for cx in contexts if grant.allows_context(str(cx.abstract_syntax))
            ]
            who = f"peer {grant.peer.name}" if grant.peer is not None else "undeclared"
            LOGGER.info(
                "association from %s at %s (%s%s): %s",
                calling,
                address,
                who,
                ", TLS" if _is_tls(assoc) else "",
                ", ".join(sorted(grant.services)),
            )
            return True

        check_before_negotiation(assoc, check)

    def guard_store_sink(self, open_sink: Callable[..., Any]) -> Callable[..., Any]:
        """The node's C-STORE sink, opened only for an association allowed to store (otherwise
        pynetdicom gathers the dataset in memory and :meth:`guard_store` refuses it)."""

        def guarded(assoc: Any, *args: Any) -> Any:
            if not self.may_store(assoc):
                return None
            return open_sink(assoc, *args)

        return guarded

    def guard_store(self, on_store: Callable[[Any], int]) -> Callable[[Any], int]:
        """The node's C-STORE handler, answering 0x0124 to an association not allowed to store."""

        def guarded(event: Any) -> int:
            if not self.may_store(event.assoc):
                requestor = event.assoc.requestor
                LOGGER.warning(
                    "C-STORE from %s at %s refused (0x0124): not allowed to store",
                    str(requestor.ae_title).strip(),
                    requestor.address,
                )
                metrics.dimse_refused("C-STORE")
                return NOT_AUTHORISED
            return on_store(event)

        return guarded

    @staticmethod
    def may_store(assoc: Any) -> bool:
        grant = getattr(assoc, _GRANT, None)
        return grant is None or "store" in grant.services


def _is_tls(assoc: Any) -> bool:
    raw = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    return raw is not None and hasattr(raw, "cipher")
