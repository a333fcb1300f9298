"""The FastAPI app factory (composition root), the reference endpoints, job history and DICOMweb."""
