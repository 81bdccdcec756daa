"""DICOM Segmentation (DICOM-SEG) output for predictions on DICOM inputs.

A DICOM-SEG object references the source series (each frame names the source SOP instance it lies
on), so PACS viewers, OHIF and 3D Slicer show it on top of the images it was made from. medsa
writes a BINARY segmentation with one segment per label value of the label map, named from
``names`` (``{1: "liver", 2: "tumour"}``; unnamed labels become ``"object <k>"``).

Slice order: medsa's ``(D, H, W)`` arrays of a DICOM series are the ones SimpleITK's series reader
returns, i.e. the slices sorted by their position along the slice normal (``row x column`` of
ImageOrientationPatient). :func:`sort_series` applies the same order to the source datasets, so
``label_map[z]`` is written onto the ``z``-th dataset of that order.

Segment numbers: DICOM wants them to run 1..K; label values that are not 1..K (e.g. ``{1, 4}``)
are renumbered in increasing order and the label value is kept in the segment's tracking id
(``"label <value>"``), so :func:`read_dicom_seg` gives back the original label values.

highdicom is imported lazily (``pip install -e ".[dicom]"``); ``import medsa`` does not need it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsa._fs import atomic_write
from medsa.errors import DataError

__all__ = ["write_dicom_seg", "read_dicom_seg", "load_series", "sort_series", "segment_names"]

_TRACKING_PREFIX = "label "


def _highdicom() -> Any:
    try:
        import highdicom
    except ImportError:
        raise DataError(
            'DICOM-SEG needs highdicom: pip install highdicom (or pip install -e ".[dicom]")'
        ) from None
    return highdicom


def load_series(source: str | os.PathLike[str] | Sequence[Any]) -> list[Any]:
    """Source datasets of a DICOM series, in medsa's slice order (see :func:`sort_series`).

    Args:
        source: a folder holding the series (the largest series if several, as
            :func:`medsa.data.io.read_image`), one DICOM file, or a sequence of file paths /
            ``pydicom.Dataset`` objects.

    Raises:
        DataError: no DICOM file with pixel data found.
    """
    import pydicom

    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if not p.exists():
            raise DataError(f"{p}: no such file or folder")
        files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
        items: list[Any] = list(files)
        where = str(p)
    else:
        items = list(source)
        where = "source datasets"
    datasets = []
    for it in items:
        if isinstance(it, pydicom.Dataset):
            datasets.append(it)
            continue
        try:
            datasets.append(pydicom.dcmread(str(it)))
        except Exception:  # not DICOM (a README, a thumbnail): skipped like the series reader does
            continue
    datasets = [ds for ds in datasets if "PixelData" in ds and "SOPInstanceUID" in ds]
    if not datasets:
        raise DataError(f"{where}: no DICOM image with pixel data")
    by_series: dict[str, list[Any]] = {}
    for ds in datasets:
        by_series.setdefault(str(getattr(ds, "SeriesInstanceUID", "")), []).append(ds)
    largest = max(by_series.values(), key=len)
    return sort_series(largest)


def sort_series(datasets: Sequence[Any]) -> list[Any]:
    """Sort single-frame slices by position along the slice normal (ascending), as SimpleITK's
    series reader (GDCM's IPP sorter) does; slices without a position keep InstanceNumber order."""
    ds0 = datasets[0]
    iop = getattr(ds0, "ImageOrientationPatient", None)
    if iop is None or any(getattr(d, "ImagePositionPatient", None) is None for d in datasets):
        return sorted(datasets, key=lambda d: int(getattr(d, "InstanceNumber", 0) or 0))
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    return sorted(datasets, key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient, float))))  # fmt: skip


def _fill_slice_thickness(datasets: list[Any], given: Any) -> list[Any]:
    """highdicom copies the pixel measures from the source's SliceThickness, which some writers
    (GDCM, anonymisers) leave out: fill it in from the distance between slice positions. Datasets
    the caller passed in are copied first (never changed under the caller's feet)."""
    if all("SliceThickness" in d for d in datasets):
        return datasets
    thickness = 1.0
    ds0 = datasets[0]
    if len(datasets) > 1 and "ImageOrientationPatient" in ds0:
        iop = np.asarray(ds0.ImageOrientationPatient, float)
        normal = np.cross(iop[:3], iop[3:])
        pos = [float(np.dot(normal, np.asarray(d.ImagePositionPatient, float))) for d in datasets]
        thickness = abs(float(np.median(np.diff(pos)))) or 1.0
    theirs = {id(x) for x in given} if not isinstance(given, (str, os.PathLike)) else set()
    out = []
    for d in datasets:
        if "SliceThickness" not in d:
            d = copy.deepcopy(d) if id(d) in theirs else d
            d.SliceThickness = thickness
        out.append(d)
    return out


def segment_names(labels: np.ndarray, names: Mapping[int, str] | None = None) -> dict[int, str]:
    """``{label value: name}`` for every non-zero value of ``labels`` and every key of ``names``."""
    names = dict(names or {})
    values = {int(v) for v in np.unique(labels) if v != 0} | {int(k) for k in names if k != 0}
    return {v: str(names.get(v) or f"object {v}") for v in sorted(values)}


