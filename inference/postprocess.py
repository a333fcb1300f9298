"""From probabilities to the label map a stage returns: thresholds, connected components, filters.

With ``proba_threshold`` a voxel is foreground when the largest probability of a kept foreground
class reaches the threshold (it takes that class); without it the label map is the argmax. When any
component filter is asked for, 26-connected components of each label are found and a component is
dropped when

- its maximum probability is under ``min_confidence`` (default: the threshold),
- it is tiny: fewer than :data:`MIN_COMPONENT_VOXELS` voxels, or smaller than
  ``remove_objects_smaller_than`` times the largest component of the label map (any label; the
  reference documents it as a fraction of the maximum object size),
- less than ``min_intersection`` of it lies inside a reference mask (``intersect_with``, or the
  upstream stage's mask in ``cascade_mode: intersect``): coverage of the component, not IoU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

MIN_COMPONENT_VOXELS = 3
_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class ComponentFilter:
    threshold: float | None = None
    min_confidence: float | None = None
    smaller_than: float | None = None
    min_intersection: float = 0.0


def labels_from_probabilities(
    probabilities: np.ndarray, label_values: list[int], threshold: float | None
) -> np.ndarray:
    """Label map from (classes, z, y, x) probabilities whose channel ``i`` is ``label_values[i]``
    (channel 0 background)."""
    values = np.asarray(label_values, dtype=np.uint16)
    if threshold is None:
        labels: np.ndarray = values[np.argmax(probabilities, axis=0)]
        return labels
    if probabilities.shape[0] < 2:
        return np.zeros(probabilities.shape[1:], dtype=np.uint16)
    foreground = probabilities[1:]
    best = np.argmax(foreground, axis=0)
    best_p = np.take_along_axis(foreground, best[None], axis=0)[0]
    out: np.ndarray = values[1:][best]
    out[best_p < threshold] = 0
    return out


def filter_components(
    label_map: np.ndarray,
    probabilities: np.ndarray | None,
    label_values: list[int],
    rules: ComponentFilter,
    masks: list[np.ndarray],
) -> tuple[np.ndarray, dict[str, int]]:
    """Drop components by the module's rules; return the new map and counts of what was dropped."""
    out = label_map.copy()
    dropped = {"confidence": 0, "size": 0, "intersection": 0}
    min_conf = rules.min_confidence if rules.min_confidence is not None else rules.threshold
    found = []
    for channel, value in enumerate(label_values):
        if value == 0:
            continue
        components, count = ndimage.label(label_map == value, structure=_STRUCTURE_26)
        if count:
            index = np.arange(1, count + 1)
            sizes = ndimage.sum_labels(np.ones_like(components), components, index)
            found.append((channel, components, count, index, sizes))
    largest = max((float(f[4].max()) for f in found), default=0.0)
    for channel, components, count, index, sizes in found:
        max_p = (
            ndimage.maximum(probabilities[channel], components, index)
            if probabilities is not None
            else np.ones(count)
        )
        coverage = [ndimage.sum_labels(mask > 0, components, index) / sizes for mask in masks]
        keep = np.ones(count + 1, dtype=bool)
        for k in range(count):
            reason = None
            if min_conf is not None and max_p[k] < min_conf:
                reason = "confidence"
            elif sizes[k] < MIN_COMPONENT_VOXELS or (
                rules.smaller_than is not None and sizes[k] < rules.smaller_than * largest
            ):
                reason = "size"
            elif any(cov[k] < rules.min_intersection or cov[k] == 0 for cov in coverage):
                reason = "intersection"
            if reason:
                keep[k + 1] = False
                dropped[reason] += 1
        if not keep.all():
            out[~keep[components]] = 0
    return out, dropped
