"""The geometry check of a DICOM input series, before anything is inferred (docs: README
"Series geometry").

A series as hospitals send it is not always one clean stack of slices. This module sorts it the
way dcm2niix and dicom2nifti do, from the headers alone (no pixel data), and decides which
instances make the volume the model sees, in which order and on which grid:

1. instances that are not images (no Rows) or cannot be placed in the patient (no
   ImagePositionPatient, ImageOrientationPatient or PixelSpacing; PS3.3 C.7.6.2) are left out;
2. localizers (ImageType holding ``LOCALIZER``, PS3.3 C.8.2.1.1.1) are left out;
3. the rest is grouped into volumes of one orientation (:data:`ORIENTATION_TOLERANCE`), one
   matrix (Rows x Columns) and one PixelSpacing; the largest is the series' volume and the others
   are left out as localizers, unless another is at least half its size (then the series holds
   two volumes and is refused: the node cannot know which one was meant);
4. slices are sorted along the normal of their plane (row x column direction cosines,
   PS3.3 C.7.6.2.1.1); instances at one position (:data:`POSITION_TOLERANCE_MM`): identical
   copies (same SOPInstanceUID, or the same pixel data) are dropped; true repeats (other pixels)
   keep the latest acquisition: the highest AcquisitionNumber, then the highest InstanceNumber
   (:func:`repeat_order`, which also picks the one kept of identical copies);
5. the gaps between slices: uniform when every gap is within :data:`SPACING_TOLERANCE` of the
   median gap; a gap over :data:`MAX_GAP_RATIO` times the median means missing slices and the
   series is refused (an incomplete transfer is the usual cause, and interpolating over a hole
   would give a wrong result); other variations are resampled onto a uniform grid at the median
   spacing (linear interpolation along the normal);
6. gantry tilt: when the slice positions move in-plane from slice to slice (more than
   :data:`TILT_TOLERANCE_PIXELS` of a pixel across the stack), the slices are stacked at an angle
   to their plane and the volume is resampled onto a rectilinear grid (each slice shifted in its
   plane, as dcm2niix's tilt correction does), grown in-plane so that no voxel is lost.

Every decision is a sentence in :attr:`SeriesLayout.warnings`; a refusal raises
:class:`SeriesRefused` (a 400 for HTTP, a failed job otherwise) with a sentence a radiographer
understands. Everything but :func:`read_slice_header`, :func:`pixels_identical`,
:func:`check_series_folder`, :func:`check_image_file`, :func:`check_input` and
:func:`check_plan` is a pure function of the headers.

Axes: positions and directions are patient coordinates (LPS, mm, PS3.3 C.7.6.2.1.1). "x" is
along a row (the row direction cosine, index of the column), "y" along a column; PixelSpacing is
(between rows, between columns) = (y, x) (PS3.3 10.7.1.3).
"""

from __future__ import annotations

import logging
import math
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from nnunet_node.core import dicomscan
from nnunet_node.core.errors import InvalidRequest, SeriesRefused
from nnunet_node.core.images import gdcm_series_ids, image_information
from nnunet_node.inference.request import Plan

LOGGER = logging.getLogger(__name__)

ORIENTATION_TOLERANCE = 1e-3
"""Largest difference of one direction cosine for two images to share an orientation (~0.06°)."""
PIXEL_SPACING_TOLERANCE_MM = 1e-3
"""Largest difference of PixelSpacing (mm) within one volume."""
POSITION_TOLERANCE_MM = 0.01
"""Two slices closer than this along the normal (mm) are at the same position."""
SPACING_TOLERANCE = 0.02
"""A gap within this fraction of the median gap (and at least :data:`SPACING_TOLERANCE_FLOOR_MM`)
counts as uniform."""
SPACING_TOLERANCE_FLOOR_MM = 0.01
MAX_GAP_RATIO = 1.5
"""A gap larger than this times the median gap means missing slices: the series is refused."""
TILT_TOLERANCE_PIXELS = 0.1
"""In-plane drift of the slice positions across the stack, in pixels, still read as rectilinear."""
SECOND_VOLUME_FRACTION = 0.5
"""Another volume in the series with at least this fraction of the main volume's images makes
the series ambiguous: refused."""

