"""One router per resource: health probes, models, inference (seed endpoints), jobs."""
