"""A C-STORE whose SOP Instance UID is not a UID (PS3.5 9.1), in the command set's Affected SOP
Instance UID or in the data set: refused 0xC000 with one log line, the node's own, quoting the
value safely (escaped, cut short); no warning of pydicom's or pynetdicom's before it, no
traceback, nothing stored, and the association goes on serving.

Sent over a raw socket (tests/node/raw_dimse.py): pynetdicom refuses to send such UIDs."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core.errors import shown_value
from nnunet_node.pipeline.stored_send import data_set_offset
from nnunet_node.storage.models import Instance
from tests.node.raw_dimse import RawAssociation, store_request
from tests.support.datasets import BAD_UIDS, with_raw_uid
from tests.support.dimse import NodeFactory

CT = "1.2.840.10008.5.1.4.1.1.2"


def _sop_class() -> bytes:
    return CT.encode() + b"\x00" * (len(CT) % 2)


def _instances(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


@pytest.mark.filterwarnings("default")  # pydicom's warnings are recorded, not raised
@pytest.mark.parametrize("bad", BAD_UIDS.values(), ids=BAD_UIDS.keys())
@pytest.mark.parametrize("where", ["command set", "data set"])
def test_an_invalid_sop_instance_uid_is_refused_with_one_log_line(
    start_node: NodeFactory,
    phantom_series: list[Path],
    sessions: sessionmaker[Session],
    caplog: pytest.LogCaptureFixture,
    where: str,
    bad: bytes,
) -> None:
    caplog.set_level(logging.WARNING)
    caplog.set_level(logging.INFO, logger="pynetdicom")  # its standard handlers bound too
    node = start_node()
    source = phantom_series[0]
    data_set = source.read_bytes()[data_set_offset(source) :]
    sop = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID).encode()
    if where == "command set":
        command_uid, sent = bad, data_set
        expected = f"Affected SOP Instance UID {shown_value(bad)} is not a valid UID (PS3.5 9.1)"
    else:
        command_uid, sent = sop, with_raw_uid(data_set, "SOPInstanceUID", bad)
        expected = f"SOPInstanceUID {shown_value(bad)} is not a valid UID (PS3.5 9.1)"
    assoc = RawAssociation.open(node.port, CT, ExplicitVRLittleEndian)
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            assoc.send_message(store_request(_sop_class(), command_uid, message_id=1), sent)
            refused = assoc.read_status()
        # the same association then stores a valid instance: the refused one's data set was
        # read off the wire whole
        assoc.send_message(store_request(_sop_class(), sop, message_id=2), data_set)
        stored = assoc.read_status()
    finally:
        assoc.release()
    assert refused == 0xC000
    assert stored == 0x0000
    assert _instances(sessions) == 1
    assert not [str(w.message)[:200] for w in warned]
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in records] == ["nnunet_node.node.status"], [
        (r.name, r.getMessage()[:200]) for r in records
    ]
    message = records[0].getMessage()
    assert message == f"C-STORE from FUZZER@127.0.0.1: 0xC000: {expected}"
    assert message.isascii() and len(message) < 250
    assert records[0].exc_info is None