_SCAN_BYTES = 1 << 14
_SCAN_BYTES_MAX = 1 << 20
_TAGS = {
    "ImageType": 0x00080008,
    "SOPInstanceUID": 0x00080018,
    "SeriesDescription": 0x0008103E,
    "SliceThickness": 0x00180050,
    "SeriesInstanceUID": 0x0020000E,
    "SeriesNumber": 0x00200011,
    "AcquisitionNumber": 0x00200012,
    "InstanceNumber": 0x00200013,
    "ImagePositionPatient": 0x00200032,
    "ImageOrientationPatient": 0x00200037,
    "NumberOfFrames": 0x00280008,
    "Rows": 0x00280010,
    "Columns": 0x00280011,
    "PixelSpacing": 0x00280030,
}
_WANTED = frozenset(_TAGS.values())
_US = struct.Struct("<H")


@dataclass(slots=True)
class SliceHeader:
    """What the check needs of one instance (PS3.3 C.7.6.2 Image Plane, C.7.6.3 Image Pixel,
    C.7.6.1 General Image). ``pixel_spacing`` is (row spacing, column spacing) mm as stored."""

    path: Path
    sop_instance_uid: str = ""
    series_instance_uid: str = ""
    series_description: str = ""
    series_number: int | None = None
    image_type: tuple[str, ...] = ()
    instance_number: int | None = None
    acquisition_number: int | None = None
    position: tuple[float, float, float] | None = None
    orientation: tuple[float, float, float, float, float, float] | None = None
    rows: int = 0
    columns: int = 0
    pixel_spacing: tuple[float, float] | None = None
    slice_thickness: float | None = None
    frames: int = 1

    @property
    def is_image(self) -> bool:
        return self.rows > 0 and self.columns > 0

    @property
    def is_placed(self) -> bool:
        return (
            self.position is not None
            and self.orientation is not None
            and self.pixel_spacing is not None
        )

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.image_type

    def describe(self) -> str:
        """``image 12`` (InstanceNumber) or the file name, for messages."""
        if self.instance_number is not None:
            return f"image {self.instance_number}"
        return f"file {self.path.name}"


@dataclass(frozen=True)
class SeriesLayout:
    """The kept instances of a series and the grid of the volume built from them.

    ``files`` are the kept instances in the order of the volume's source slices (ascending along
    ``normal``). ``heights`` (mm) are their distances along ``normal`` from the first one and
    ``offsets`` (mm, along ``row`` then ``column``) the in-plane drift of their
    ImagePositionPatient from the first one's (non-zero under gantry tilt).

    The model's volume has ``grid_size`` (x, y, z voxels), ``grid_spacing`` (x, y, z mm),
    ``grid_origin`` (centre of voxel 0, mm) and ``grid_direction`` (SimpleITK order: row-major
    3x3 whose columns are ``row``, ``column``, ``normal``). Without ``resample`` it is the stack of
    the source slices itself; with it, it was interpolated from them (gantry tilt or non-uniform
    spacing) and ``grid_shift`` (x, y voxels) is where the first slice's pixel (0, 0) lies on it.
    """

    files: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    rows: int
    columns: int
    first_position: tuple[float, float, float]
    row: tuple[float, float, float]
    column: tuple[float, float, float]
    normal: tuple[float, float, float]
    pixel_spacing_xy: tuple[float, float]
    heights: tuple[float, ...]
    offsets: tuple[tuple[float, float], ...]
    slice_spacing: float
    resample: bool
    grid_shift: tuple[int, int] = (0, 0)
    grid_slices: int = 0
    warnings: tuple[str, ...] = field(default=())

    @property
    def grid_size(self) -> tuple[int, int, int]:
        lo_x, lo_y = self.grid_shift
        if not self.resample:
            return (self.columns, self.rows, len(self.files))
        hi_x = max(math.ceil(u / self.pixel_spacing_xy[0] - 1e-6) for u, _ in self.offsets)
        hi_y = max(math.ceil(v / self.pixel_spacing_xy[1] - 1e-6) for _, v in self.offsets)
        return (self.columns + hi_x - lo_x, self.rows + hi_y - lo_y, self.grid_slices)

    @property
    def grid_spacing(self) -> tuple[float, float, float]:
        return (*self.pixel_spacing_xy, self.slice_spacing)

    @property
    def grid_origin(self) -> tuple[float, float, float]:
        lo_x, lo_y = self.grid_shift
        origin = (
            np.asarray(self.first_position)
            + np.asarray(self.row) * lo_x * self.pixel_spacing_xy[0]
            + np.asarray(self.column) * lo_y * self.pixel_spacing_xy[1]
        )
        return (float(origin[0]), float(origin[1]), float(origin[2]))

    @property
    def grid_direction(self) -> tuple[float, ...]:
        matrix = np.column_stack([self.row, self.column, self.normal])
        return tuple(float(v) for v in matrix.ravel())


