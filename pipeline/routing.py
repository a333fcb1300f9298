"""Routing rules and destinations from the model-serve spec (``routes:`` and ``destinations:``).

A rule names the series it wants by regular expressions over the series' attributes, the model
(or cascade) to run on it, the request fields to run it with, and where to send the DICOM results.
The format (kept from the issue that introduced it, extended with ``rerun`` and retry settings)::

    destinations:                  # also the only allowed C-MOVE destinations
      PACS: {ae_title: PACS, host: 127.0.0.1, port: 11113, max_attempts: 5, retry_delay_s: 5}
    routes:
      - name: phantom-ct
        match: {Modality: CT, SeriesDescription: "(?i).*phantom.*", called_ae: NNUNET_NODE}
        nnunet_id: phantom         # or a list: a cascade
        args: {tta: false}         # any /infer request field but the paths the node fills in
        destinations: [PACS]
        quiet_seconds: 5           # overrides NNUNET_NODE_SERIES_QUIET_S
        rerun: true                # later instances run it again and supersede the earlier job

Peers (``peers:``, a list; node/access.py) are the AEs the node knows: each destination, and
each ``peers`` entry (AE title, host, optional port, ``operations`` it may use, ``tls``,
``check_host``). A peer with a port is also a C-MOVE destination. A ``peers`` entry with a
destination's AE title sets that destination's operations, TLS and host check.

``core.spec`` validates the file (:class:`~nnunet_node.core.spec.RouteEntry`,
:class:`~nnunet_node.core.spec.DestinationEntry`); this module checks what needs the request model
(a rule's ``args``) and the registry (its models, :meth:`RoutingTable.check_models`), and matches
series against the rules. A mistake raises :class:`ConfigError` naming the rule and the key when
the spec is loaded, so a node never starts with a rule that cannot fire.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from nnunet_node.core.errors import ConfigError, describe_validation_error
from nnunet_node.core.spec import (
    ASSOCIATION_KEYS,
    PEER_OPERATIONS,
    DestinationEntry,
    PeerEntry,
    RouteEntry,
    SpecFile,
)
from nnunet_node.inference.request import InferenceRequest

LOGGER = logging.getLogger(__name__)

Route = RouteEntry
"""One routing rule (validated by ``core.spec``; ``match`` holds compiled full-match patterns)."""


SERVICES: tuple[str, ...] = PEER_OPERATIONS
"""What a peer may be allowed: C-STORE to the node, C-FIND, C-GET, C-MOVE."""


@dataclass(frozen=True)
class Peer:
    """A declared DICOM peer: the node sends to it (a rule's results, a C-MOVE's sub-operations)
    when it has a ``port``, and lets it use the services in ``allow`` (node/access.py)."""

    name: str
    ae_title: str
    host: str
    port: int | None
    max_attempts: int = 5
    """Dispatch attempts before a dispatch is marked failed (it can be retried by hand)."""
    retry_delay_s: float = 5.0
    """Delay before the second attempt; doubled after each failure (at most 10 minutes)."""
    allow: frozenset[str] = frozenset(PEER_OPERATIONS)
    """What the peer may ask of the node: ``store``, ``find``, ``get``, ``move``."""
    tls: bool = False
    """The node's associations to this peer use TLS (PS3.15 B.1)."""
    check_host: bool = False
    """Recognise this peer only when it calls from ``host``."""

    def __str__(self) -> str:
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port})"

    @classmethod
    def from_entry(
        cls, name: str, entry: DestinationEntry, peer: PeerEntry | None = None
    ) -> Destination:
        """A destination; a ``peers`` entry with its AE title adds what it may do, TLS and the
        host check."""
        return cls(
            name,
            entry.ae_title,
            entry.host,
            entry.port,
            max_attempts=entry.max_attempts,
            retry_delay_s=entry.retry_delay_s,
            allow=frozenset(peer.operations) if peer else frozenset(PEER_OPERATIONS),
            tls=entry.tls or bool(peer and peer.tls),
            check_host=bool(peer and peer.check_host),
        )

    @classmethod
    def from_peer(cls, entry: PeerEntry) -> Peer:
        """A ``peers`` entry (named by its AE title)."""
        return cls(
            entry.ae_title,
            entry.ae_title,
            entry.host,
            entry.port,
            allow=frozenset(entry.operations),
            tls=entry.tls,
            check_host=entry.check_host,
        )


