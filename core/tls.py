"""TLS contexts for the DICOM node and its outgoing associations (PS3.15 B.1 Basic TLS Secure
Transport Connection Profile, with the protocol floor of B.9, the BCP 195 TLS profile: TLS 1.2 or
newer, the ``ssl`` module's default cipher suites).

The node has one certificate and key (``NNUNET_NODE_TLS_CERT``/``_KEY``) for its TLS port, for
HTTPS and as its client certificate towards TLS peers, and optionally a CA file
(``NNUNET_NODE_TLS_CA``) that client certificates must chain to and that TLS peers are verified
against.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from nnunet_node.core.errors import ConfigError


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"NNUNET_NODE_TLS_CERT/NNUNET_NODE_TLS_KEY: cannot load {cert} with {key}: {exc}"
        ) from exc


def _load_ca(context: ssl.SSLContext, ca: Path) -> None:
    try:
        context.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"NNUNET_NODE_TLS_CA: cannot load {ca}: {exc}") from exc


def server_context(cert: Path, key: Path, ca: Path | None = None) -> ssl.SSLContext:
    """The context of the node's TLS port: its certificate and key; with ``ca``, a client must
    present a certificate signed by one of those CAs, or the handshake fails (before any
    association is negotiated). Raises :class:`ConfigError` for unreadable files."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert, key)
    if ca is not None:
        _load_ca(context, ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    cert: Path | None = None, key: Path | None = None, ca: Path | None = None
) -> ssl.SSLContext:
    """The context of an association the node requests from a TLS peer: the peer's certificate
    must chain to ``ca`` (or the system's CAs) and name the host it is reached at; the node's own
    certificate is presented when it has one. Raises :class:`ConfigError` for unreadable files."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        _load_ca(context, ca)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert is not None and key is not None:
        _load_chain(context, cert, key)
    return context
