"""``medsa predict --dicom-seg``: a DICOM series in, a DICOM-SEG on the same instances out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medsa.cli import main as cli_main
from medsa.data.io import read_image, write_image

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

TINY = ["--backbone", "vit_tiny", "--device", "cpu", "--random-weights"]


def test_predict_dicom_seg_matches_the_label_map_on_the_source_instances(
    tmp_path: Path, capsys, write_dicom_series, one_thread
):
    arr = (np.random.default_rng(0).random((4, 24, 32)) * 1000).astype(np.int16)
    series = write_dicom_series(tmp_path / "in" / "series", arr)
    write_image(np.zeros((20, 20), np.uint8), tmp_path / "in" / "photo.png")
    out = tmp_path / "out"
    rc = cli_main(
        ["predict", str(tmp_path / "in"), "--out", str(out), "--box", "2,2,20,15",
         "--slice", "1:2", "--dicom-seg", *TINY]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "photo.png is not DICOM" in err and not list(out.glob("photo*.dcm"))
    labels = read_image(out / "series_mask.nii.gz").array
    assert labels[1:3].any() and not labels[[0, 3]].any()
    seg = hd.seg.segread(str(out / "series_mask_seg.dcm"))
    assert seg.get_segment_description(1).segment_label == "object 1"
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"
    for f in sorted(series.iterdir()):
        src = pydicom.dcmread(f)
        z = int(src.InstanceNumber)  # the fixture numbers the slices 0..D-1 in z order
        px = seg.get_pixels_by_source_instance(
            [str(src.SOPInstanceUID)], segment_numbers=[1], assert_missing_frames_are_empty=True
        )[0, ..., 0]
        np.testing.assert_array_equal(px > 0, labels[z] == 1, err_msg=f"slice {z}")
