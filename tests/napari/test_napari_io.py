"""The napari reader / Labels writer (no viewer needed) and the npe2 manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medsa.data.io import Image, read_image, write_image
from medsa.errors import DataError
from medsa.napari._io import GEOMETRY_KEY, SOURCE_KEY, get_reader, save_labels, write_labels

MANIFEST = Path(__file__).resolve().parents[2] / "src" / "medsa" / "napari" / "napari.yaml"


def _volume(tmp_path: Path) -> Path:
    vol = Image(
        np.random.default_rng(0).normal(size=(5, 20, 24)).astype(np.float32),
        spacing=(2.5, 0.8, 0.7),
        origin=(10.0, -5.0, 3.0),
        direction=np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]]),
    )
    return write_image(vol, tmp_path / "ct.nii.gz")


def test_reader_gives_scale_from_spacing_and_keeps_the_source(tmp_path: Path):
    p = _volume(tmp_path)
    reader = get_reader(str(p))
    assert reader is not None
    [(data, kwargs, kind)] = reader(str(p))
    assert kind == "image" and data.shape == (5, 20, 24)
    assert kwargs["name"] == "ct"
    np.testing.assert_allclose(kwargs["scale"], (2.5, 0.8, 0.7), rtol=1e-6)
    src = kwargs["metadata"][SOURCE_KEY]
    assert src.format == "nifti" and src.array is data
    np.testing.assert_allclose(kwargs["metadata"][GEOMETRY_KEY]["affine"], src.affine)
    # 2D colour image: rgb layer with the in-plane spacing
    rgb = write_image(np.zeros((10, 12, 3), np.uint8), tmp_path / "photo.png")
    [(d2, k2, _)] = get_reader(str(rgb))(str(rgb))
    assert d2.shape == (10, 12, 3) and k2["rgb"] and tuple(k2["scale"]) == (1.0, 1.0)


def test_reader_declines_what_medsa_cannot_read(tmp_path: Path, write_dicom_series):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "pngs").mkdir()
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path / "pngs")) is None  # a folder without DICOM files
    assert get_reader([str(tmp_path / "a.nii"), str(tmp_path / "b.nii")]) is None
    series = write_dicom_series(tmp_path / "series", np.zeros((3, 8, 8), np.int16))
    [(data, kwargs, _)] = get_reader(str(series))(str(series))
    assert data.shape == (3, 8, 8) and kwargs["metadata"][SOURCE_KEY].format == "dicom"


def test_save_labels_keeps_the_source_geometry_and_writes_dicom_seg(
    tmp_path: Path, write_dicom_series
):
    p = _volume(tmp_path)
    src = read_image(p)
    lab = np.zeros((5, 20, 24), np.int32)
    lab[1:3, 4:10, 5:12] = 2
    [out] = write_labels(str(tmp_path / "m.nii.gz"), lab, {"metadata": {SOURCE_KEY: src}})
    back = read_image(out)
    np.testing.assert_array_equal(back.array, lab)
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-6)
    with pytest.raises(DataError, match="DICOM-SEG needs a DICOM source"):
        save_labels(lab, tmp_path / "m.dcm", src)
    pytest.importorskip("highdicom")
    from medsa.data.dicom_seg import read_dicom_seg

    series = write_dicom_series(tmp_path / "series", np.zeros((3, 8, 8), np.int16))
    dsrc = read_image(series)
    dl = np.zeros((3, 8, 8), np.uint16)
    dl[1, 2:5, 2:6] = 1
    [seg] = save_labels(dl, tmp_path / "s.dcm", dsrc, {1: "lesion"})
    got, names = read_dicom_seg(seg, series)
    np.testing.assert_array_equal(got, dl)
    assert names == {1: "lesion"}


def test_manifest_is_valid_and_its_commands_import():
    import npe2

    mf = npe2.PluginManifest.from_file(MANIFEST)
    assert mf.name == "medsa"
    ids = {c.id for c in mf.contributions.commands}
    assert {"medsa.get_reader", "medsa.write_labels", "medsa.make_widget"} <= ids
    for c in mf.contributions.commands:
        assert callable(_resolve(c.python_name)), c.python_name
    pats = mf.contributions.readers[0].filename_patterns
    assert (
        "*.nii.gz" in pats and "*.nrrd" in pats and mf.contributions.readers[0].accepts_directories
    )


def _resolve(python_name: str):
    import importlib

    mod, _, attr = python_name.partition(":")
    return getattr(importlib.import_module(mod), attr)
