"""Every use of pynetdicom's private internals in the node, in one place (pynetdicom 3.0.x).

pynetdicom has no public API for what the node needs on its hot paths (streaming a received
dataset to disk, sending a stored file without decoding it, event-driven associations), so the
node reaches into its internals here and nowhere else. ``tests/node/test_pynetdicom_internals.py``
checks every name and shape used below against the installed pynetdicom and fails loudly when a
release changes one; nothing here falls back silently. ``pyproject.toml`` pins pynetdicom below
3.1 so that such a release is a deliberate upgrade.

Each hook names the public API that would replace it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_STORE

# --- sending a stored file as it is ---------------------------------------------------------


def send_c_store_from_file(
    assoc: Any,
    context_id: int,
    path: Path,
    offset: int,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    message_id: int,
    priority: int = 2,
    move_originator_aet: str | None = None,
    move_originator_id: int | None = None,
) -> Dataset:
    """Send a C-STORE-RQ whose data set is the bytes of ``path`` from ``offset`` to the end
    (already encoded in the transfer syntax of presentation context ``context_id``), and wait for
    the C-STORE-RSP; returns the status dataset as ``Association.send_c_store`` does (empty when
    no response came: DIMSE timeout or abort).

    Internals used (PS3.7 9.1.1 is what is sent):

    - ``C_STORE._dataset_path = (path, offset)``: pynetdicom's own chunked-send mode, which
      ``DIMSEMessage.encode_msg`` reads fragment by fragment from the file. Public replacement:
      ``Association.send_c_store(path)`` with ``pynetdicom._config.STORE_SEND_CHUNKED_DATASET``,
      a process-wide switch that also disables conversion for every other sender, so not used.
    - ``Association._reactor_checkpoint`` / ``_is_paused``: pausing the association's reactor
      while the request and its response are exchanged, as ``send_c_store`` does (the acceptor's
      reactor is already paused while it serves a C-GET).
    - ``Association._check_received_status`` / ``_handle_no_response``: the response checks of
      ``send_c_store``. Public replacement for all three: ``send_c_store`` accepting a
      file-backed dataset without the global switch.
    """
    request = C_STORE()
    request.MessageID = message_id
    request.Priority = priority
    request.AffectedSOPClassUID = sop_class_uid
    request.AffectedSOPInstanceUID = sop_instance_uid
    request.MoveOriginatorApplicationEntityTitle = move_originator_aet
    request.MoveOriginatorMessageID = move_originator_id
    request._dataset_path = (path, offset)

    checkpoint = assoc._reactor_checkpoint
    checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(request, context_id)
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        checkpoint.set()
    if response is None:
        assoc._handle_no_response()
        return Dataset()
    status: Dataset = assoc._check_received_status(response)
    return status
