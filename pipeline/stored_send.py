"""C-STORE of stored Part 10 files as they are on disk: the C-STORE sub-operations of C-GET and
C-MOVE (PS3.4 C.4.2.3, C.4.3.3) and the dispatch of results to a PACS (PS3.4 B.2).

A sender hands an association a :class:`StoredInstance` per file instead of a decoded dataset
(the node's handlers yield them, ``pipeline/dispatch.py`` sends them). The associations that
:func:`send_stored_files` prepared (the node's accepted ones, for C-GET; those it requests for
C-MOVE and for dispatch) send it with :func:`send_stored`:

- when the peer accepted a presentation context for the instance's SOP Class in the transfer
  syntax the file is stored in, the file's data set goes out as it is on disk, read in large
  pieces (no decoding, no re-encoding, no copy of the whole of a large file in memory);
- otherwise it is converted, and only then: read with pydicom and handed to pynetdicom's
  ``send_c_store``, which changes between the uncompressed little endian syntaxes and
  (de)flates (PS3.5 A.2-A.5); a compressed file is first decompressed with pydicom's pixel
  decoders when the peer accepted only uncompressed syntaxes (same SOP Instance UID: the
  transfer syntax is a representation, PS3.5 10.1);
- a file that cannot be converted to anything the peer accepted (no decoder for its syntax, no
  context for its SOP Class) raises :class:`SubOperationFailed`; in a C-GET or C-MOVE
  pynetdicom counts the sub-operation as failed and lists its SOP Instance UID in the Failed SOP
  Instance UID List (PS3.4 C.4.2.1.4.2, C.4.3.1.3.2).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID
from pynetdicom.dsutils import split_dataset

from nnunet_node.pipeline.pynetdicom_internals import (
    decode_store_responses,
    leave_responses_to_senders,
    send_c_store_from_file,
)

LOGGER = logging.getLogger(__name__)


class SubOperationFailed(ValueError):
    """A stored instance cannot be sent in any presentation context the peer accepted."""


_SOP_CLASS_UID = Tag(0x0008, 0x0016)
_SOP_INSTANCE_UID = Tag(0x0008, 0x0018)


class StoredInstance(Dataset):
    """A stored file to send as a C-STORE sub-operation, standing in for its dataset.

    It holds only SOP Class UID and SOP Instance UID (what pynetdicom reads from a yielded
    dataset, e.g. for the Failed SOP Instance UID List); ``path`` is the Part 10 file and
    ``transfer_syntax_uid`` the syntax its data set is encoded in (the index's copy of its
    File Meta, PS3.10 7.1). ``move_originator_aet`` is the AE title that asked for a C-MOVE
    (PS3.7 9.1.1.1: Move Originator Application Entity Title), None for C-GET.
    """

    path: Path | str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    move_originator_aet: str | None

    def __init__(
        self,
        path: Path | str,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        *,
        move_originator_aet: str | None = None,
    ) -> None:
        super().__init__()
        # as read from a file (decoded only if pynetdicom reads them): ~4x quicker than
        # assigning the keywords, on the wait between two sub-operations
        for tag, uid in ((_SOP_CLASS_UID, sop_class_uid), (_SOP_INSTANCE_UID, sop_instance_uid)):
            value = uid.encode("ascii")
            self[tag] = RawDataElement(tag, "UI", len(value), value, 0, False, True)
        # plain attributes, not elements (Dataset.__setattr__ looks every name up as a keyword)
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "sop_class_uid", sop_class_uid)
        object.__setattr__(self, "sop_instance_uid", sop_instance_uid)
        object.__setattr__(self, "transfer_syntax_uid", transfer_syntax_uid)
        object.__setattr__(self, "move_originator_aet", move_originator_aet)


def data_set_offset(source: Path | str | BinaryIO) -> int:
    """Where the data set starts in the Part 10 file ``source`` (a path, or the file open for
    binary reading, read from its start): after the preamble, ``DICM`` and the File Meta
    Information, whose group length (0002,0000) says how long it is (PS3.10 7.1). A file without
    that group length is measured by pynetdicom's ``split_dataset``.
    Raises OSError when the file cannot be read, ValueError when it is not a Part 10 file."""
    if isinstance(source, str | Path):
        with open(source, "rb") as fh:
            head = fh.read(144)
    else:
        source.seek(0)
        head = source.read(144)
    if len(head) == 144 and head[128:138] == b"DICM\x02\x00\x00\x00UL":
        (length,) = struct.unpack("<I", head[140:144])
        return 144 + int(length)
    path = Path(source) if isinstance(source, str | Path) else Path(str(source.name))
    try:
        _, offset = split_dataset(path)
    except Exception as exc:
        raise ValueError(f"{path} is not a DICOM Part 10 file: {exc}") from exc
    return int(offset)


def _contexts_for(assoc: Any, sop_class_uid: str) -> list[Any]:
    """The accepted presentation contexts in which this end may send ``sop_class_uid`` (the
    association's are listed once per SOP Class: they do not change once negotiated)."""
    by_class: dict[str, list[Any]] | None = getattr(assoc, "_node_send_contexts", None)
    if by_class is None:
        by_class = {}
        for cx in assoc.accepted_contexts:
            if cx.as_scu is True:
                by_class.setdefault(str(cx.abstract_syntax), []).append(cx)
        assoc._node_send_contexts = by_class
    return by_class.get(sop_class_uid, [])


def _converted(instance: StoredInstance, contexts: list[Any]) -> Dataset:
    """The instance decoded for pynetdicom to encode in one of ``contexts``; decompressed when
    it is stored compressed and the peer accepted only other syntaxes."""
    stored = UID(instance.transfer_syntax_uid)
    syntaxes = [UID(cx.transfer_syntax[0]) for cx in contexts]
    uncompressed = [ts for ts in syntaxes if not ts.is_compressed]
    if stored.is_compressed and not uncompressed:
        raise SubOperationFailed(
            f"{instance.sop_instance_uid}: stored as {stored.name}, the peer accepted only "
            f"{', '.join(ts.name for ts in syntaxes)} (no conversion between compressed syntaxes)"
        )
    ds = pydicom.dcmread(instance.path)
    if stored.is_compressed:
        try:
            ds.decompress(generate_instance_uid=False)
        except Exception as exc:
            raise SubOperationFailed(
                f"{instance.sop_instance_uid}: stored as {stored.name}, the peer accepted only "
                f"{', '.join(ts.name for ts in syntaxes)}, and it cannot be decompressed: {exc}"
            ) from exc
    return ds


def send_stored(
    assoc: Any,
    send_c_store: Callable[..., Dataset],
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
    contexts = _contexts_for(assoc, dataset.sop_class_uid)
    if not contexts:
        raise SubOperationFailed(
            f"{dataset.sop_instance_uid}: the peer accepted no presentation context for "
            f"{UID(dataset.sop_class_uid).name}"
        )
    for cx in contexts:
        if cx.transfer_syntax[0] == dataset.transfer_syntax_uid:
            return send_c_store_from_file(
                assoc,
                int(cx.context_id),
                dataset.path,
                data_set_offset,
                sop_class_uid=dataset.sop_class_uid,
                sop_instance_uid=dataset.sop_instance_uid,
                message_id=msg_id,
                priority=priority,
                move_originator_aet=originator_aet,
                move_originator_id=originator_id,
            )
    converted = _converted(dataset, contexts)
    LOGGER.info(
        "C-STORE sub-operation: %s converted from %s for the peer",
        dataset.sop_instance_uid,
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
    """Make ``assoc.send_c_store`` send :class:`StoredInstance` from their files, and decode
    the C-STORE-RSPs that answer them directly (this one association; nothing global
    changes)."""
    original = assoc.send_c_store
    decode_store_responses(assoc)
    if assoc.is_requestor:
        leave_responses_to_senders(assoc)

    def send_c_store(dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
        return send_stored(assoc, original, dataset, *args, **kwargs)

    assoc.send_c_store = send_c_store
