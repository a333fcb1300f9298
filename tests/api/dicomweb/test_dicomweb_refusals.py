"""C-STORE and STOW-RS refuse the same instance with the same code (``storage/refusals.py``).

One live node with both doors open: pynetdicom sends by C-STORE, ``requests`` by STOW-RS, and each
failure must come back as the same value in the C-STORE-RSP Status (PS3.4 B.2.3) and the STOW-RS
Failure Reason (PS3.18 I.2.2).
"""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import requests
from pynetdicom import AE
from sqlalchemy import text

from nnunet_node.api.dicomweb.multipart import encode_parts
from nnunet_node.storage.models import Instance
from nnunet_node.storage.refusals import REFUSALS, UNEXPECTED
from tests.support.dicomweb import Node, dicomweb_settings, write_phantom_study

DICOM_PARTS = 'multipart/related; type="application/dicom"; boundary=xyzzy'


def _c_store(port: int, ds: pydicom.Dataset) -> int:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="NNUNET_NODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def _stow(node: Node, ds: pydicom.Dataset) -> tuple[int, int]:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    body = b"".join(encode_parts("xyzzy", [("application/dicom", [buffer.getvalue()])]))
    response: requests.Response = node.session().post(
        f"{node.dicomweb}/studies", data=body, headers={"Content-Type": DICOM_PARTS}
    )
    result = pydicom.Dataset.from_json(response.json())
    return response.status_code, int(result.FailedSOPSequence[0].FailureReason)


def test_the_same_failure_gets_the_same_code_both_ways(tmp_path: Path) -> None:
    settings = dicomweb_settings(
        tmp_path / "data", dicom_enabled=True, dicom_host="127.0.0.1", dicom_port=0
    )
    node = Node(settings).start()
    try:
        port = node.app.state.services["dimse"].port
        archive = node.context.archive
        study = write_phantom_study(tmp_path / "study", seed=31, patient_id="RF-31")
        first, second, third = (pydicom.dcmread(f) for f in study.files[:3])

        # Nowhere to file it: cannot understand.
        del first.SeriesInstanceUID
        cannot = _c_store(port, first)
        assert cannot == 0xC000
        assert _stow(node, first) == (409, cannot)

        # The disk floor: refused, out of resources.
        archive.min_free_bytes = 1 << 60
        full = _c_store(port, second)
        assert full == 0xA700
        assert _stow(node, second) == (409, full)
        archive.min_free_bytes = 0

        # The study's folder cannot be made (a file is in the way): an input/output error, which
        # STOW-RS used to answer as a processing failure (0x0110) while C-STORE said 0xA701.
        (archive.root / study.study_uid).write_bytes(b"in the way")
        io_error = _c_store(port, third)
        assert io_error == 0xA701
        assert _stow(node, third) == (409, io_error)

        # The database cannot be used (its instance table renamed away: the OperationalError a
        # PostgreSQL that went down also raises): refused, out of resources, for the sender to
        # retry; both answered 0xC001/0x0110, a failure of the node's own, with a traceback.
        (archive.root / study.study_uid).unlink()
        fourth = pydicom.dcmread(study.files[3])
        with node.context.session_factory() as session:
            session.execute(text("ALTER TABLE instances RENAME TO instances_away"))
            session.commit()
        try:
            db_away = _c_store(port, fourth)
            assert db_away == 0xA701
            assert _stow(node, fourth) == (409, db_away)
        finally:
            with node.context.session_factory() as session:
                session.execute(text("ALTER TABLE instances_away RENAME TO instances"))
                session.commit()
        assert _c_store(port, fourth) == 0x0000  # once it is back, the retry is stored

        with node.context.session_factory() as session:
            assert session.query(Instance).count() == 1
    finally:
        node.stop()


def test_the_table_is_read_subclasses_first() -> None:
    # A row for a class listed after one of its base classes could never be reached.
    kinds = [kind for kind, _ in REFUSALS]
    for i, kind in enumerate(kinds):
        assert not any(issubclass(kind, earlier) for earlier in kinds[:i]), kind
    assert UNEXPECTED.dimse_status not in {r.dimse_status for _, r in REFUSALS}
