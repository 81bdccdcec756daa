"""Round trips of every format with non-trivial geometry, and user-facing errors on bad files."""

from __future__ import annotations

import locale

import numpy as np
import pytest

from medsa.data.io import Image, _affine_to_itk, _itk_to_affine, read_image, write_image
from medsa.errors import DataError

# an oblique, non-axis-aligned orientation (rotation about z by 30 degrees)
_C, _S = np.cos(np.pi / 6), np.sin(np.pi / 6)
DIR3 = np.array([[_C, -_S, 0.0], [_S, _C, 0.0], [0.0, 0.0, 1.0]])


def _volume(dtype=np.int16) -> np.ndarray:
    rng = np.random.default_rng(0)
    # D, H, W all different so any axis swap changes the shape
    return rng.integers(-100, 300, size=(5, 7, 9)).astype(dtype)


def _ref3d(arr: np.ndarray) -> Image:
    return Image(arr, spacing=(2.5, 0.7, 0.9), origin=(-10.0, 20.0, 5.5), direction=DIR3)


def test_geometry_affine_roundtrip():
    sp, org = (2.5, 0.7, 0.9), (-10.0, 20.0, 5.5)
    aff = _itk_to_affine(sp, org, DIR3)
    # voxel (x=1, y=0, z=0) moves by sx along the first direction column, in RAS (x, y flipped)
    np.testing.assert_allclose(aff[:3, 0], np.diag([-1, -1, 1]) @ DIR3[:, 0] * 0.9)
    sp2, org2, dir2 = _affine_to_itk(aff, 3)
    np.testing.assert_allclose(sp2, sp)
    np.testing.assert_allclose(org2, org)
    np.testing.assert_allclose(dir2, DIR3, atol=1e-12)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_volume_roundtrip(tmp_path, ext):
    arr = _volume()
    ref = _ref3d(arr)
    out = write_image(arr, tmp_path / f"vol{ext}", like=ref)
    img = read_image(out)
    assert img.array.shape == (5, 7, 9)
    np.testing.assert_array_equal(img.array, arr)
    np.testing.assert_allclose(img.spacing, ref.spacing, rtol=1e-6)
    np.testing.assert_allclose(img.origin, ref.origin, atol=1e-5)
    np.testing.assert_allclose(img.direction, DIR3, atol=1e-5)
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-4)
    assert img.is_3d and img.spatial_shape == (5, 7, 9)
    # an independent reader (SimpleITK, what nnU-Net uses) sees the same geometry and voxels
    import SimpleITK as sitk

    s = sitk.ReadImage(str(out))
    np.testing.assert_allclose(s.GetSpacing(), (0.9, 0.7, 2.5), rtol=1e-6)
    np.testing.assert_allclose(s.GetOrigin(), ref.origin, atol=1e-4)
    np.testing.assert_allclose(np.reshape(s.GetDirection(), (3, 3)), DIR3, atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(s), arr)


