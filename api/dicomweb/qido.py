"""QIDO-RS, the Search transaction (PS3.18 10.6): studies, series and instances, DICOM JSON.

Matching is :mod:`storage.query`'s (the same as C-FIND's, PS3.4 C.2.2.2). This module maps the
resource and query string onto it and chooses the returned attributes: the defaults of PS3.18
Tables 10.6.3-3 to 10.6.3-5 that the index holds, the matching keys, ``includefield`` additions
(``all`` is every attribute the index holds at the levels in scope), and a Retrieve URL per result.

No match is ``200`` with an empty array ``[]`` (PS3.18 10.6.3: the response is the list of
results, here of none); clients such as dicomweb-client and OHIF treat it like ``204``.
A matching key the index does not hold is not matched on, and a ``Warning: 299`` header names it
(PS3.18 8.3.4.4 lets the origin server ignore unsupported keys if it says so).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from nnunet_node.api.deps import ContextDep
from nnunet_node.api.dicomweb.common import (
    check_uid,
    context_parts,
    instance_url,
    series_url,
    service_url,
)
from nnunet_node.api.dicomweb.common import study_url as make_study_url
from nnunet_node.api.dicomweb.dicom_json import MEDIA_TYPE, row_to_json
from nnunet_node.api.dicomweb.negotiate import wants_json
from nnunet_node.api.dicomweb.qido_params import QidoParams, parse_qido
from nnunet_node.storage.query import (
    ATTRIBUTES,
    COMPUTED,
    find_instances,
    find_series,
    find_studies,
)

LOGGER = logging.getLogger(__name__)

router = APIRouter()

Level = Literal["study", "series", "instance"]

_LEVELS: dict[Level, tuple[str, ...]] = {
    "study": ("PATIENT", "STUDY"),
    "series": ("PATIENT", "STUDY", "SERIES"),
    "instance": ("PATIENT", "STUDY", "SERIES", "IMAGE"),
}
_STUDY_DEFAULTS = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "InstanceAvailability",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
_SERIES_DEFAULTS = (
    "StudyInstanceUID",
    "Modality",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "BodyPartExamined",
    "NumberOfSeriesRelatedInstances",
)
_INSTANCE_DEFAULTS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceAvailability",
    "InstanceNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
)
# PS3.18 Table 10.6.3-4/-5: a search over all series (instances) returns the study (and series)
# attributes of each result too; one scoped to a study (series) need not.
_DEFAULTS: dict[tuple[Level, int], tuple[str, ...]] = {
    ("study", 0): _STUDY_DEFAULTS,
    ("series", 0): _STUDY_DEFAULTS + _SERIES_DEFAULTS,
    ("series", 1): _SERIES_DEFAULTS,
    ("instance", 0): _STUDY_DEFAULTS + _SERIES_DEFAULTS + _INSTANCE_DEFAULTS,
    ("instance", 1): _SERIES_DEFAULTS + _INSTANCE_DEFAULTS,
    ("instance", 2): _INSTANCE_DEFAULTS,
}
_FINDERS: dict[Level, Callable[..., list[dict[str, Any]]]] = {
    "study": find_studies,
    "series": find_series,
    "instance": find_instances,
}
_STUDY_COMPUTED_KEYS = ("ModalitiesInStudy", "SOPClassesInStudy")


def _matchable(level: Level) -> set[str]:
    levels = _LEVELS[level]
    names = {kw for kw, attr in ATTRIBUTES.items() if attr.level in levels}
    return names | set(_STUDY_COMPUTED_KEYS)


def _all_fields(level: Level) -> list[str]:
    levels = _LEVELS[level]
    fields = [kw for kw, attr in ATTRIBUTES.items() if attr.level in levels]
    for lvl in levels:
        fields.extend(COMPUTED[lvl])  # type: ignore[index]
    return [*fields, "InstanceAvailability"]


def _returned_keys(level: Level, scope: int, params: QidoParams) -> list[str]:
    keys: list[str] = list(_DEFAULTS[(level, scope)])
    if params.include_all:
        keys.extend(_all_fields(level))
    keys.extend(sorted(params.includefields))
    keys.extend(params.filters)
    seen: set[str] = set()
    return [k for k in keys if not (k in seen or seen.add(k))]  # type: ignore[func-returns-value]


def _search(
    factory: sessionmaker[Session],
    level: Level,
    filters: dict[str, str],
    params: QidoParams,
    keys: list[str],
) -> list[dict[str, Any]]:
    with factory() as session:
        return _FINDERS[level](
            session,
            filters,
            limit=params.limit,
            offset=params.offset,
            fuzzy=params.fuzzy,
            include=keys,
        )


def _retrieve_url(base: str, level: Level, row: dict[str, Any]) -> str:
    study = row.get("StudyInstanceUID", "")
    if level == "study":
        return make_study_url(base, study)
    if level == "series":
        return series_url(base, study, row.get("SeriesInstanceUID", ""))
    return instance_url(
        base, study, row.get("SeriesInstanceUID", ""), row.get("SOPInstanceUID", "")
    )


async def _qido(
    request: Request,
    context: Any,
    level: Level,
    *,
    study: str | None = None,
    series: str | None = None,
) -> Response:
    wants_json(request.headers.get("accept"))
    params = parse_qido(request.query_params.multi_items())
    filters = dict(params.filters)
    scope = 0
    if study is not None:
        filters["StudyInstanceUID"] = check_uid(study, "StudyInstanceUID")
        scope = 1
    if series is not None:
        filters["SeriesInstanceUID"] = check_uid(series, "SeriesInstanceUID")
        scope = 2
    ignored = sorted(set(params.filters) - _matchable(level))
    keys = _returned_keys(level, scope, params)
    _, factory, _ = context_parts(context)
    rows = await run_in_threadpool(_search, factory, level, filters, params, keys)
    base = service_url(request)
    results = []
    for row in rows:
        model = row_to_json(row, keys)
        model["00081190"] = {"vr": "UR", "Value": [_retrieve_url(base, level, row)]}
        results.append(dict(sorted(model.items())))
    headers = {}
    if ignored:
        headers["Warning"] = (
            f'299 nnunet-node "The following attributes are not supported for matching at this '
            f'level and were ignored: {", ".join(ignored)}"'
        )
    # orjson: the bytes JSONResponse would send (compact, UTF-8), written ~8x faster
    return Response(orjson.dumps(results), media_type=MEDIA_TYPE, headers=headers)


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Matching results (DICOM JSON array; [] when none)"},
    400: {"description": "Malformed query (unknown attribute, bad range, bad limit or offset)"},
    406: {"description": "Only application/dicom+json is served"},
}
_PARAMS_DOC = (
    "Query keys by keyword or tag (PatientID=P*, 00100020=P*, StudyDate=20200101-20201231,"
    " StudyInstanceUID=1.2,1.3), includefield (keywords, tags or all), limit, offset,"
    " fuzzymatching. Answers application/dicom+json; [] when nothing matches."
)


_ROUTE: dict[str, Any] = {
    "responses": _RESPONSES,
    "response_class": JSONResponse,
    "description": _PARAMS_DOC,
}


@router.get("/studies", **_ROUTE)
async def search_studies(request: Request, context: ContextDep) -> Response:
    """QIDO-RS: search for studies."""
    return await _qido(request, context, "study")


@router.get("/series", **_ROUTE)
async def search_series(request: Request, context: ContextDep) -> Response:
    """QIDO-RS: search for series in all studies."""
    return await _qido(request, context, "series")


@router.get(
    "/instances", responses=_RESPONSES, response_class=JSONResponse, description=_PARAMS_DOC
)
async def search_instances(request: Request, context: ContextDep) -> Response:
    """QIDO-RS: search for instances in all studies."""
    return await _qido(request, context, "instance")


@router.get(
    "/studies/{study}/series",
    **_ROUTE,
)
async def search_study_series(request: Request, context: ContextDep, study: str) -> Response:
    """QIDO-RS: search for series of one study."""
    return await _qido(request, context, "series", study=study)


@router.get(
    "/studies/{study}/instances",
    **_ROUTE,
)
async def search_study_instances(request: Request, context: ContextDep, study: str) -> Response:
    """QIDO-RS: search for instances of one study."""
    return await _qido(request, context, "instance", study=study)


@router.get(
    "/studies/{study}/series/{series}/instances",
    **_ROUTE,
)
async def search_series_instances(
    request: Request, context: ContextDep, study: str, series: str
) -> Response:
    """QIDO-RS: search for instances of one series."""
    return await _qido(request, context, "instance", study=study, series=series)