# --- reading headers ---------------------------------------------------------------------------
def _numbers(raw: bytes | None, count: int) -> tuple[float, ...] | None:
    """``count`` finite numbers of a DS/IS value (backslash-separated ASCII), else None."""
    if not raw:
        return None
    parts = raw.strip(b"\x00 ").split(b"\\")
    if len(parts) != count:
        return None
    try:
        values = tuple(map(float, parts))
    except ValueError:
        return None
    return values if all(map(math.isfinite, values)) else None


def _whole(raw: bytes | int | None) -> int | None:
    if raw is None or isinstance(raw, int):
        return raw
    try:
        return int(raw.strip(b"\x00 "))
    except ValueError:  # empty, or written as a decimal
        numbers = _numbers(raw, 1)
        return int(numbers[0]) if numbers else None


def _text(raw: bytes | int | None) -> str:
    return raw.decode("latin-1").strip("\x00 ") if isinstance(raw, bytes) else ""


def header_from_values(path: Path, values: Mapping[str, bytes | int | None]) -> SliceHeader:
    """A :class:`SliceHeader` from raw values by keyword: the bytes of each value as encoded
    (text VRs), ints for Rows/Columns (US). Malformed numbers read as absent."""
    get = values.get
    position = _numbers(get("ImagePositionPatient"), 3)  # type: ignore[arg-type]
    orientation = _numbers(get("ImageOrientationPatient"), 6)  # type: ignore[arg-type]
    spacing = _numbers(get("PixelSpacing"), 2)  # type: ignore[arg-type]
    thickness = _numbers(get("SliceThickness"), 1)  # type: ignore[arg-type]
    if spacing is not None and min(spacing) <= 0:
        spacing = None
    image_type = _text(get("ImageType")).upper()
    return SliceHeader(
        path=path,
        sop_instance_uid=_text(get("SOPInstanceUID")),
        series_instance_uid=_text(get("SeriesInstanceUID")),
        series_description=_text(get("SeriesDescription")),
        series_number=_whole(get("SeriesNumber")),
        image_type=tuple(p.strip() for p in image_type.split("\\") if p.strip()),
        instance_number=_whole(get("InstanceNumber")),
        acquisition_number=_whole(get("AcquisitionNumber")),
        position=position,  # type: ignore[arg-type]
        orientation=orientation,  # type: ignore[arg-type]
        rows=_whole(get("Rows")) or 0,
        columns=_whole(get("Columns")) or 0,
        pixel_spacing=spacing,  # type: ignore[arg-type]
        slice_thickness=thickness[0] if thickness and thickness[0] > 0 else None,
        frames=_whole(get("NumberOfFrames")) or 1,
    )


_US_TAGS = {_TAGS["Rows"], _TAGS["Columns"]}
_KEYWORDS = {tag: keyword for keyword, tag in _TAGS.items()}


def _scanned(path: Path, data: bytes, complete: bool) -> SliceHeader | None:
    found = dicomscan.scan(data, _WANTED, complete=complete, stop_after_wanted=True)
    if found is None:
        return None
    values: dict[str, bytes | int | None] = {}
    for tag, element in found[1].items():
        if tag in _US_TAGS:
            if element.vr in (None, b"US", b"UN") and len(element.value) == 2:
                values[_KEYWORDS[tag]] = _US.unpack(element.value)[0]
            elif element.value:
                raise dicomscan.NotSure(f"{_KEYWORDS[tag]} has VR {element.vr!r}")
        else:
            values[_KEYWORDS[tag]] = element.value
    return header_from_values(path, values)


def _pydicom_header(path: Path) -> SliceHeader | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_TAGS))
    except Exception:  # pydicom raises many types on files that are not DICOM
        return None
    values: dict[str, bytes | int | None] = {}
    for keyword in _TAGS:
        value = ds.get(keyword)
        if value is None:
            continue
        if keyword in ("Rows", "Columns"):
            values[keyword] = int(value)
        elif isinstance(value, str | int | float):
            values[keyword] = str(value).encode("latin-1", "replace")
        else:  # multi-valued
            values[keyword] = "\\".join(str(v) for v in value).encode("latin-1", "replace")
    return header_from_values(path, values)


