"""What the kept HTTP contract (``docs/reference-contract.md``) promises, written down once for
the tests that check it, independently of the code that fills it."""

from __future__ import annotations

RESULT_FIELDS = frozenset(
    {
        "time_elapsed",
        "nnunet_path",
        "metadata",
        "request",
        "status",
        "nifti_prediction",
        "nifti_proba",
        "nifti_inputs",
        "dicom_segmentation",
        "dicom_struct",
        "dicom_fractional_segmentation",
    }
)
"""The keys of a finished inference's result (``POST /infer``'s answer, a job's ``result``)."""
