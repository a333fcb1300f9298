"""DICOM outputs: segment descriptions, DICOM-SEG (binary, fractional) and RTSTRUCT.

Knows nothing of HTTP, DIMSE or SQL: takes arrays in a source series' geometry, the source
datasets and the model's metadata, and returns pydicom datasets.
"""

from nnunet_node.export.files import check_suffix, dicom_output_name, write_dataset
from nnunet_node.export.metadata import SegmentationMetadata, SegmentInfo, parse_metadata
from nnunet_node.export.rtstruct import make_rtstruct
from nnunet_node.export.seg import make_binary_seg, make_fractional_seg
from nnunet_node.export.stage import StageDicomOutputs, read_sources, write_stage_dicom

__all__ = [
    "SegmentInfo",
    "SegmentationMetadata",
    "StageDicomOutputs",
    "check_suffix",
    "dicom_output_name",
    "make_binary_seg",
    "make_fractional_seg",
    "make_rtstruct",
    "parse_metadata",
    "read_sources",
    "write_dataset",
    "write_stage_dicom",
]