def read_slice_header(path: Path) -> SliceHeader | None:
    """The header of one file, or None when it is not a DICOM Part 10 file.

    Reads only the header: a direct scan of the first bytes (:mod:`core.dicomscan`), pydicom when
    the scan is not sure (Big Endian, deflated, undefined lengths). Raises OSError when the file
    cannot be read."""
    fd = os.open(path, os.O_RDONLY)  # no buffered file object: this runs once per slice
    try:
        data = os.read(fd, _SCAN_BYTES)
        try:
            header = _scanned(path, data, len(data) < _SCAN_BYTES)
            if header is None:
                while len(data) < _SCAN_BYTES_MAX:
                    more = os.read(fd, _SCAN_BYTES_MAX - len(data))
                    if not more:
                        break
                    data += more
                header = _scanned(path, data, len(data) < _SCAN_BYTES_MAX)
            if header is not None:
                return header
        except dicomscan.NotSure:
            if data[128:132] != b"DICM":
                return None
        except dicomscan.Truncated:
            return None
    finally:
        os.close(fd)
    return _pydicom_header(path)


def pixels_identical(a: Path, b: Path) -> bool:
    """Whether two instances hold the same stored pixels (PixelData bytes, as encoded) under the
    same rescale (PS3.3 C.11.1); reads both files in full."""

    def pixels(path: Path) -> tuple[bytes, str, str]:
        ds = pydicom.dcmread(path)
        return (
            bytes(ds.get("PixelData", b"") or b""),
            str(ds.get("RescaleSlope", "1")),
            str(ds.get("RescaleIntercept", "0")),
        )

    try:
        return pixels(a) == pixels(b)
    except Exception:  # unreadable pixel data: not provably identical
        return False


# --- pure functions ----------------------------------------------------------------------------
def _close(a: Sequence[float], b: Sequence[float], tol: float) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def same_orientation(
    a: Sequence[float], b: Sequence[float], tol: float = ORIENTATION_TOLERANCE
) -> bool:
    """Whether two ImageOrientationPatient values (6 direction cosines) agree within ``tol``."""
    return _close(a, b, tol)


def plane_normal(orientation: Sequence[float]) -> np.ndarray:
    """The unit normal row x column of an ImageOrientationPatient (PS3.3 C.7.6.2.1.1), shape (3,).
    Raises :class:`SeriesRefused` for direction cosines that span no plane."""
    row = np.asarray(orientation[:3], float)
    column = np.asarray(orientation[3:], float)
    normal = np.cross(row, column)
    length = float(np.linalg.norm(normal))
    if length < 0.5:
        raise SeriesRefused(f"the image orientation {list(orientation)} does not describe a plane")
    return normal / length


def describe_orientation(orientation: Sequence[float]) -> str:
    """``axial``, ``coronal``, ``sagittal`` or ``oblique``: the plane nearest to the normal."""
    normal = np.abs(plane_normal(orientation))
    axis = int(np.argmax(normal))
    if normal[axis] < 0.95:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def group_volumes(headers: Iterable[SliceHeader]) -> list[list[SliceHeader]]:
    """Placed images grouped by orientation (within :data:`ORIENTATION_TOLERANCE`), matrix
    (Rows, Columns) and PixelSpacing (within :data:`PIXEL_SPACING_TOLERANCE_MM`); the largest group
    first (ties: the group seen first)."""
    groups: list[list[SliceHeader]] = []
    for h in headers:
        assert h.orientation is not None and h.pixel_spacing is not None
        for group in groups:
            g = group[0]
            assert g.orientation is not None and g.pixel_spacing is not None
            if (
                g.rows == h.rows
                and g.columns == h.columns
                and _close(g.orientation, h.orientation, ORIENTATION_TOLERANCE)
                and _close(g.pixel_spacing, h.pixel_spacing, PIXEL_SPACING_TOLERANCE_MM)
            ):
                group.append(h)
                break
        else:
            groups.append([h])
    return sorted(groups, key=len, reverse=True)


def _volume_name(group: Sequence[SliceHeader]) -> str:
    h = group[0]
    assert h.orientation is not None and h.pixel_spacing is not None
    return (
        f"{len(group)} {describe_orientation(h.orientation)} image(s) of "
        f"{h.columns}x{h.rows} pixels at {h.pixel_spacing[1]:g}x{h.pixel_spacing[0]:g} mm"
    )


