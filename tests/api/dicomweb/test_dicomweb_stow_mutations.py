"""Mutated STOW-RS parts, as a fuzzer would send them: every part gets a verdict (stored, or a
Failure Reason in the Failed SOP Sequence, PS3.18 10.5.3), no request gets a server error, the
node keeps serving, and nothing it logs carries a traceback."""

from __future__ import annotations

import logging
import random

import pydicom
import pytest

from nnunet_node.api.dicomweb.multipart import encode_parts
from tests.support.dicomweb import Node, write_phantom_study

DICOM_PARTS = 'multipart/related; type="application/dicom"; boundary=xyzzy'
REQUESTS = 20
PARTS_PER_REQUEST = 5
SEED = 20261130


def _mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:  # flip bytes, mostly in the File Meta and the header
        for _ in range(rng.randrange(1, 20)):
            data[rng.randrange(min(len(data), 900))] = rng.randrange(256)
    elif kind == 1:  # cut short
        del data[rng.randrange(len(data)) :]
    elif kind == 2:  # insert garbage
        at = rng.randrange(len(data))
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    elif kind == 3:  # a non-ASCII byte inside the SOP Instance UID
        at = data.find(b"\x08\x00\x18\x00")
        if at >= 0:
            data[at + 12] = rng.randrange(0x80, 0x100)
    else:  # a huge length in some element header
        at = rng.randrange(132, min(len(data), 900))
        data[at : at + 4] = b"\xff\xff\xff\x7f"
    return bytes(data)


@pytest.mark.slow
@pytest.mark.filterwarnings("default")  # pydicom warns about the bad values, as in production
def test_mutated_stow_parts_each_get_a_verdict(
    node: Node, tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    study = write_phantom_study(tmp_path_factory.mktemp("stow-fuzz"), seed=21, patient_id="FZ")
    originals = [f.read_bytes() for f in study.files]
    rng = random.Random(SEED)
    session = node.session()
    verdicts = {"stored": 0, "failed": 0}
    for _ in range(REQUESTS):
        parts = [_mutate(rng, rng.choice(originals)) for _ in range(PARTS_PER_REQUEST)]
        body = b"".join(encode_parts("xyzzy", [("application/dicom", [p]) for p in parts]))
        response = session.post(
            f"{node.dicomweb}/studies",
            data=body,
            headers={"Content-Type": DICOM_PARTS, "Accept": "application/dicom+json"},
        )
        assert response.status_code in (200, 202, 409), (response.status_code, response.text)
        result = pydicom.Dataset.from_json(response.json())
        stored = len(result.get("ReferencedSOPSequence", []))
        failed = result.get("FailedSOPSequence", [])
        assert all(item.FailureReason for item in failed)
        # a part cut inside the multipart framing may merge with the next: never more verdicts
        assert 1 <= stored + len(failed) <= PARTS_PER_REQUEST
        verdicts["stored"] += stored
        verdicts["failed"] += len(failed)
    assert verdicts["failed"] > 0, verdicts
    assert session.get(f"{node.url}/healthz").status_code == 200
    tracebacks = [
        r.getMessage()[:300]
        for r in caplog.records
        if r.exc_info is not None or "Traceback" in r.getMessage()
    ]
    assert not tracebacks, tracebacks[:3]