Destination = Peer
"""A peer the node sends to (a ``destinations`` entry, or a peer with a port)."""


@dataclass(frozen=True)
class RoutingTable:
    destinations: Mapping[str, Destination] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    peers: tuple[Peer, ...] = ()
    """Every declared peer: the destinations, then the ``peers`` entries of other AE titles."""

    @classmethod
    def from_spec(cls, spec: SpecFile | Mapping[str, Any], *, quiet: bool = False) -> RoutingTable:
        """The spec's ``destinations`` and ``routes`` (a parsed document is validated first),
        logged in one line unless ``quiet`` (a receiver process, whose node already logged it).

        Raises :class:`ConfigError` naming the rule and the key: a rule's ``args`` must be
        ``/infer`` request fields a request would accept."""
        spec = SpecFile.parse(spec)
        by_title = {peer.ae_title: peer for peer in spec.peers}
        destinations = {
            name: Destination.from_entry(name, entry, by_title.get(entry.ae_title))
            for name, entry in spec.destinations.items()
        }
        titles = {d.ae_title for d in destinations.values()}
        peers = [
            *destinations.values(),
            *(Peer.from_peer(p) for p in spec.peers if p.ae_title not in titles),
        ]
        for route in spec.routes:
            _check_args(route)
        if not quiet:
            LOGGER.info(
                "routing: %d destination(s), %d peer(s), %d rule(s)",
                len(destinations),
                len(peers),
                len(spec.routes),
            )
        return cls(destinations=destinations, routes=tuple(spec.routes), peers=tuple(peers))

    def matching(self, attributes: Mapping[str, str]) -> list[Route]:
        return [route for route in self.routes if route.matches(attributes)]

    def route(self, name: str) -> Route | None:
        return next((r for r in self.routes if r.name == name), None)

    def peer_by_ae(self, ae_title: str) -> Peer | None:
        """The declared peer with this AE title; ``None`` if there is none."""
        wanted = ae_title.strip()
        return next((p for p in self.peers if p.ae_title == wanted), None)

    def destination_by_ae(self, ae_title: str) -> Destination | None:
        """The destination a C-MOVE names by AE title (PS3.4 C.4.2.1.4.1): a declared peer with a
        port; ``None`` if unknown."""
        peer = self.peer_by_ae(ae_title)
        return peer if peer is not None and peer.port is not None else None

    def match_keywords(self) -> set[str]:
        """Every attribute keyword some rule looks at."""
        return {k for r in self.routes for k in r.match}

    def check_models(self, resolve: Callable[[str], object]) -> None:
        """Resolve each rule's model names with ``resolve(name)`` (a registry's ``resolve``) so
        an unknown model fails at start-up, naming the rule; raises :class:`ConfigError`."""
        for route in self.routes:
            ids = route.nnunet_id if isinstance(route.nnunet_id, tuple) else (route.nnunet_id,)
            for model in ids:
                try:
                    resolve(model)
                except Exception as exc:
                    raise ConfigError(f"routes[{route.name}].nnunet_id: {exc}") from exc


def attribute_text(value: Any) -> str:
    """An attribute value as matched by rules: multiple values joined by a backslash (PS3.5 6.4)."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(attribute_text(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip("\x00 ")
    return str(value).strip()


def series_attributes(
    header: Dataset, *, called_ae: str = "", calling_ae: str = "", keywords: Iterable[str] = ()
) -> dict[str, str]:
    """What rules match on: ``keywords`` of the series' first instance (read without pixels)
    plus the AE titles of the association that brought it."""
    attributes = {"called_ae": called_ae.strip(), "calling_ae": calling_ae.strip()}
    for keyword in keywords:
        if keyword in ASSOCIATION_KEYS:
            continue
        element = header.get(keyword)
        attributes[keyword] = "" if element is None else attribute_text(element)
    return attributes


# --- the checks that need the request model ------------------------------------------------


def _check_args(route: Route) -> None:
    """A rule's ``args`` are ``/infer`` request fields, with values a request accepts."""
    where = f"routes[{route.name}]"
    for key in route.args:
        if key not in InferenceRequest.model_fields:
            raise ConfigError(f"model-serve spec: {where}.args.{key}: not an /infer request field")
    try:
        InferenceRequest.model_validate(route.request())
    except ValidationError as exc:
        raise ConfigError(
            f"model-serve spec: {where}.args: {describe_validation_error(exc)}"
        ) from exc
