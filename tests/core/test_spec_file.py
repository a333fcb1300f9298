"""The one schema of model-serve-spec.yaml: every part validated once, errors naming the place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from nnunet_node.core.errors import ConfigError
from nnunet_node.core.spec import (
    NODE_FILLED_FIELDS,
    PER_REQUEST_FIELDS,
    DestinationEntry,
    MetadataEntry,
    PeerEntry,
    RouteEntry,
    SpecFile,
)

REPO = Path(__file__).resolve().parents[2]


def test_the_repository_spec_is_typed_all_the_way_down() -> None:
    spec = SpecFile.read(REPO / "model-serve-spec.yaml")
    phantom = spec.models[0]
    assert phantom.id == "phantom" and phantom.min_mem == 500
    assert isinstance(phantom.metadata, MetadataEntry)
    segments = phantom.metadata.segment_names
    assert segments is not None and [s.number for s in segments] == [1, 2]
    assert segments[1].label == "Cube" and segments[1].scheme == "99NNUNODE"
    assert segments[1].category is not None and segments[1].category.code == "260787004"
    assert isinstance(spec.destinations["PACS"], DestinationEntry)
    assert spec.destinations["PACS"].port == 11113
    route = spec.routes[0]
    assert isinstance(route, RouteEntry) and route.destinations == ("PACS",)
    assert route.matches({"Modality": "CT", "SeriesDescription": "Phantom 1"})
    assert not route.matches({"Modality": "CT", "SeriesDescription": "Liver"})
    assert spec.peers == []


def test_peers_declare_ae_host_port_tls_and_operations() -> None:
    spec = SpecFile.parse(
        {
            "peers": [
                {"ae_title": "SCANNER", "host": "10.0.0.5", "operations": ["store"]},
                {"ae_title": "PACS", "host": "pacs", "port": 104, "tls": True},
            ],
            "destinations": {"PACS": {"ae_title": "PACS", "host": "pacs", "port": 104}},
        }
    )
    scanner, pacs = spec.peers
    assert isinstance(scanner, PeerEntry)
    assert scanner.operations == {"store"} and scanner.port is None and scanner.tls is False
    assert pacs.operations == {"store", "find", "get", "move"} and pacs.tls is True
    # destinations stay valid beside peers
    assert spec.destinations["PACS"].ae_title == "PACS"


@pytest.mark.parametrize(
    ("peers", "message"),
    [
        ([{"ae_title": "X", "host": "h", "operations": ["fetch"]}], r"peers\[X\]\.operations"),
        ([{"ae_title": "X", "host": "h", "port": 70000}], r"peers\[X\]\.port"),
        ([{"ae_title": "X", "host": "h", "tls": "yes"}], r"peers\[X\]\.tls"),
        ([{"host": "h"}], r"peers\[0\]\.ae_title: required"),
        ([{"ae_title": "X", "host": "h"}, {"ae_title": "X", "host": "i"}], r"peers\[X\].*twice"),
        ([{"ae_title": "X", "host": "h", "aet": "Y"}], r"peers\[X\]: unknown key\(s\) 'aet'"),
    ],
)
def test_bad_peers_are_refused_naming_the_peer(peers: list[Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SpecFile.parse({"peers": peers})


def test_the_fields_the_node_fills_are_one_list() -> None:
    # default_args cannot set any per-request field; a rule cannot set what the node fills, but
    # may set series_folders (placeholders for a cascade).
    assert NODE_FILLED_FIELDS < PER_REQUEST_FIELDS
    for field in sorted(PER_REQUEST_FIELDS):
        with pytest.raises(ConfigError, match=rf"model 'm': default_args cannot set {field}"):
            SpecFile.parse({"models": [{"id": "m", "rel_path": "m", "default_args": {field: 1}}]})
    for field in sorted(NODE_FILLED_FIELDS | {"nnunet_id"}):
        with pytest.raises(ConfigError, match=rf"routes\[r\]\.args: {field}: set by the node"):
            SpecFile.parse({"routes": [{"name": "r", "nnunet_id": "m", "args": {field: "x"}}]})
    route = SpecFile.parse(
        {"routes": [{"name": "r", "nnunet_id": "m", "args": {"series_folders": ["{series}"]}}]}
    ).routes[0]
    assert route.args == {"series_folders": ["{series}"]}


def test_every_problem_is_reported_at_once_naming_its_place(tmp_path: Path) -> None:
    raw = {
        "model_folder": "models",
        "models": [
            {
                "id": "liver",
                "rel_path": "liver",
                "min_mem": True,
                "metadata": {"segment_names": ["Liver", {"name": "Tumour", "number": 0}]},
            }
        ],
        "routes": [{"name": "ct", "nnunet_id": "liver", "quiet_seconds": "soon"}],
        "modles": [],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        SpecFile.read(path)
    text = str(info.value)
    assert "unknown key(s) 'modles' (allowed: destinations, model_folder, models, peers, " in text
    assert "model 'liver': min_mem: must be an integer, got True" in text
    assert (
        "model 'liver' metadata, segment 2 ('Tumour'): number: label number must be 1..65535"
        in (text)
    )
    assert "routes[ct].quiet_seconds: 'soon' is not a number >= 0" in text


def test_text_values_follow_the_dicom_value_rules() -> None:
    entry = MetadataEntry.model_validate(
        {"segment_names": ["Liver"], "algorithm_version": 2.1, "content_label": "my label"}
    )
    assert entry.algorithm_version == "2.1"  # a YAML number is taken as its text
    assert entry.content_label == "MY_LABEL"
    with pytest.raises(ValueError, match="at most 64 characters"):
        MetadataEntry.model_validate({"segment_names": ["Liver"], "manufacturer": "x" * 65})
    with pytest.raises(ValueError, match="backslash"):
        DestinationEntry.model_validate({"ae_title": "A\\B", "host": "h", "port": 1})