def repeat_order(h: SliceHeader) -> tuple[int, int, str]:
    """Sort key of the repeat rule: the instance with the largest key is kept (the highest
    AcquisitionNumber, then the highest InstanceNumber, then the SOPInstanceUID)."""
    return (
        h.acquisition_number if h.acquisition_number is not None else -1,
        h.instance_number if h.instance_number is not None else -1,
        h.sop_instance_uid,
    )


def cluster_positions(
    heights: Sequence[float], tol: float = POSITION_TOLERANCE_MM
) -> list[list[int]]:
    """Indices of ``heights`` (mm, sorted ascending) grouped into runs closer than ``tol``."""
    clusters: list[list[int]] = []
    for i, h in enumerate(heights):
        if clusters and h - heights[clusters[-1][-1]] <= tol:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    return clusters


def resolve_repeats(
    slices: Sequence[SliceHeader],
    heights: Sequence[float],
    same_pixels: Callable[[Path, Path], bool],
) -> tuple[list[SliceHeader], list[float], list[str]]:
    """One instance per position of ``slices`` (sorted by ``heights``, mm ascending): identical
    copies (same SOPInstanceUID or ``same_pixels``) dropped, true repeats decided by
    :func:`repeat_order`. Returns the kept slices, their heights and the warnings."""
    kept: list[SliceHeader] = []
    kept_heights: list[float] = []
    copies = 0
    repeats: list[str] = []
    for cluster in cluster_positions(heights):
        members = sorted((slices[i] for i in cluster), key=repeat_order, reverse=True)
        distinct: list[SliceHeader] = []
        for h in members:
            if any(
                h.sop_instance_uid == d.sop_instance_uid or same_pixels(h.path, d.path)
                for d in distinct
            ):
                copies += 1
                continue
            distinct.append(h)
        winner = distinct[0]
        if len(distinct) > 1:
            dropped = ", ".join(d.describe() for d in distinct[1:])
            repeats.append(f"{winner.describe()} kept over {dropped}")
        kept.append(winner)
        kept_heights.append(heights[cluster[0]])
    warnings = []
    if copies:
        warnings.append(
            f"{copies} identical cop{'y' if copies == 1 else 'ies'} of images already in the "
            "series left out"
        )
    if repeats:
        warnings.append(
            f"{len(repeats)} slice position(s) hold repeated images with different pixels; the "
            "latest acquisition was kept at each (highest AcquisitionNumber, then highest "
            f"InstanceNumber): {'; '.join(repeats)}"
        )
    return kept, kept_heights, warnings


@dataclass(frozen=True)
class Spacing:
    """The slice spacing of a stack: ``nominal`` (median gap, mm) and whether it is ``uniform``."""

    nominal: float
    uniform: bool
    smallest: float
    largest: float


def slice_spacing(heights: Sequence[float]) -> Spacing:
    """The gaps between sorted ``heights`` (mm, at least two, strictly increasing) judged as the
    module doc says (no refusal here: see :func:`missing_slices`)."""
    gaps = np.diff(np.asarray(heights, dtype=float))
    nominal = float(np.median(gaps))
    tol = max(SPACING_TOLERANCE_FLOOR_MM, SPACING_TOLERANCE * nominal)
    uniform = bool(np.all(np.abs(gaps - nominal) <= tol))
    return Spacing(nominal, uniform, float(gaps.min()), float(gaps.max()))


def missing_slices(heights: Sequence[float], nominal: float) -> list[tuple[int, int]]:
    """``(i, n)`` for each gap after slice ``i`` larger than :data:`MAX_GAP_RATIO` times
    ``nominal``: about ``n`` slices are missing there."""
    out = []
    for i, gap in enumerate(np.diff(np.asarray(heights, dtype=float))):
        if gap > MAX_GAP_RATIO * nominal:
            out.append((i, max(1, round(gap / nominal) - 1)))
    return out


def tilt_degrees(heights: Sequence[float], offsets: Sequence[tuple[float, float]]) -> float:
    """The angle (degrees) between the line from the first to the last slice position and the
    slices' normal: the gantry tilt of a CT series (0 for a rectilinear stack)."""
    if len(heights) < 2 or heights[-1] <= 0:
        return 0.0
    drift = math.hypot(*offsets[-1])
    return math.degrees(math.atan2(drift, heights[-1] - heights[0]))


def _series_name(headers: Sequence[SliceHeader], fallback: str) -> str:
    for h in headers:
        if h.series_number is not None or h.series_description:
            number = f" {h.series_number}" if h.series_number is not None else ""
            description = f" ({h.series_description})" if h.series_description else ""
            return f"series{number}{description}"
    return f"series {fallback}"


