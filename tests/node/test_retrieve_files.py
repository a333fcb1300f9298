"""C-GET and C-MOVE send the stored files as they are: dcmtk's getscu and movescu receive data sets
byte-identical to the stored ones (the File Meta aside), in uncompressed and compressed transfer
syntaxes; a requester that accepts only Implicit VR Little Endian gets what can be converted and
a failure count (and Failed SOP Instance UID List) for the rest."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    RLELossless,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
)

from nnunet_node.core.phantom import make_phantom, write_dicom_series
from nnunet_node.node.ae import DicomNode
from nnunet_node.pipeline.stored_send import data_set_offset
from nnunet_node.storage.archive import Archive
from tests.node.peers import free_port, received
from tests.support.dcmtk import dcmtk, get_series, retrieve
from tests.support.dimse import NodeFactory

# One series per stored transfer syntax, and the dcmtk tool that makes it from Explicit VR LE.
SYNTAXES = {
    "explicit": (ExplicitVRLittleEndian, None),
    "implicit": (ImplicitVRLittleEndian, ["dcmconv", "+ti"]),
    "rle": (RLELossless, ["dcmcrle"]),
    "jpeg-lossless": (JPEGLosslessSV1, ["dcmcjpeg", "+e1"]),
}


@dataclass
class Corpus:
    node: DicomNode
    move_port: int
    study_uid: str
    series: dict[str, str]
    """Series Instance UID by SYNTAXES key."""
    files: dict[str, Path]
    """The stored file by SOP Instance UID (in the archive)."""


def _data_set(path: Path) -> bytes:
    """The bytes after the File Meta Information."""
    data = path.read_bytes()
    return data[data_set_offset(path) :]


@pytest.fixture
def corpus(start_node: NodeFactory, archive: Archive, tmp_path: Path) -> Corpus:
    move_port = free_port()
    study_uid = pydicom.uid.generate_uid()
    series: dict[str, str] = {}
    for number, (name, (syntax, tool)) in enumerate(SYNTAXES.items(), start=1):
        series_uid = pydicom.uid.generate_uid()
        paths = write_dicom_series(
            make_phantom(number, shape=(12, 40, 40), spacing=(1.0, 1.0, 3.0)),
            tmp_path / "made" / name,
            study_uid=study_uid,
            series_uid=series_uid,
            series_number=number,
        )
        for path in paths[:3]:
            if tool is not None:
                result = dcmtk(*tool, str(path), str(path))
                assert result.returncode == 0, result.stdout
            assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
            archive.ingest(path.read_bytes(), source="test")
        series[name] = series_uid
    node = start_node(
        routing={
            "destinations": {
                "MOVESCU": {"ae_title": "MOVESCU", "host": "127.0.0.1", "port": move_port}
            }
        }
    )
    files = {p.stem: p for p in archive.root.rglob("*.dcm")}
    assert len(files) == 3 * len(SYNTAXES)
    return Corpus(node, move_port, study_uid, series, files)


def _check_identical(corpus: Corpus, got: list[Path], syntax: str) -> None:
    """Every file in ``got`` carries the stored data set byte for byte, in ``syntax``."""
    for path in got:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        stored = corpus.files[str(ds.SOPInstanceUID)]
        assert ds.file_meta.TransferSyntaxUID == syntax, path
        assert _data_set(path) == _data_set(stored), f"{path} differs from {stored}"


@pytest.mark.parametrize(
    ("name", "preference"),
    [("explicit", "+xe"), ("rle", "+xr"), ("jpeg-lossless", "+xs")],
)
def test_getscu_receives_the_stored_bytes(
    corpus: Corpus, tmp_path: Path, name: str, preference: str
) -> None:
    keys = {
        "QueryRetrieveLevel": "SERIES",
        "StudyInstanceUID": corpus.study_uid,
        "SeriesInstanceUID": corpus.series[name],
    }
    got = get_series(corpus.node.port, tmp_path / "got", keys, "-S", preference, "+B")
    assert got.returncode == 0, got.output
    assert _final_get(got.output) == ("Success", {"Completed": 3, "Failed": 0, "Warning": 0})
    assert len(got.files) == 3
    _check_identical(corpus, got.files, SYNTAXES[name][0])


def _move_study(corpus: Corpus, out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """C-MOVE the whole study with dcmtk's movescu to its own storage SCP (AE MOVESCU, the
    corpus's move port), which writes each file into ``out`` (made here) as received (``+B``);
    ``options``: which transfer syntaxes that SCP accepts (``+xa`` any, ``+xi`` Implicit VR
    Little Endian only), ``-d``..."""
    out.mkdir()
    return retrieve(
        "movescu",
        corpus.node.port,
        "-S",
        *("-aet", "MOVESCU", "-aem", "MOVESCU", "+P", str(corpus.move_port), "+B"),
        *options,
        "-od",
        str(out),
        cwd=out,
        QueryRetrieveLevel="STUDY",
        StudyInstanceUID=corpus.study_uid,
    )


def test_movescu_receives_every_syntax_as_stored(corpus: Corpus, tmp_path: Path) -> None:
    """One C-MOVE of the whole study: the node proposes a context per stored syntax, movescu's
    storage SCP (accepting every syntax dcmtk knows) takes each, and each file arrives as stored."""
    out = tmp_path / "moved"
    result = _move_study(corpus, out, "+xa", "-d")
    assert result.returncode == 0, result.stdout
    final = re.split(r"Message Type\s*: C-MOVE RSP", result.stdout)[-1]
    assert re.search(r"DIMSE Status\s*: 0x0000: Success", final), result.stdout[-3000:]
    got = received(out)
    assert len(got) == len(corpus.files), result.stdout[-3000:]
    for path in got:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        stored = corpus.files[str(ds.SOPInstanceUID)]
        assert ds.file_meta.TransferSyntaxUID == pydicom.dcmread(stored).file_meta.TransferSyntaxUID
        assert _data_set(path) == _data_set(stored), f"{path} differs from {stored}"
    # PS3.7 9.1.1.1: the originator is the AE that asked for the C-MOVE, not the node
    originators = re.findall(r"Move Originator AE Title\s*:\s*(\S+)", result.stdout)
    assert originators == ["MOVESCU"] * len(got), result.stdout[-3000:]


def _final_get(output: str) -> tuple[str, dict[str, int]]:
    """getscu's last C-GET response status and its sub-operation counts."""
    statuses = re.findall(r"Received C-GET Response \((\w+)\)", output)
    assert statuses, output
    final = output.split("Final status report")[-1]
    counts = {}
    for key in ("Completed", "Failed", "Warning"):
        match = re.search(rf"Number of {key} Suboperations\s*:\s*(\d+)", final)
        assert match, output
        counts[key] = int(match.group(1))
    return statuses[-1], counts


