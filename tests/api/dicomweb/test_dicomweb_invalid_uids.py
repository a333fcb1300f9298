"""STOW-RS of an instance whose SOP Instance UID is not a UID (PS3.5 9.1): the part fails with
0xC000 (the status C-STORE answers, storage/refusals.py), the node logs one line for it, its own,
quoting the value safely, and the Store Instances Response (PS3.18 Annex I) stays a valid
dataset: the Failed SOP Sequence item holds the Referenced SOP Instance UID empty, never the
invalid value (api/dicomweb/dicom_json.py says why)."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import pydicom
import pytest

from nnunet_node.api.dicomweb.multipart import encode_parts
from nnunet_node.core.errors import shown_value
from nnunet_node.storage.headers import is_valid_uid
from tests.support.datasets import BAD_UIDS, with_raw_uid
from tests.support.dicomweb import Node, write_phantom_study

DICOM_PARTS = 'multipart/related; type="application/dicom"; boundary=xyzzy'


def _ui_values(model: Any) -> list[Any]:
    """Every value of every UI element in a DICOM JSON model, nested sequences included."""
    found: list[Any] = []
    for element in model.values():
        if element["vr"] == "UI":
            found += element.get("Value", [])
        elif element["vr"] == "SQ":
            for item in element.get("Value", []):
                found += _ui_values(item)
    return found


@pytest.mark.filterwarnings("default")  # pydicom's warnings are recorded, not raised
@pytest.mark.parametrize("bad", BAD_UIDS.values(), ids=BAD_UIDS.keys())
def test_an_invalid_sop_instance_uid_fails_its_part_with_one_log_line(
    node: Node,
    tmp_path_factory: pytest.TempPathFactory,
    caplog: pytest.LogCaptureFixture,
    bad: bytes,
) -> None:
    study = write_phantom_study(tmp_path_factory.mktemp("bad-uid"), seed=41, patient_id="BU-41")
    good, hostile = study.files[0].read_bytes(), study.files[1].read_bytes()
    hostile = with_raw_uid(hostile, "SOPInstanceUID", bad)
    good_uid = str(pydicom.dcmread(study.files[0], stop_before_pixels=True).SOPInstanceUID)
    body = b"".join(
        encode_parts("xyzzy", [("application/dicom", [good]), ("application/dicom", [hostile])])
    )
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        response = node.session().post(
            f"{node.dicomweb}/studies",
            data=body,
            headers={"Content-Type": DICOM_PARTS, "Accept": "application/dicom+json"},
        )
        model = response.json()
        result = pydicom.Dataset.from_json(model)
        failed_item = result.FailedSOPSequence[0]
    assert response.status_code == 202, response.text
    assert [item.ReferencedSOPInstanceUID for item in result.ReferencedSOPSequence] == [good_uid]
    assert len(result.FailedSOPSequence) == 1
    assert failed_item.FailureReason == 0xC000
    assert failed_item.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert failed_item.ReferencedSOPInstanceUID == ""  # present, empty: no valid value to give
    assert all(is_valid_uid(value) for value in _ui_values(model)), _ui_values(model)
    assert not [str(w.message)[:200] for w in warned]
    assert not [r for r in caplog.records if r.name.startswith(("pydicom", "pynetdicom"))]
    assert not [r for r in caplog.records if r.exc_info is not None]
    about_it = [r for r in caplog.records if "SOPInstanceUID" in r.getMessage()]
    assert [r.getMessage() for r in about_it] == [
        f"STOW-RS part 1 refused (0xC000): SOPInstanceUID {shown_value(bad)} "
        "is not a valid UID (PS3.5 9.1)"
    ]
    assert about_it[0].name == "nnunet_node.api.dicomweb.stow"
