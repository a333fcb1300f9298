"""Mutated C-STORE requests, as a fuzzer would send them: every one gets a status, the node stays
up, and nothing it logs carries a traceback.

200 seeded mutations over a raw socket (tests/node/raw_dimse.py): the command set's SOP Instance
UID replaced by arbitrary bytes (non-ASCII, NUL, backslashes, empty, too long) or its SOP Class
UID by another storage class, and the data set with bytes flipped, cut short, inserted or
zeroed. The command set's structure stays valid: what cannot even be parsed as a DIMSE message
is for the upper layer to abort, not for a status.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from nnunet_node.pipeline.stored_send import data_set_offset
from tests.node.raw_dimse import Aborted, RawAssociation, store_request
from tests.support.dcmtk import dcmtk
from tests.support.dimse import NodeFactory

CT = "1.2.840.10008.5.1.4.1.1.2"
OTHER_STORAGE = [
    "1.2.840.10008.5.1.4.1.1.4",
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.66.4",
]
MUTATIONS = 200
SEED = 20261130


def _random_uid_bytes(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 70)))  # anything
    if kind == 1:
        return "1.2.3.\u00e9\u00e8.4".encode("latin-1")  # non-ASCII
    if kind == 2:
        return b""
    if kind == 3:
        return b"1.2." + b"9" * rng.randrange(61, 200)  # too long
    if kind == 4:
        return b"1.2.3\\4.5\x00\x00"  # backslash, NUL padding
    return b"../../" + bytes([rng.randrange(0x80, 0x100)]) + b".1"


def _mutate_data_set(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:  # flip bytes, mostly in the header where they matter
        for _ in range(rng.randrange(1, 20)):
            data[rng.randrange(min(len(data), 600))] = rng.randrange(256)
    elif kind == 1:  # cut short
        del data[rng.randrange(len(data)) :]
    elif kind == 2:  # insert garbage
        at = rng.randrange(len(data))
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    elif kind == 3:  # zero a stretch
        at = rng.randrange(len(data))
        data[at : at + rng.randrange(1, 256)] = b"\x00" * len(data[at : at + 256])
    else:  # a huge length in some element header
        at = rng.randrange(min(len(data), 600))
        data[at : at + 4] = b"\xff\xff\xff\x7f"
    return bytes(data)


@pytest.mark.slow
@pytest.mark.filterwarnings("default")  # pydicom warns about the bad values, as in production
def test_mutated_c_store_requests_all_get_a_status(
    start_node: NodeFactory, phantom_series: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    caplog.set_level(logging.INFO, logger="pynetdicom")  # its standard handlers bound too
    node = start_node()
    source = phantom_series[0]
    raw = source.read_bytes()
    valid = raw[data_set_offset(source) :]
    sop = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID).encode()
    rng = random.Random(SEED)
    statuses: dict[int, int] = {}
    unanswered = []
    assoc = RawAssociation.open(node.port, CT, ExplicitVRLittleEndian)
    for number in range(MUTATIONS):
        sop_class, sop_instance, data_set = CT.encode(), sop, valid
        if number % 3 == 0:
            sop_instance = _random_uid_bytes(rng)
        elif number % 3 == 1 and rng.random() < 0.2:
            sop_class = rng.choice(OTHER_STORAGE).encode()
        else:
            data_set = _mutate_data_set(rng, valid)
        if len(sop_class) % 2:
            sop_class += b"\x00"
        command = store_request(sop_class, sop_instance, message_id=number + 1)
        try:
            assoc.send_message(command, data_set)
            status = assoc.read_status()
        except (Aborted, OSError) as exc:
            unanswered.append((number, sop_instance, repr(exc)))
            assoc.release()
            assoc = RawAssociation.open(node.port, CT, ExplicitVRLittleEndian)
            continue
        statuses[status] = statuses.get(status, 0) + 1
    assoc.release()
    assert not unanswered, unanswered[:5]
    assert sum(statuses.values()) == MUTATIONS
    assert set(statuses) - {0x0000}, statuses  # the mutations were refused, some at least
    # the node is still up and still stores a good instance
    result = dcmtk("storescu", "-aec", "NNUNET_NODE", "127.0.0.1", str(node.port), str(source))
    assert result.returncode == 0, result.stdout
    tracebacks = [
        r.getMessage()[:300]
        for r in caplog.records
        if r.exc_info is not None or "Traceback" in r.getMessage()
    ]
    assert not tracebacks, tracebacks[:3]
