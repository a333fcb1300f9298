"""Routing rules: parsing with clear errors, full-match regexes over series attributes."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.dataset import Dataset

from nnunet_node.core.errors import ConfigError
from nnunet_node.pipeline.routing import RoutingTable, series_attributes

SPEC: dict[str, Any] = {
    "model_folder": "models",
    "models": [],
    "destinations": {"PACS": {"ae_title": "PACS", "host": "127.0.0.1", "port": 11113}},
    "routes": [
        {
            "name": "phantom-ct",
            "match": {
                "Modality": "CT",
                "SeriesDescription": "(?i).*phantom.*",
                "called_ae": "NNUNET_NODE",
            },
            "nnunet_id": "phantom",
            "args": {"tta": False},
            "destinations": ["PACS"],
            "quiet_seconds": 5,
        },
        {"name": "all-mr", "match": {"Modality": "MR"}, "nnunet_id": ["a", "b"], "rerun": False},
    ],
}


def _header(**values: Any) -> Dataset:
    ds = Dataset()
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def test_example_of_the_issue_parses_and_matches() -> None:
    table = RoutingTable.from_spec(SPEC)
    assert table.destinations["PACS"].port == 11113
    route = table.route("phantom-ct")
    assert route is not None and route.quiet_period(10) == 5 and route.rerun
    assert route.request() == {"nnunet_id": "phantom", "is_dicom": True, "tta": False}
    attrs = series_attributes(
        _header(Modality="CT", SeriesDescription="My PHANTOM scan"),
        called_ae="NNUNET_NODE",
        calling_ae="SCANNER",
        keywords=table.match_keywords(),
    )
    assert [r.name for r in table.matching(attrs)] == ["phantom-ct"]
    assert table.route("all-mr").request()["nnunet_id"] == ["a", "b"]  # type: ignore[union-attr]


def test_regexes_match_the_whole_value_and_all_must_match() -> None:
    table = RoutingTable.from_spec(SPEC)
    base = {"Modality": "CT", "SeriesDescription": "phantom", "called_ae": "NNUNET_NODE"}
    assert table.matching(base)
    assert not table.matching({**base, "Modality": "CTX"})  # not a prefix match
    assert not table.matching({**base, "called_ae": "OTHER"})
    assert not table.matching({"Modality": "CT", "called_ae": "NNUNET_NODE"})  # absent = ""


def test_multivalued_attributes_are_backslash_joined() -> None:
    attrs = series_attributes(
        _header(ImageType=["ORIGINAL", "PRIMARY", "AXIAL"]),
        keywords=["ImageType", "BodyPartExamined"],
    )
    assert attrs["ImageType"] == "ORIGINAL\\PRIMARY\\AXIAL"
    assert attrs["BodyPartExamined"] == ""


def test_no_routes_is_an_empty_table() -> None:
    table = RoutingTable.from_spec({"models": []})
    assert table.routes == () and dict(table.destinations) == {}


def test_destination_lookup_by_ae_title() -> None:
    table = RoutingTable.from_spec(SPEC)
    assert table.destination_by_ae("PACS ") is not None
    assert table.destination_by_ae("NOPE") is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"routes": [{"name": "r", "match": {"Modalty": "CT"}, "nnunet_id": "m"}]}, "Modalty"),
        ({"routes": [{"name": "r", "match": {"Modality": "(CT"}, "nnunet_id": "m"}]}, "regular"),
        ({"routes": [{"name": "r", "nnunet_id": "m", "destinations": ["X"]}]}, "'X'"),
        ({"routes": [{"name": "r"}]}, "nnunet_id"),
        ({"routes": [{"name": "r", "nnunet_id": "m", "args": {"study_path": "/x"}}]}, "study_path"),
        ({"routes": [{"name": "r", "nnunet_id": "m", "args": {"bogus": 1}}]}, "bogus"),
        ({"routes": [{"name": "r", "nnunet_id": "m", "args": {"tta": "maybe"}}]}, "tta"),
        ({"routes": [{"name": "r", "nnunet_id": "m", "quiet_seconds": -1}]}, "quiet_seconds"),
        ({"routes": [{"name": "r", "nnunet_id": "m", "colour": 1}]}, "colour"),
        ({"routes": [{"name": "r", "nnunet_id": "m"}, {"name": "r", "nnunet_id": "m"}]}, "earlier"),
        ({"routes": [{"nnunet_id": "m"}]}, "routes[0].name"),
        ({"destinations": {"P": {"ae_title": "P", "host": "h", "port": 0}}}, "destinations.P.port"),
        ({"destinations": {"P": {"ae_title": "A\\B", "host": "h", "port": 1}}}, "ae_title"),
        ({"destinations": {"P": {"host": "h", "port": 1}}}, "ae_title"),
        ({"destinations": ["P"]}, "mapping"),
    ],
)
def test_mistakes_fail_at_load_naming_the_place(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        RoutingTable.from_spec({**SPEC, **change})


def test_unknown_model_is_reported_with_the_rule() -> None:
    table = RoutingTable.from_spec(SPEC)

    def resolve(name: str) -> str:
        if name != "phantom":
            raise KeyError(name)
        return name

    with pytest.raises(ConfigError, match=r"routes\[all-mr\]"):
        table.check_models(resolve)