def write_dicom_seg(
    label_map: np.ndarray,
    source: str | os.PathLike[str] | Sequence[Any],
    names: Mapping[int, str] | None,
    path: str | os.PathLike[str],
    *,
    algorithm_type: str = "SEMIAUTOMATIC",
    series_description: str = "medsa segmentation",
) -> Path:
    """Write ``label_map`` as a DICOM-SEG object referencing the source series, atomically.

    Args:
        label_map: integer ``(D, H, W)`` (``D`` = number of source slices, in medsa's slice order)
            or ``(H, W)`` for a single-slice source; 0 = background; ``bool`` is label 1.
        source: the source series: a folder, a file, or file paths / ``pydicom.Dataset`` objects
            (see :func:`load_series`). A single multi-frame file takes ``(frames, H, W)``.
        names: ``{label value: segment name}``; unnamed non-zero labels become ``"object <k>"``.
        path: destination file (``.dcm``).
        algorithm_type: ``"SEMIAUTOMATIC"`` (prompted) or ``"AUTOMATIC"`` (prompt-free).
        series_description: SeriesDescription of the new series.

    Returns:
        The written path.

    Raises:
        DataError: shape does not match the source, negative / non-integer labels, nothing to
            write (no non-zero label and no names), or highdicom missing / failing.
    """
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    from medsa import __version__

    lab = np.asarray(label_map)
    if lab.dtype == bool:
        lab = lab.astype(np.uint8)
    if not np.issubdtype(lab.dtype, np.integer):
        raise DataError(f"DICOM-SEG needs an integer label map, got {lab.dtype}")
    if lab.size and lab.min() < 0:
        raise DataError("DICOM-SEG needs non-negative labels (0 = background)")
    datasets = load_series(source)
    if lab.ndim == 2:
        lab = lab[None]
    if lab.ndim != 3:
        raise DataError(f"DICOM-SEG needs a (D, H, W) or (H, W) label map, got {lab.shape}")
    n_frames = int(getattr(datasets[0], "NumberOfFrames", 1) or 1)
    expected_d = n_frames if len(datasets) == 1 else len(datasets)
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    if lab.shape != (expected_d, rows, cols):
        raise DataError(
            f"label map {lab.shape} does not match the source series "
            f"({expected_d} slices of {rows} x {cols})"
        )
    keys = {
        (str(getattr(d, "StudyInstanceUID", "")), str(getattr(d, "FrameOfReferenceUID", "")))
        for d in datasets
    }
    if len(keys) > 1:
        raise DataError(
            "the source slices do not share one StudyInstanceUID and FrameOfReferenceUID; "
            "a DICOM-SEG can only reference one consistent series"
        )
    datasets = _fill_slice_thickness(datasets, source)
    seg_names = segment_names(lab, names)
    if not seg_names:
        raise DataError("nothing to write: the label map is empty and no segment is named")
    # DICOM segment numbers run 1..K: renumber label values in increasing order
    number_of = {v: k + 1 for k, v in enumerate(seg_names)}
    seg_pixels = np.zeros(lab.shape, np.uint16 if len(seg_names) > 255 else np.uint8)
    for v, k in number_of.items():
        seg_pixels[lab == v] = k
    algo = hd.AlgorithmIdentificationSequence(
        name="medsa", family=codes.cid7162.ArtificialIntelligence, version=__version__
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number_of[v],
            segment_label=name[:64],  # LO value representation: 64 characters at most
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=algorithm_type,
            algorithm_identification=algo,
            tracking_uid=hd.UID(),
            tracking_id=f"{_TRACKING_PREFIX}{v}",
        )
        for v, name in seg_names.items()
    ]
    if len(datasets) == 1 and n_frames == 1:
        seg_pixels = seg_pixels[0]
    p = Path(path)
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=seg_pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=int(getattr(datasets[0], "SeriesNumber", 0) or 0) + 1000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="medsa",
            manufacturer_model_name="medsa",
            software_versions=__version__,
            device_serial_number="0",
            series_description=series_description,
        )
    except Exception as e:  # highdicom validates the source attributes: say which and why
        raise DataError(f"{p}: cannot build DICOM-SEG ({type(e).__name__}: {e})") from e
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{p}: cannot create the output folder ({e})") from None
    try:
        atomic_write(p, lambda tmp: seg.save_as(tmp))
    except Exception as e:
        raise DataError(f"{p}: cannot write DICOM-SEG ({type(e).__name__}: {e})") from e
    return p


def read_dicom_seg(
    path: str | os.PathLike[str], source: str | os.PathLike[str] | Sequence[Any]
) -> tuple[np.ndarray, dict[int, str]]:
    """Read a DICOM-SEG back onto its source series: ``(label map (D, H, W), {label: name})``.

    The label values are the ones given to :func:`write_dicom_seg` (from the segments' tracking
    ids; a segment without one keeps its segment number). Source slices the segmentation does not
    cover are 0.
    """
    hd = _highdicom()
    try:
        seg = hd.seg.segread(str(path))
    except Exception as e:
        raise DataError(f"{path}: cannot read DICOM-SEG ({type(e).__name__}: {e})") from e
    datasets = load_series(source)
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    out = np.zeros((len(uids), rows, cols), np.int32)
    names: dict[int, str] = {}
    referenced = {str(u[2]) for u in seg.get_source_image_uids()}
    zs = [z for z, uid in enumerate(uids) if uid in referenced]
    numbers = list(seg.get_segment_numbers())
    value_of: dict[int, int] = {}
    for number in numbers:
        desc = seg.get_segment_description(number)
        tid = getattr(desc, "tracking_id", None) or ""
        value = int(tid[len(_TRACKING_PREFIX) :]) if tid.startswith(_TRACKING_PREFIX) else number
        value_of[number] = value
        names[value] = str(desc.segment_label)
    if zs and numbers:
        # (N, H, W, S): one binary plane per segment; frames omitted because empty read as 0
        planes = seg.get_pixels_by_source_instance(
            [uids[z] for z in zs], segment_numbers=numbers, assert_missing_frames_are_empty=True
        )
        for s, number in enumerate(numbers):
            for i, z in enumerate(zs):
                out[z][planes[i, ..., s] > 0] = value_of[number]
    return out, names
