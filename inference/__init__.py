"""nnU-Net inference: the spec and registry, request normalisation, the predictor cache, devices,
cascades."""
