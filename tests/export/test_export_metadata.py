"""parse_metadata: the inline form, dcmqi templates, and errors that name model and segment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nnunet_node.core.errors import ConfigError, ExportError
from nnunet_node.export.metadata import PALETTE, parse_metadata

DCMQI_TEMPLATE = {
    "ContentCreatorName": "Reader1",
    "SeriesDescription": "Prostate lesion",
    "SeriesNumber": "300",
    "InstanceNumber": "1",
    "BodyPartExamined": "Prostate",
    "ClinicalTrialSeriesID": "Session1",
    "segmentAttributes": [
        [
            {
                "labelID": 1,
                "SegmentDescription": "Lesion",
                "SegmentAlgorithmType": "AUTOMATIC",
                "SegmentLabel": "Lesion",
                "SegmentAlgorithmName": "LesionUNet",
                "AnatomicRegionSequence": {
                    "CodeValue": "41216001",
                    "CodingSchemeDesignator": "SCT",
                    "CodeMeaning": "Prostate",
                },
                "SegmentedPropertyCategoryCodeSequence": {
                    "CodeValue": "49755003",
                    "CodingSchemeDesignator": "SCT",
                    "CodeMeaning": "Morphologically Altered Structure",
                },
                "SegmentedPropertyTypeCodeSequence": {
                    "CodeValue": "108369006",
                    "CodingSchemeDesignator": "SCT",
                    "CodeMeaning": "Neoplasm",
                },
                "recommendedDisplayRGBValue": [254, 28, 29],
            },
            {
                "labelID": 3,
                "SegmentLabel": "Left kidney",
                "SegmentedPropertyCategoryCodeSequence": {
                    "CodeValue": "91723000",
                    "CodingSchemeDesignator": "SCT",
                    "CodeMeaning": "Anatomical Structure",
                },
                "SegmentedPropertyTypeCodeSequence": {
                    "CodeValue": "64033007",
                    "CodingSchemeDesignator": "SCT",
                    "CodeMeaning": "Kidney",
                },
                "SegmentedPropertyTypeModifierCodeSequence": {
                    "CodeValue": "7771000",
                    "CodingSchemeDesignator": "SCT",
                    "CodeMeaning": "Left",
                },
            },
        ]
    ],
}


def test_inline_names_are_snomed_concepts_with_laterality_as_modifier() -> None:
    meta = parse_metadata(
        {
            "algorithm_name": "TotalSegmentator",
            "algorithm_version": "v1.0",
            "manufacturer": "TotalSegmentator",
            "series_description": "Organs",
            "body_part_examined": "Abdomen",
            "segment_names": ["Spleen", "Right Kidney", "Left AdrenalGland", "Neoplasm"],
        },
        base_dir=Path("."),
        model_id="organs",
        labels=[0, 1, 2, 3, 4],
    )
    assert meta.algorithm_name == "TotalSegmentator"
    assert meta.series_description == "Organs"
    assert meta.body_part_examined == "ABDOMEN"
    spleen, kidney, adrenal, neoplasm = (meta.segment(v) for v in (1, 2, 3, 4))
    assert (spleen.type.value, spleen.type.scheme, spleen.type.meaning) == (
        "78961009",
        "SCT",
        "Spleen",
    )
    assert spleen.category.meaning == "Anatomical Structure"
    assert kidney.label == "Right Kidney"
    assert kidney.type.meaning == "Kidney"
    assert kidney.type_modifier is not None and kidney.type_modifier.value == "24028007"
    assert adrenal.type_modifier is not None and adrenal.type_modifier.meaning == "Left"
    # A lesion type falls in the "Morphologically Altered Structure" category (CID 7159).
    assert neoplasm.category.value == "49755003"
    # Colours: the fixed palette, by label value.
    assert [meta.segment(v).rgb for v in (1, 2, 3, 4)] == list(PALETTE[:4])


def test_inline_dicts_with_codes_numbers_and_categories() -> None:
    meta = parse_metadata(
        {
            "segment_names": [
                {"name": "Cyst", "label": "Left KidneyCyst", "code": "367643001", "number": 5},
                {
                    "name": "Sphere",
                    "code": "SPH",
                    "scheme": "99LOCAL",
                    "tracking_id": "sphere-1",
                    "category": {
                        "code": "260787004",
                        "scheme": "SCT",
                        "meaning": "Physical object",
                    },
                    "color": [1, 2, 3],
                },
                {"name": "Liver", "number": 7, "category": "Tissue"},
            ]
        },
        base_dir=Path("."),
        model_id="m",
    )
    assert sorted(meta.segments) == [2, 5, 7]
    cyst = meta.segment(5)
    assert (cyst.label, cyst.type.value, cyst.type.meaning) == (
        "Left KidneyCyst",
        "367643001",
        "Cyst",
    )
    sphere = meta.segment(2)
    assert (sphere.type.scheme, sphere.tracking_id, sphere.rgb) == (
        "99LOCAL",
        "sphere-1",
        (1, 2, 3),
    )
    assert meta.segment(7).category.meaning == "Tissue"


def test_dcmqi_template_relative_to_the_spec_folder(tmp_path: Path) -> None:
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "lesion.json").write_text(json.dumps(DCMQI_TEMPLATE))
    meta = parse_metadata(
        {"path": "meta/lesion.json", "algorithm_version": "2.1"},
        base_dir=tmp_path,
        model_id="lesion",
        labels=[1, 3],
    )
    assert meta.series_description == "Prostate lesion"
    assert meta.series_number == 300
    assert meta.body_part_examined == "PROSTATE"
    assert meta.algorithm_name == "LesionUNet"
    assert meta.algorithm_version == "2.1"
    assert meta.content_creator_name == "Reader1"
    lesion = meta.segment(1)
    assert lesion.rgb == (254, 28, 29)
    assert lesion.description == "Lesion"
    assert lesion.anatomic_region is not None and lesion.anatomic_region.meaning == "Prostate"
    kidney = meta.segment(3)
    assert kidney.type_modifier is not None and kidney.type_modifier.meaning == "Left"
    assert kidney.rgb == PALETTE[2]
    # A plain string is a template path as well.
    assert parse_metadata("meta/lesion.json", base_dir=tmp_path, model_id="x").segments.keys() == {
        1,
        3,
    }


def test_same_metadata_twice_is_equal() -> None:
    raw = {"segment_names": ["Liver", "Spleen"]}
    one = parse_metadata(raw, base_dir=Path("."), model_id="m")
    two = parse_metadata(raw, base_dir=Path("."), model_id="m")
    assert one == two


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, "model 'bad' metadata: missing"),
        ({"segment_names": ["Livr"]}, "segment 1 \\('Livr'\\).*close matches: \\['Liver'\\]"),
        ({"segment_names": ["Liver", {"name": "Sphere"}]}, "segment 2 \\('Sphere'\\)"),
        ({"segment_names": [{"code": "1", "scheme": "99X"}]}, "segment 1 .*needs a 'meaning'"),
        ({"segment_names": ["Liver", {"name": "Spleen", "number": 1}]}, "described twice"),
        (
            {"segment_names": [{"name": "Liver", "color": [300, 0, 0]}]},
            "segment 1 \\('Liver'\\): color: must be three",
        ),
        ({"segment_names": ["Liver"], "body_part_examined": "a very long body part"}, "16"),
        (
            {"segment_names": ["Liver"], "segmentnames": []},
            "unknown key\\(s\\) 'segmentnames' \\(allowed: ",
        ),
        ({"segment_names": [{"name": "Liver", "colour": [1, 2, 3], "lable": "x"}]}, "'lable'"),
        ({"segment_names": []}, "non-empty list"),
        ({"algorithm_name": "x"}, "needs 'path'"),
        ({"path": "nowhere.json"}, "cannot read the template"),
    ],
)
def test_bad_metadata_names_model_and_segment(raw: object, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        parse_metadata(raw, base_dir=Path("/nonexistent"), model_id="bad")  # type: ignore[arg-type]
    assert "model 'bad'" in str(info.value)


def test_bad_template_content(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_metadata({"path": "broken.json"}, base_dir=tmp_path, model_id="m")
    template = json.loads(json.dumps(DCMQI_TEMPLATE))
    del template["segmentAttributes"][0][1]["SegmentedPropertyTypeCodeSequence"]
    (tmp_path / "t.json").write_text(json.dumps(template))
    with pytest.raises(ConfigError, match=r"segment 2 \('Left kidney'\).*SegmentedPropertyType"):
        parse_metadata({"path": "t.json"}, base_dir=tmp_path, model_id="m")


def test_model_labels_without_a_segment_fail_at_load() -> None:
    with pytest.raises(ConfigError, match=r"model 'm' metadata: label\(s\) \[3\]"):
        parse_metadata(
            {"segment_names": ["Liver", "Spleen"]},
            base_dir=Path("."),
            model_id="m",
            labels=[0, 1, 2, 3],
        )


def test_unknown_label_at_export_time_is_a_clear_error() -> None:
    meta = parse_metadata({"segment_names": ["Liver"]}, base_dir=Path("."), model_id="m")
    with pytest.raises(ExportError, match="model 'm': label 4 has no segment"):
        meta.segment(4)
