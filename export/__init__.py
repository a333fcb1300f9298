"""DICOM outputs: segment descriptions, DICOM-SEG (binary, fractional) and RTSTRUCT."""