def check_headers(
    headers: Sequence[SliceHeader],
    *,
    same_pixels: Callable[[Path, Path], bool] = pixels_identical,
    name: str = "",
) -> SeriesLayout:
    """Decide the kept instances and the grid of one series' volume (module doc, steps 1-6).

    ``headers`` are the instances of one series in any order; ``same_pixels`` compares the pixel
    data of two instances at one position (only called for those). ``name`` names the series in
    messages when its headers carry neither SeriesNumber nor SeriesDescription.
    Raises :class:`SeriesRefused` with a sentence for the user."""
    what = _series_name(headers, name)
    warnings: list[str] = []
    images = [h for h in headers if h.is_image]
    if len(images) < len(headers):
        warnings.append(f"{len(headers) - len(images)} instance(s) without pixel data left out")
    placed = [h for h in images if h.is_placed]
    if not placed:
        raise SeriesRefused(
            f"{what}: the images carry no position in the patient (ImagePositionPatient, "
            "ImageOrientationPatient, PixelSpacing), so no volume can be built from them"
        )
    if len(placed) < len(images):
        unplaced = [h.describe() for h in images if not h.is_placed]
        warnings.append(
            f"{len(unplaced)} image(s) without a position in the patient left out: "
            f"{', '.join(unplaced)}"
        )
    localizers = [h for h in placed if h.is_localizer]
    candidates = [h for h in placed if not h.is_localizer]
    if localizers:
        warnings.append(
            f"{len(localizers)} localizer image(s) (ImageType LOCALIZER) left out: "
            f"{', '.join(h.describe() for h in localizers)}"
        )
    if not candidates:
        raise SeriesRefused(f"{what}: holds only localizer images, no volume to segment")
    groups = group_volumes(candidates)
    main = groups[0]
    for other in groups[1:]:
        if len(other) >= 2 and len(other) >= SECOND_VOLUME_FRACTION * len(main):
            raise SeriesRefused(
                f"{what}: holds more than one volume ({_volume_name(main)}; "
                f"{_volume_name(other)}); the node cannot tell which one to segment. Send each "
                "volume as its own series"
            )
        warnings.append(
            f"{_volume_name(other)} left out as localizer(s): another orientation, matrix or "
            f"pixel spacing than the volume ({_volume_name(main)}): "
            f"{', '.join(h.describe() for h in other)}"
        )
    if any(h.frames > 1 for h in main):
        raise SeriesRefused(
            f"{what}: mixes multi-frame and single-frame images; send them as separate series"
        )

    first = main[0]
    assert first.orientation is not None and first.pixel_spacing is not None
    row = np.asarray(first.orientation[:3], float)
    row /= np.linalg.norm(row)
    normal = plane_normal(first.orientation)
    column = np.cross(normal, row)  # orthonormal, right-handed frame (row, column, normal)
    positions = np.array([h.position for h in main], dtype=float)
    order = np.lexsort(
        (
            [h.instance_number if h.instance_number is not None else 0 for h in main],
            positions @ normal,
        )
    )
    ordered = [main[i] for i in order]
    heights = [float(v) for v in positions[order] @ normal]
    kept, _, repeat_warnings = resolve_repeats(ordered, heights, same_pixels)
    warnings.extend(repeat_warnings)

    origin = np.asarray(kept[0].position, float)
    rel = np.array([h.position for h in kept], dtype=float) - origin
    heights_rel = [float(v) for v in rel @ normal]
    offsets = [(float(u), float(v)) for u, v in zip(rel @ row, rel @ column, strict=True)]
    sx, sy = first.pixel_spacing[1], first.pixel_spacing[0]
    resample = False
    if len(kept) == 1:
        spacing = first.slice_thickness or 1.0
    else:
        judged = slice_spacing(heights_rel)
        spacing = judged.nominal
        holes = missing_slices(heights_rel, spacing)
        if holes:
            parts = []
            for i, n in holes:
                parts.append(
                    f"about {n} slice(s) missing between {kept[i].describe()} and "
                    f"{kept[i + 1].describe()} (a gap of "
                    f"{heights_rel[i + 1] - heights_rel[i]:.2f} mm)"
                )
            raise SeriesRefused(
                f"{what}: the series is incomplete: {'; '.join(parts)} where the slices are "
                f"{spacing:.2f} mm apart. Send the complete series again"
            )
        if not judged.uniform:
            resample = True
            warnings.append(
                f"slice spacing varies from {judged.smallest:.2f} to {judged.largest:.2f} mm; "
                f"the volume was resampled onto a uniform grid of {spacing:.2f} mm (linear "
                "interpolation between slices)"
            )
        drift_pixels = max(max(abs(u) / sx, abs(v) / sy) for u, v in offsets)
        if drift_pixels > TILT_TOLERANCE_PIXELS:
            resample = True
            angle = tilt_degrees(heights_rel, offsets)
            largest = max(math.hypot(u, v) for u, v in offsets)
            what_moves = (
                f"gantry tilt of {angle:.1f} degrees (the slices are stacked at an angle to "
                "their plane)"
                if angle >= 0.05
                else f"the slice positions move by up to {largest:.2f} mm within their plane"
            )
            warnings.append(
                f"{what_moves}: the volume was resampled onto a rectilinear grid of "
                f"{sx:g}x{sy:g}x{spacing:.2f} mm, as dcm2niix does; the SEG and RTSTRUCT are "
                "mapped back onto the original slices"
            )
    grid_shift = (0, 0)
    grid_slices = len(kept)
    if resample:
        grid_shift = (
            min(math.floor(u / sx + 1e-6) for u, _ in offsets),
            min(math.floor(v / sy + 1e-6) for _, v in offsets),
        )
        grid_slices = round(heights_rel[-1] / spacing) + 1
    for w in warnings:
        LOGGER.info("%s: %s", what, w)
    return SeriesLayout(
        files=tuple(h.path for h in kept),
        sop_instance_uids=tuple(h.sop_instance_uid for h in kept),
        rows=first.rows,
        columns=first.columns,
        first_position=(float(origin[0]), float(origin[1]), float(origin[2])),
        row=(float(row[0]), float(row[1]), float(row[2])),
        column=(float(column[0]), float(column[1]), float(column[2])),
        normal=(float(normal[0]), float(normal[1]), float(normal[2])),
        pixel_spacing_xy=(sx, sy),
        heights=tuple(heights_rel),
        offsets=tuple(offsets),
        slice_spacing=float(spacing),
        resample=resample,
        grid_shift=grid_shift,
        grid_slices=grid_slices,
        warnings=tuple(f"{what}: {w}" for w in warnings),
    )


