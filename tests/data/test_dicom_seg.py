"""DICOM-SEG output: frames on the right source instances, masks and segment names round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medsa.errors import DataError

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

from medsa.data.dicom_seg import load_series, read_dicom_seg, write_dicom_seg  # noqa: E402


@pytest.fixture
def series(tmp_path: Path, write_dicom_series) -> Path:
    """A 5-slice series whose file names do NOT follow the slice order (so a writer that trusts
    the directory listing puts frames on the wrong instances)."""
    arr = (np.random.default_rng(0).random((5, 24, 32)) * 1000).astype(np.int16)
    folder = write_dicom_series(tmp_path / "series", arr)
    files = sorted(folder.iterdir())
    for f, new in zip(files, ["c.dcm", "e.dcm", "a.dcm", "d.dcm", "b.dcm"], strict=True):
        f.rename(folder / f"x_{new}")
    return folder


def _slice_index(ds, folder: Path) -> int:
    """The slice a source file holds: the rank of its z position in the series (the fixture's
    slices are axial, z increasing), computed here without medsa's sort."""
    zs = sorted(float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in folder.iterdir())
    return zs.index(float(ds.ImagePositionPatient[2]))


def _labels() -> np.ndarray:
    lab = np.zeros((5, 24, 32), np.uint8)
    lab[1:4, 3:12, 4:20] = 1
    lab[2, 14:22, 18:30] = 4  # a label value that is not K: renumbered, then given back
    lab[0, 0, 0] = 1  # a single pixel on the first slice
    return lab


def test_dicom_seg_frames_reference_the_right_source_instances(series: Path, tmp_path: Path):
    lab = _labels()
    out = write_dicom_seg(lab, series, {1: "liver", 4: "tumour"}, tmp_path / "o" / "seg.dcm")
    seg = hd.seg.segread(str(out))
    assert seg.SegmentationType == "BINARY"
    assert seg.SeriesInstanceUID != pydicom.dcmread(next(series.iterdir())).SeriesInstanceUID
    labels = {n: seg.get_segment_description(n).segment_label for n in seg.get_segment_numbers()}
    assert labels == {1: "liver", 2: "tumour"}
    # every source file, found by its own SOP instance UID: the frames on it equal lab[z]
    for f in sorted(series.iterdir()):
        src = pydicom.dcmread(f)
        z = _slice_index(src, series)
        px = seg.get_pixels_by_source_instance(
            [str(src.SOPInstanceUID)], segment_numbers=[1, 2], assert_missing_frames_are_empty=True
        )[0]
        np.testing.assert_array_equal(px[..., 0], lab[z] == 1, err_msg=f"{f.name} (z={z})")
        np.testing.assert_array_equal(px[..., 1], lab[z] == 4, err_msg=f"{f.name} (z={z})")
    # medsa's reader gives back the label values and names
    back, names = read_dicom_seg(out, series)
    np.testing.assert_array_equal(back, lab)
    assert names == {1: "liver", 4: "tumour"}


def test_dicom_seg_sort_matches_medsa_volume_order(series: Path):
    from medsa.data.io import read_image

    img = read_image(series)
    datasets = load_series(series)
    for z, ds in enumerate(datasets):
        np.testing.assert_array_equal(ds.pixel_array, img.array[z])


def test_dicom_seg_from_datasets_does_not_change_them_and_names_unnamed(
    series: Path, tmp_path: Path
):
    datasets = [pydicom.dcmread(f) for f in sorted(series.iterdir())]
    assert all("SliceThickness" not in d for d in datasets)
    lab = _labels()
    out = write_dicom_seg(lab, datasets, {1: "liver"}, tmp_path / "seg.dcm")
    assert all("SliceThickness" not in d for d in datasets)  # caller's datasets untouched
    _, names = read_dicom_seg(out, datasets)
    assert names == {1: "liver", 4: "object 4"}


def test_dicom_seg_bad_input_is_a_clear_error(series: Path, tmp_path: Path):
    with pytest.raises(DataError, match="does not match the source series"):
        write_dicom_seg(np.zeros((4, 24, 32), np.uint8), series, {1: "a"}, tmp_path / "s.dcm")
    with pytest.raises(DataError, match="integer label map"):
        write_dicom_seg(np.zeros((5, 24, 32), np.float32), series, {1: "a"}, tmp_path / "s.dcm")
    with pytest.raises(DataError, match="nothing to write"):
        write_dicom_seg(np.zeros((5, 24, 32), np.uint8), series, {}, tmp_path / "s.dcm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no DICOM image"):
        write_dicom_seg(
            np.zeros((5, 24, 32), np.uint8), tmp_path / "empty", {1: "a"}, tmp_path / "s.dcm"
        )
    assert not (tmp_path / "s.dcm").exists()