def _implicit_only_outcome(corpus: Corpus) -> tuple[int, set[str]]:
    """How many instances cannot reach an Implicit VR Little Endian peer, and their UIDs: the
    JPEG Lossless ones unless a decoder for it is installed (pydicom decodes RLE itself)."""
    jpeg = {
        sop
        for sop, path in corpus.files.items()
        if pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID
        == corpus.series["jpeg-lossless"]
    }
    if get_decoder(JPEGLosslessSV1).is_available:
        return 0, set()
    return len(jpeg), jpeg


def _check_converted(corpus: Corpus, datasets: list[Dataset], failed_uids: set[str]) -> None:
    """Each received instance is Implicit VR LE with the stored pixels; implicit files are sent
    byte for byte; none of those that cannot convert came."""
    for ds in datasets:
        sop = str(ds.SOPInstanceUID)
        assert sop not in failed_uids
        assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        stored = pydicom.dcmread(corpus.files[sop])
        assert np.array_equal(ds.pixel_array, stored.pixel_array)


def test_implicit_only_move_destination(corpus: Corpus, tmp_path: Path) -> None:
    """movescu's storage SCP accepting only Implicit VR Little Endian: Explicit VR files are
    re-encoded, RLE files decompressed, implicit ones sent as stored; JPEG Lossless files are
    failed sub-operations when no decoder is installed."""
    out = tmp_path / "moved"
    result = _move_study(corpus, out, "+xi")
    failed, failed_uids = _implicit_only_outcome(corpus)
    assert result.returncode == 0 or failed, result.stdout  # movescu exits non-zero on Warning
    final = "Warning: SubOperationsCompleteOneOrMoreFailures" if failed else "Success"
    assert f"Received Final Move Response ({final})" in result.stdout, result.stdout
    got = received(out)
    assert len(got) == len(corpus.files) - failed
    _check_converted(corpus, [pydicom.dcmread(p) for p in got], failed_uids)
    implicit = [p for p in got if pydicom.dcmread(p).SeriesInstanceUID == corpus.series["implicit"]]
    assert len(implicit) == 3
    _check_identical(corpus, implicit, ImplicitVRLittleEndian)


def test_implicit_only_get_requester(corpus: Corpus) -> None:
    """A C-GET requester (pynetdicom) proposing CT Image Storage in Implicit VR Little Endian
    only: the final response counts completed and failed sub-operations and lists the failed
    SOP Instance UIDs (PS3.4 C.4.3.1.3.2: Warning, Failed SOP Instance UID List)."""
    got: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        got.append(ds)
        return 0x0000

    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [ImplicitVRLittleEndian])
    assoc = ae.associate(
        "127.0.0.1",
        corpus.node.port,
        ae_title="NNUNET_NODE",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = corpus.study_uid
    try:
        responses = list(assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    status, final_identifier = responses[-1]
    failed, failed_uids = _implicit_only_outcome(corpus)
    assert status.Status == (0xB000 if failed else 0x0000)
    assert status.NumberOfCompletedSuboperations == len(corpus.files) - failed
    assert status.NumberOfFailedSuboperations == failed
    if failed:
        listed = final_identifier.FailedSOPInstanceUIDList
        assert set([listed] if isinstance(listed, str) else listed) == failed_uids
    assert len(got) == len(corpus.files) - failed
    _check_converted(corpus, got, failed_uids)