def test_nifti_axis_mapping_matches_simpleitk(tmp_path):
    """Our (z, y, x) array of a NIfTI equals SimpleITK's view of the same file."""
    import nibabel as nib
    import SimpleITK as sitk

    data_xyz = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    path = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(data_xyz, np.diag([1.5, 2.0, 3.0, 1.0])), str(path))
    img = read_image(path)
    assert img.array.shape == (6, 5, 4)
    np.testing.assert_array_equal(img.array, sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
    assert img.spacing == pytest.approx((3.0, 2.0, 1.5))


def test_nifti_keeps_header_and_sheared_affine(tmp_path):
    import nibabel as nib

    aff = np.array(
        [[0.8, 0.1, 0.0, 3.0], [0.0, 1.2, 0.0, -4.0], [0.0, 0.0, 2.0, 7.0], [0, 0, 0, 1]]
    )
    nii = nib.Nifti1Image(np.zeros((6, 5, 4), np.float32), aff)
    nii.header["descrip"] = b"medsa-test"
    nii.set_sform(aff, code=2)
    src = tmp_path / "src.nii.gz"
    nib.save(nii, str(src))
    img = read_image(src)
    pred = (img.array > -1).astype(np.uint8)
    out = read_image(write_image(pred, tmp_path / "pred.nii.gz", like=img))
    back = nib.load(str(tmp_path / "pred.nii.gz"))
    np.testing.assert_allclose(back.affine, aff, atol=1e-5)
    assert int(back.header["sform_code"]) == 2
    assert back.header["descrip"].tobytes().startswith(b"medsa-test")
    assert out.array.dtype == np.uint8 and out.array.shape == img.array.shape


def test_multichannel_nifti_is_channel_first(tmp_path):
    import nibabel as nib

    data = np.random.default_rng(1).random((6, 5, 4, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "mc.nii.gz"))
    img = read_image(tmp_path / "mc.nii.gz")
    assert img.array.shape == (2, 4, 5, 6) and img.channel_axis == 0
    np.testing.assert_allclose(img.array[1, 3, 2, 0], data[0, 2, 3, 1])
    back = read_image(write_image(img.array, tmp_path / "mc2.nii.gz", like=img))
    np.testing.assert_array_equal(back.array, img.array)


def test_dicom_series_roundtrip(tmp_path, write_dicom_series):
    saved_locale = locale.setlocale(locale.LC_ALL)
    arr = _volume(np.int16)
    series = write_dicom_series(tmp_path / "series", arr)
    img = read_image(series)
    assert locale.setlocale(locale.LC_ALL) == saved_locale  # reading leaves the locale alone
    assert img.format == "dicom"
    np.testing.assert_array_equal(img.array, arr)
    np.testing.assert_allclose(img.spacing, (2.5, 0.7, 0.9), rtol=1e-5)
    np.testing.assert_allclose(img.origin, (-10.0, 20.0, 5.5), atol=1e-4)
    # single slice via pydicom: a 2D image with the in-plane spacing
    one = read_image(series / "002.dcm")
    assert one.array.shape == (7, 9)
    np.testing.assert_array_equal(one.array, arr[2])
    np.testing.assert_allclose(one.spacing, (0.7, 0.9), rtol=1e-5)
    # a prediction on a DICOM series is written as NIfTI with the same geometry
    pred = read_image(write_image(arr > 0, tmp_path / "pred.nii.gz", like=img))
    np.testing.assert_array_equal(pred.array, (arr > 0).astype(np.uint8))
    np.testing.assert_allclose(pred.origin, img.origin, atol=1e-4)
    with pytest.raises(DataError, match="DICOM"):
        write_image(arr, tmp_path / "x.dcm", like=img)


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif"])
@pytest.mark.parametrize("rgb", [False, True])
def test_2d_lossless_roundtrip(tmp_path, ext, rgb):
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, size=(11, 13, 3) if rgb else (11, 13), dtype=np.uint8)
    img = read_image(write_image(arr, tmp_path / f"im{ext}"))
    np.testing.assert_array_equal(img.array, arr)
    assert img.spatial_ndim == 2 and img.spatial_shape == (11, 13)
    assert (img.channel_axis == -1) is rgb


def test_jpeg_roundtrip_is_close(tmp_path):
    arr = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (24, 1))
    img = read_image(write_image(arr, tmp_path / "im.jpg"))
    assert img.array.shape == (24, 32) and img.mode == "L" and img.format == "jpeg"
    assert np.abs(img.array.astype(int) - arr).mean() < 3


def test_png_uint16_and_bool_mask(tmp_path):
    a16 = (np.arange(12 * 10).reshape(12, 10) * 500).astype(np.uint16)
    np.testing.assert_array_equal(read_image(write_image(a16, tmp_path / "a.png")).array, a16)
    mask = np.zeros((12, 10), bool)
    mask[2:5, 7:9] = True
    png = read_image(write_image(mask, tmp_path / "m.png")).array
    assert set(np.unique(png)) == {0, 255} and png[3, 8] == 255 and png[8, 3] == 0
    nii = read_image(write_image(mask[None], tmp_path / "m.nii.gz")).array
    assert set(np.unique(nii)) == {0, 1}


