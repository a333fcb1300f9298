"""What the series geometry check adds to reading a CT series.

    .venv/bin/python bench/bench_series_check.py [--slices 400] [--size 512] [--repeats 3]

Writes a CT series of ``--slices`` images of ``--size``^2 int16 pixels (~200 MB at the default
512x512x400) in a temporary folder, deleted afterwards: one slice by ``core.phantom``'s DICOM
writer, cloned with its own SOPInstanceUID, position and pixels. Then times, best of
``--repeats``, with the files in the page cache:

- the baseline: reading the series as the runner does, from the kept file list
  (``volumes.read_dicom_volume``: GDCM through SimpleITK, rescaled pixels, 3D image);
- the check: ``series_check.check_series_folder`` (every file's header scanned, the decisions).

For reference it also times what the node did before the check: GDCM's own series sort
(``GetGDCMSeriesIDs`` + ``GetGDCMSeriesFileNames``), which the check replaces. Prints wall and CPU
seconds and the ratio check / read; the target is at most 5 %.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.uid import generate_uid

from nnunet_node.core.phantom import Phantom, write_dicom_series
from nnunet_node.inference.series_check import check_series_folder
from nnunet_node.inference.volumes import read_dicom_volume

TARGET = 0.05


def write_series(folder: Path, slices: int, size: int, spacing: float = 1.0) -> None:
    """A ``slices`` x ``size`` x ``size`` CT series in ``folder``."""
    template = Phantom(
        np.zeros((1, size, size), dtype=np.float32),
        np.zeros((1, size, size), dtype=np.uint8),
        (0.7, 0.7, spacing),
        (-180.0, -180.0, 0.0),
        (1, 0, 0, 0, 1, 0, 0, 0, 1),
    )
    (first,) = write_dicom_series(template, folder / "template")
    ds = pydicom.dcmread(first)
    rng = np.random.default_rng(0)
    noise = rng.integers(900, 1200, size=(size, size), dtype=np.int16)
    for k in range(slices):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-180.0, -180.0, k * spacing]
        ds.SliceLocation = k * spacing
        ds.PixelData = np.roll(noise, k, axis=0).tobytes()
        ds.save_as(folder / "ct" / f"CT{k + 1:04d}.dcm", enforce_file_format=True)
    first.unlink()
    (folder / "template").rmdir()


def best(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """Best wall and CPU seconds of ``repeats`` calls, and the last result."""
    wall, cpu, result = float("inf"), float("inf"), None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        wall = min(wall, time.perf_counter() - w0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=400)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-series-") as tmp:
        root = Path(tmp)
        (root / "ct").mkdir()
        t0 = time.perf_counter()
        write_series(root, args.slices, args.size)
        folder = root / "ct"
        megabytes = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
        print(
            f"series: {args.slices} x {args.size}x{args.size}, {megabytes:.0f} MB, "
            f"written in {time.perf_counter() - t0:.1f} s"
        )
        layout = check_series_folder(folder)  # warms the page cache for both
        assert layout is not None and len(layout.files) == args.slices and not layout.warnings
        read_wall, read_cpu, image = best(lambda: read_dicom_volume(layout), args.repeats)
        assert image.GetSize() == (args.size, args.size, args.slices)
        del image
        check_wall, check_cpu, _ = best(lambda: check_series_folder(folder), args.repeats)

        def gdcm_sort() -> list[str]:
            (uid,) = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
            return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))

        sort_wall, sort_cpu, _ = best(gdcm_sort, args.repeats)
    print(f"{'':34s} {'wall s':>8s} {'cpu s':>8s}")
    print(f"{'read (the runner, baseline)':34s} {read_wall:8.3f} {read_cpu:8.3f}")
    print(f"{'series check (headers)':34s} {check_wall:8.3f} {check_cpu:8.3f}")
    print(f"{'GDCM series sort (before: replaced)':34s} {sort_wall:8.3f} {sort_cpu:8.3f}")
    ratio_wall, ratio_cpu = check_wall / read_wall, check_cpu / read_cpu
    verdict = "ok" if min(ratio_wall, ratio_cpu) <= TARGET else "OVER TARGET"
    print(
        f"check / read: {ratio_wall:.1%} wall, {ratio_cpu:.1%} cpu "
        f"(target <= {TARGET:.0%}: {verdict}); GDCM sort / read: {sort_wall / read_wall:.1%} wall"
    )


if __name__ == "__main__":
    main()
