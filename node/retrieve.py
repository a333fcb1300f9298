"""C-STORE sub-operations of C-GET and C-MOVE (PS3.4 C.4.2.3, C.4.3.3) sent from the stored files.

The handlers yield a :class:`StoredInstance` per file instead of a decoded dataset. The node's
associations (both the accepted ones, for C-GET, and those it requests for C-MOVE) send it with
:func:`send_stored`:

- when the peer accepted a presentation context for the instance's SOP Class in the transfer
  syntax the file is stored in, the file's data set goes out as it is on disk, read fragment by
  fragment (no decoding, no re-encoding, no copy of the whole file in memory);
- otherwise it is converted, and only then: read with pydicom and handed to pynetdicom's
  ``send_c_store``, which changes between the uncompressed little endian syntaxes and
  (de)flates (PS3.5 A.2-A.5); a compressed file is first decompressed with pydicom's pixel
  decoders when the peer accepted only uncompressed syntaxes (same SOP Instance UID: the
  transfer syntax is a representation, PS3.5 10.1);
- a file that cannot be converted to anything the peer accepted (no decoder for its syntax, no
  context for its SOP Class) raises :class:`SubOperationFailed`; pynetdicom counts the
  sub-operation as failed and lists its SOP Instance UID in the Failed SOP Instance UID List
  (PS3.4 C.4.2.1.4.2, C.4.3.1.3.2).
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import split_dataset

from nnunet_node.pipeline.pynetdicom_internals import send_c_store_from_file

LOGGER = logging.getLogger(__name__)


class SubOperationFailed(ValueError):
    """A stored instance cannot be sent in any presentation context the peer accepted."""


class StoredInstance(Dataset):
    """A stored file to send as a C-STORE sub-operation, standing in for its dataset.

    It holds only SOP Class UID and SOP Instance UID (what pynetdicom reads from a yielded
    dataset, e.g. for the Failed SOP Instance UID List); ``path`` is the Part 10 file and
    ``transfer_syntax_uid`` the syntax its data set is encoded in (the index's copy of its
    File Meta, PS3.10 7.1). ``move_originator_aet`` is the AE title that asked for a C-MOVE
    (PS3.7 9.1.1.1: Move Originator Application Entity Title), None for C-GET.
    """

    def __init__(
        self,
        path: Path,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        *,
        move_originator_aet: str | None = None,
    ) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        self.path = path
        self.transfer_syntax_uid = transfer_syntax_uid
        self.move_originator_aet = move_originator_aet


def data_set_offset(path: Path) -> int:
    """Where the data set starts in the Part 10 file ``path``: after the preamble, ``DICM`` and
    the File Meta Information, whose group length (0002,0000) says how long it is (PS3.10 7.1).
    A file without that group length is measured by pynetdicom's ``split_dataset``.
    Raises OSError when the file cannot be read, ValueError when it is not a Part 10 file."""
    with open(path, "rb") as fh:
        head = fh.read(144)
    if len(head) == 144 and head[128:138] == b"DICM\x02\x00\x00\x00UL":
        (length,) = struct.unpack("<I", head[140:144])
        return 144 + int(length)
    try:
        _, offset = split_dataset(path)
    except Exception as exc:
        raise ValueError(f"{path} is not a DICOM Part 10 file: {exc}") from exc
    return int(offset)


def _contexts_for(assoc: Any, sop_class_uid: str) -> list[Any]:
    """The accepted presentation contexts in which this end may send ``sop_class_uid``."""
    return [
        cx
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == sop_class_uid and cx.as_scu is True
    ]


def _converted(instance: StoredInstance, contexts: list[Any]) -> Dataset:
    """The instance decoded for pynetdicom to encode in one of ``contexts``; decompressed when
    it is stored compressed and the peer accepted only other syntaxes."""
    stored = UID(instance.transfer_syntax_uid)
    syntaxes = [UID(cx.transfer_syntax[0]) for cx in contexts]
    uncompressed = [ts for ts in syntaxes if not ts.is_compressed]
    if stored.is_compressed and not uncompressed:
        raise SubOperationFailed(
            f"{instance.SOPInstanceUID}: stored as {stored.name}, the peer accepted only "
            f"{', '.join(ts.name for ts in syntaxes)} (no conversion between compressed syntaxes)"
        )
    ds = pydicom.dcmread(instance.path)
    if stored.is_compressed:
        try:
            ds.decompress(generate_instance_uid=False)
        except Exception as exc:
            raise SubOperationFailed(
                f"{instance.SOPInstanceUID}: stored as {stored.name}, the peer accepted only "
                f"{', '.join(ts.name for ts in syntaxes)}, and it cannot be decompressed: {exc}"
            ) from exc
    return ds


def send_stored(
    assoc: Any,
    send_c_store: Any,
    dataset: Any,
    msg_id: int = 1,
    priority: int = 2,
    originator_aet: str | None = None,
    originator_id: int | None = None,
) -> Dataset:
    """``Association.send_c_store`` for the node's associations: a :class:`StoredInstance` goes
    out from its file (see the module docstring), anything else through ``send_c_store``
    (pynetdicom's own). Returns the C-STORE-RSP status dataset (empty if none came).
    Raises SubOperationFailed when the instance cannot be sent, OSError when its file cannot
    be read."""
    if not isinstance(dataset, StoredInstance):
        return send_c_store(
            dataset,
            msg_id=msg_id,
            priority=priority,
            originator_aet=originator_aet,
            originator_id=originator_id,
        )
    if dataset.move_originator_aet is not None:
        originator_aet = dataset.move_originator_aet
    contexts = _contexts_for(assoc, str(dataset.SOPClassUID))
    if not contexts:
        raise SubOperationFailed(
            f"{dataset.SOPInstanceUID}: the peer accepted no presentation context for "
            f"{UID(str(dataset.SOPClassUID)).name}"
        )
    for cx in contexts:
        if cx.transfer_syntax[0] == dataset.transfer_syntax_uid:
            return send_c_store_from_file(
                assoc,
                int(cx.context_id),
                dataset.path,
                data_set_offset(dataset.path),
                sop_class_uid=str(dataset.SOPClassUID),
                sop_instance_uid=str(dataset.SOPInstanceUID),
                message_id=msg_id,
                priority=priority,
                move_originator_aet=originator_aet,
                move_originator_id=originator_id,
            )
    converted = _converted(dataset, contexts)
    LOGGER.info(
        "C-STORE sub-operation: %s converted from %s for the peer",
        dataset.SOPInstanceUID,
        UID(dataset.transfer_syntax_uid).name,
    )
    return send_c_store(
        converted,
        msg_id=msg_id,
        priority=priority,
        originator_aet=originator_aet,
        originator_id=originator_id,
    )


def send_stored_files(assoc: Any) -> None:
    """Make ``assoc.send_c_store`` send :class:`StoredInstance` from their files (this one
    association; nothing global changes)."""
    original = assoc.send_c_store

    def send_c_store(dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
        return send_stored(assoc, original, dataset, *args, **kwargs)

    assoc.send_c_store = send_c_store