def test_tiff_spacing_roundtrip(tmp_path):
    arr = np.random.default_rng(3).integers(0, 1000, (4, 6, 8)).astype(np.uint16)
    ref = Image(arr, spacing=(3.0, 0.5, 0.25))
    img = read_image(write_image(arr, tmp_path / "v.tif", like=ref))
    np.testing.assert_array_equal(img.array, arr)
    np.testing.assert_allclose(img.spacing, (3.0, 0.5, 0.25), rtol=1e-4)
    a2 = read_image(write_image(arr[0], tmp_path / "s.tif", spacing=(0.5, 0.25)))
    np.testing.assert_allclose(a2.spacing, (0.5, 0.25), rtol=1e-4)


def test_palette_and_rgba_png(tmp_path):
    from PIL import Image as PILImage

    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    PILImage.fromarray(rgba).save(tmp_path / "rgba.png")
    img = read_image(tmp_path / "rgba.png")
    assert img.array.shape == (6, 8, 3) and img.mode == "RGBA"
    pal = PILImage.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8)).convert("P")
    pal.save(tmp_path / "pal.png")
    assert read_image(tmp_path / "pal.png").array.ndim in (2, 3)


@pytest.mark.parametrize("name", ["x.png", "x.jpg", "x.nii.gz", "x.mha", "x.tif", "x.dcm"])
def test_empty_and_corrupt_files(tmp_path, name):
    empty = tmp_path / name
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        read_image(empty)
    junk = tmp_path / f"junk_{name}"
    junk.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(DataError, match=junk.name):
        read_image(junk)


def test_truncated_files(tmp_path):
    arr = np.random.default_rng(4).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for name in ("t.png", "t.jpg", "t.nii.gz"):
        a = arr if name != "t.nii.gz" else arr[None, ..., 0]
        p = write_image(a, tmp_path / name)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        with pytest.raises(DataError, match=name):
            read_image(p)


def test_unknown_extension_and_missing(tmp_path):
    p = tmp_path / "data.xyz"
    p.write_text("hello")
    with pytest.raises(DataError, match="unknown image format"):
        read_image(p)
    with pytest.raises(DataError, match="no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(DataError, match="cannot write"):
        write_image(np.zeros((4, 4)), tmp_path / "out.xyz")
    empty_dir = tmp_path / "nodicom"
    empty_dir.mkdir()
    with pytest.raises(DataError, match="no readable DICOM"):
        read_image(empty_dir)


def test_write_is_atomic_and_checks_shape(tmp_path):
    good = write_image(np.ones((8, 8), np.uint8), tmp_path / "keep.png")
    before = good.read_bytes()
    # float data cannot be a PNG: the write fails and the existing file is untouched
    with pytest.raises(DataError, match="keep.png|PNG"):
        write_image(np.full((8, 8), 0.5), good)
    assert good.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["keep.png"]  # no temp files left
    ref = _ref3d(_volume())
    with pytest.raises(DataError, match="does not match"):
        write_image(np.zeros((5, 9, 7)), tmp_path / "p.nii.gz", like=ref)


def test_write_into_unusable_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match="output folder"):
        write_image(np.zeros((4, 4), np.uint8), blocker / "sub" / "a.png")


def test_single_dicom_falls_back_to_simpleitk_when_pydicom_cannot_decode(tmp_path, monkeypatch):
    import pydicom.dataset
    import SimpleITK as sitk

    arr = np.arange(7 * 9, dtype=np.int16).reshape(7, 9)
    sl = sitk.GetImageFromArray(arr)
    sl.SetSpacing((0.9, 0.7))
    path = tmp_path / "one.dcm"
    sitk.WriteImage(sl, str(path))

    def no_decoder(self):
        raise RuntimeError("no pixel data handler for this transfer syntax")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_decoder))
    img = read_image(path)
    assert img.array.shape == (7, 9) and img.spatial_ndim == 2
    np.testing.assert_array_equal(img.array, arr)
    np.testing.assert_allclose(img.spacing, (0.7, 0.9), rtol=1e-5)
