"""How long the DICOM outputs take on a CT-sized series, against reading that series.

    .venv/bin/python bench/bench_export.py [--slices 120] [--size 512] [--labels 5]

Writes a phantom CT series of ``--slices`` images of ``--size``^2 (non-square) pixels, a label
map of ``--labels`` nested/side-by-side ellipsoids, then times: reading the series with pydicom
(the baseline), the binary SEG, the fractional SEG of two labels, and the RTSTRUCT, each with its
write. Prints wall and CPU seconds and their ratios to the baseline (CPU time is the steadier
figure on a shared machine).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from nnunet_node.core.phantom import Phantom, write_dicom_series
from nnunet_node.export import (
    make_binary_seg,
    make_fractional_seg,
    make_rtstruct,
    parse_metadata,
    write_dataset,
)


def _labels(shape: tuple[int, int, int], count: int) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    labels = np.zeros(shape, dtype=np.uint8)
    for i in range(count):
        angle = 2 * np.pi * i / max(count, 1)
        cy, cx = 0.45 * np.sin(angle), 0.45 * np.cos(angle)
        inside = ((z / 0.8) ** 2 + ((y - cy) / 0.3) ** 2 + ((x - cx) / 0.25) ** 2) <= 1
        labels[inside] = i + 1
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--labels", type=int, default=5)
    args = parser.parse_args()
    shape = (args.slices, args.size, args.size)
    labels = _labels(shape, args.labels)
    rng = np.random.default_rng(0)
    image = np.round(rng.normal(0, 50, shape)).astype(np.float32)
    ph = Phantom(image, labels, (0.7, 0.9, 1.5), (-180.0, -230.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    segments = [
        {"name": f"Structure {i}", "code": f"S{i}", "scheme": "99BENCH", "number": i}
        for i in range(1, args.labels + 1)
    ]
    meta = parse_metadata({"segment_names": segments}, base_dir=Path("."), model_id="bench")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = write_dicom_series(ph, folder / "ct")

        t0, c0 = time.perf_counter(), time.process_time()
        sources = [pydicom.dcmread(p) for p in paths]
        _ = [ds.pixel_array for ds in sources]
        baseline, baseline_cpu = time.perf_counter() - t0, time.process_time() - c0

        def timed(name: str, make) -> None:
            t, c = time.perf_counter(), time.process_time()
            ds = make()
            write_dataset(ds, folder / f"{name}.dcm")
            spent, cpu = time.perf_counter() - t, time.process_time() - c
            size = (folder / f"{name}.dcm").stat().st_size / 1e6
            print(
                f"{name:<16} wall {spent:6.2f} s ({spent / baseline:5.1f}x)  "
                f"cpu {cpu:6.2f} s ({cpu / baseline_cpu:5.1f}x)  {size:7.1f} MB"
            )

        print(
            f"series {shape[0]} x {shape[1]} x {shape[2]}, {args.labels} labels; "
            f"baseline (read the series): wall {baseline:.2f} s, cpu {baseline_cpu:.2f} s"
        )
        timed("binary SEG", lambda: make_binary_seg(labels, sources, meta))
        probabilities = np.stack([(labels == v) * 0.8 for v in (1, 2)]).astype(np.float32)
        timed("fractional SEG", lambda: make_fractional_seg(probabilities, [1, 2], sources, meta))
        timed("RTSTRUCT", lambda: make_rtstruct(labels, sources, meta))


if __name__ == "__main__":
    main()