# --- folders and plans -------------------------------------------------------------------------
def read_folder_headers(folder: Path) -> list[SliceHeader]:
    """The headers of the DICOM files directly in ``folder`` (other files ignored), by name."""
    out = []
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if e.is_file())
    for entry in names:
        header = read_slice_header(folder / entry)
        if header is not None:
            out.append(header)
    return out


def check_series_folder(folder: Path, *, what: str = "series") -> SeriesLayout | None:
    """The layout of the one DICOM series in ``folder``; None when the folder holds no DICOM
    images or a single multi-frame image (read as a whole). Raises :class:`InvalidRequest` when it
    holds several series, :class:`SeriesRefused` when the series is refused."""
    return _layout(folder, read_folder_headers(folder), what)


def _layout(folder: Path, headers: list[SliceHeader], what: str) -> SeriesLayout | None:
    if not headers:
        return None
    series = {h.series_instance_uid for h in headers}
    if len(series) > 1:
        raise InvalidRequest(
            f"{what}: {folder} holds {len(series)} DICOM series; point to a folder with one"
        )
    if len(headers) == 1 and headers[0].frames > 1:
        return None
    return check_headers(headers, name=folder.name)


IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
"""File names of the image files a series entry may be (or a folder may hold one of)."""


def is_image_file(path: Path) -> bool:
    """Whether ``path`` is a file named as an image file of :data:`IMAGE_SUFFIXES`."""
    name = path.name.lower()
    return path.is_file() and any(name.endswith(s) for s in IMAGE_SUFFIXES)


def _needs_dicom(what: str) -> str:
    return (
        f"is_dicom is set, so {what} (the first input of its stage) must be a folder holding the "
        "DICOM series the DICOM-SEG and RTSTRUCT will reference; send that series, or set "
        "is_dicom to false for NIfTI outputs only"
    )


def _held(folder: Path) -> str:
    """What a folder holds, for a message: ``it is empty`` or ``it holds 3 files (a.txt, ...)``."""
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries)
    if not names:
        return "it is empty"
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"it holds only {len(names)} entr{'y' if len(names) == 1 else 'ies'} ({shown})"


