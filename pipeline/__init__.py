"""The job queue and workers, series completion, routing rules and dispatch to destinations."""
