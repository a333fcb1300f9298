"""The presentation contexts the node accepts (PS3.8 9.3.2.2, PS3.4 Annexes A, B, C).

Storage takes every storage SOP class pynetdicom knows, in the uncompressed and the common
compressed transfer syntaxes: the node files the bytes as received and never decodes pixels, so a
compressed syntax costs nothing to accept. Storage contexts also accept the SCP role (PS3.7 D.3.3.4)
so that a C-GET requestor can receive its instances over the same association.
"""

from __future__ import annotations

import copy
from typing import Any

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
STORAGE_SYNTAXES = [
    *UNCOMPRESSED,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]
QUERY_RETRIEVE = [
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
]
FIND_MODELS = {
    str(PatientRootQueryRetrieveInformationModelFind): "PATIENT",
    str(StudyRootQueryRetrieveInformationModelFind): "STUDY",
}
MOVE_MODELS = {
    str(PatientRootQueryRetrieveInformationModelMove): "PATIENT",
    str(StudyRootQueryRetrieveInformationModelMove): "STUDY",
}
GET_MODELS = {
    str(PatientRootQueryRetrieveInformationModelGet): "PATIENT",
    str(StudyRootQueryRetrieveInformationModelGet): "STUDY",
}


def add_supported_contexts(ae: AE) -> None:
    """Verification, every storage SOP class (SCU and SCP roles) and Q/R FIND, MOVE, GET.

    (``AE.supported_contexts = [...]`` would drop the roles: pynetdicom copies only the syntaxes.)
    """
    ae.add_supported_context(Verification, UNCOMPRESSED)
    for storage in AllStoragePresentationContexts:
        assert storage.abstract_syntax is not None
        ae.add_supported_context(
            storage.abstract_syntax, STORAGE_SYNTAXES, scu_role=True, scp_role=True
        )
    for uid in QUERY_RETRIEVE:
        ae.add_supported_context(uid, UNCOMPRESSED)


def prefer_requested_syntaxes(event: Any) -> None:
    """``EVT_REQUESTED`` handler: in each proposed presentation context, accept the first transfer
    syntax the requester proposed that the node supports, rather than the first in the node's
    own list (pynetdicom's default).

    A requester lists its syntaxes in its order of preference (dcmtk's ``+xr``, ``+xs``...):
    a C-GET requester that puts RLE Lossless first then receives RLE files as they are stored,
    and a sender of compressed files is not asked to decompress them (PS3.8 9.3.2.2, 9.3.3.2:
    the acceptor picks one of the proposed syntaxes). The supported contexts of abstract syntaxes
    that were not proposed are dropped from this association's list first (negotiation never
    looks at them).
    """
    assoc = event.assoc
    requested = assoc.requestor.primitive.presentation_context_definition_list
    # Only the supported contexts of proposed abstract syntaxes take part in negotiation: the
    # access check and pynetdicom's negotiation then look at a few instead of ~160.
    named = {str(cx.abstract_syntax) for cx in requested}
    supported_contexts = [
        cx for cx in assoc.acceptor.supported_contexts if str(cx.abstract_syntax) in named
    ]
    assoc.acceptor.supported_contexts = supported_contexts
    proposed: dict[str, list[str]] = {}
    for cx in requested:
        if len(cx.transfer_syntax) > 1:
            proposed.setdefault(str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax])
    if not proposed:
        return
    contexts = []
    for cx in supported_contexts:
        order = proposed.get(str(cx.abstract_syntax))
        supported = [str(ts) for ts in cx.transfer_syntax]
        if order and order[0] != supported[0]:
            cx = copy.deepcopy(cx)
            first = [ts for ts in order if ts in supported]
            cx.transfer_syntax = first + [ts for ts in supported if ts not in first]
        contexts.append(cx)
    assoc.acceptor.supported_contexts = contexts