def check_image_file(path: Path, *, what: str = "series") -> None:
    """Check that ``path`` is an image file a job can read as a volume, from its header only (no
    pixel data is read): one component per pixel, 2 or 3 dimensions. Raises
    :class:`InvalidRequest` naming ``what`` and the path."""
    try:
        dimension, components = image_information(str(path))
    except RuntimeError as exc:
        raise InvalidRequest(
            f"{what}: {path} is not an image file the node can read (NIfTI, NRRD, MHA/MHD or "
            f"DICOM): {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}"
        ) from exc
    if components != 1:
        raise InvalidRequest(
            f"{what}: {path} has {components} components per pixel; a model input has one "
            "(colour and vector images are not model inputs)"
        )
    if dimension not in (2, 3):
        raise InvalidRequest(f"{what}: {path} has {dimension} dimensions; expected a 3D volume")


def check_input(path: Path, *, what: str = "series", dicom: bool = False) -> SeriesLayout | None:
    """Check one existing input of a plan (a series entry, ``crop_from`` or ``intersect_with``)
    as a job will read it, from headers only (no pixel data is decoded): a folder must hold one
    DICOM series, or exactly one image file; a file must be an image file (see
    :func:`check_image_file`). ``dicom``: the input must be a folder holding a DICOM series (the
    first input of a stage when ``is_dicom`` is set). Returns the layout of a DICOM series (None
    for anything else). Raises :class:`InvalidRequest` naming ``what``, the path and what was
    missing, or :class:`SeriesRefused` for a refused series."""
    if not path.is_dir():
        if dicom:
            raise InvalidRequest(f"{what}: {path} is a file. {_needs_dicom(what)}")
        check_image_file(path, what=what)
        return None
    headers = read_folder_headers(path)
    if headers:
        return _layout(path, headers, what)
    if gdcm_series_ids(str(path)):
        return None  # DICOM without a Part 10 header: GDCM reads it when the job runs
    image_files = sorted(p for p in path.iterdir() if is_image_file(p))
    if not image_files:
        raise InvalidRequest(
            f"{what}: {path} holds neither a DICOM series nor an image file (NIfTI, NRRD, "
            f"MHA/MHD): {_held(path)}"
        )
    if dicom:
        names = ", ".join(p.name for p in image_files[:3])
        raise InvalidRequest(
            f"{what}: {path} holds no DICOM series, only {names}. {_needs_dicom(what)}"
        )
    if len(image_files) > 1:
        raise InvalidRequest(
            f"{what}: {path} holds {len(image_files)} image files; name one of them"
        )
    check_image_file(image_files[0], what=what)
    return None


def series_path(raw: str, study_path: Path) -> Path:
    """Where a plan's series path lies: absolute, or relative to ``study_path``."""
    path = Path(raw).expanduser()
    return path if path.is_absolute() else Path(study_path) / path


def check_plan(
    plan: Plan, study_path: Path, *, name_fields: bool = True
) -> dict[Path, SeriesLayout]:
    """Check every input a plan reads (stage inputs, ``crop_from``, ``intersect_with``) with
    :func:`check_input`, and return the layout of every DICOM series folder among them, keyed by
    :func:`series_path`. With ``is_dicom``, the first input of each stage must be a DICOM series.
    Paths that do not exist (yet: an archive job's folders before their export) are skipped.
    Raises :class:`SeriesRefused` / :class:`InvalidRequest`, naming the request field unless
    ``name_fields`` is false (jobs whose folders the node filled in itself, from a C-STORE or
    STOW-RS series: the series' own number and description name it there)."""
    layouts: dict[Path, SeriesLayout] = {}
    checked: set[Path] = set()
    dicom_inputs = {
        series_path(stage.inputs[0].path, study_path)
        for stage in plan.stages
        if plan.is_dicom and stage.inputs and stage.inputs[0].path is not None
    }
    for field_name, raw in plan.paths():
        if field_name in ("study_path", "output_dir", "tmp_dir"):
            continue
        path = series_path(raw, study_path)
        if path in checked or not path.exists():
            continue
        checked.add(path)
        try:
            layout = check_input(path, what=field_name, dicom=path in dicom_inputs)
        except SeriesRefused as exc:
            if not name_fields:
                raise
            raise SeriesRefused(f"{field_name}: {exc}") from exc
        if layout is not None:
            layouts[path] = layout
    return layouts
