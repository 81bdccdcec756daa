"""Reading and writing medical images with their geometry.

Axis convention (the ONE place that maps between libraries):

- 2D images: ``array`` is ``(H, W)`` (grayscale) or ``(H, W, C)`` (RGB, channel last, as Pillow).
- 3D volumes: ``array`` is ``(D, H, W) = (z, y, x)`` in numpy order, i.e. what
  ``SimpleITK.GetArrayFromImage`` returns; multi-channel volumes (4D NIfTI) are ``(C, D, H, W)``.
  nibabel stores voxels as ``(x, y, z[, c])``; :func:`_nib_to_numpy` / :func:`_numpy_to_nib`
  transpose between the two and nothing else in medsa should.
- ``spacing`` follows the ARRAY axis order: 2D ``(sy, sx)``, 3D ``(sz, sy, sx)`` (as nnU-Net).
- ``origin`` / ``direction`` follow ITK: world ``(x, y[, z])`` in LPS, ``direction[i, j]`` = component
  i of the world direction of index axis j (index axes ordered x, y, z).
- ``affine`` is the NIfTI (RAS) 4x4 matrix mapping the voxel index ``(i, j, k) = (x, y, z)`` to world
  RAS mm. It is derived from spacing/origin/direction (LPS -> RAS flips x and y), except for NIfTI
  inputs, where the file's affine is kept verbatim (so sheared affines survive a round trip).

Every failure to read or write raises :class:`medsa.errors.DataError` naming the file. Writes are
atomic: the data goes to a temporary file in the target folder that is then ``os.replace``-d over
the destination, so a failed write never leaves a truncated file or corrupts an existing one.
"""

from __future__ import annotations

import contextlib
import locale
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsa._fs import atomic_write
from medsa.errors import DataError

__all__ = [
    "Image",
    "read_image",
    "write_image",
    "image_format",
    "image_suffix",
    "looks_like_dicom",
    "IMAGE_SUFFIXES",
    "READ_FORMATS",
    "WRITE_FORMATS",
]

#: extension -> format name (``.nii.gz`` is handled as a double extension)
_EXT_FORMAT: dict[str, str] = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".bmp": "bmp",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".mha": "mha",
    ".mhd": "mha",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".ima": "dicom",
}
#: every file name ending :func:`read_image` recognises (lower case; ``.nii.gz`` as one suffix)
IMAGE_SUFFIXES: tuple[str, ...] = tuple(_EXT_FORMAT)
READ_FORMATS = ("png", "jpeg", "bmp", "tiff", "nifti", "mha", "nrrd", "dicom")
#: DICOM is read-only: predictions on DICOM inputs are written as NIfTI/MHA with the same geometry.
WRITE_FORMATS = ("png", "jpeg", "bmp", "tiff", "nifti", "mha", "nrrd")
_RASTER = {"png": "PNG", "jpeg": "JPEG", "bmp": "BMP"}
# LPS (ITK / DICOM) <-> RAS (NIfTI): flip the x and y world axes.
_LPS_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Image:
    """An image or volume with its geometry.

    Attributes:
        array: 2D ``(H, W)`` / ``(H, W, C)``; 3D ``(D, H, W)`` / ``(C, D, H, W)`` (see module doc).
        spacing: voxel size in array axis order, 2D ``(sy, sx)``, 3D ``(sz, sy, sx)``.
        origin: world position (ITK, LPS) of voxel 0, ordered ``(x, y[, z])``.
        direction: ``(n, n)`` ITK direction cosines, index axes ordered ``(x, y[, z])``.
        affine: ``(4, 4)`` NIfTI RAS affine of the voxel index ``(x, y, z)``; derived if ``None``.
        format: source format (``"png"``, ``"nifti"``, ``"dicom"``, ...) or ``"array"``.
        path: source path, if read from disk.
        mode: Pillow mode of a 2D source (``"L"``, ``"RGB"``, ``"I;16"``, ...), else ``None``.
        header: the nibabel header of a NIfTI source (re-used when writing with ``like=``).
        meta: extra source metadata (e.g. DICOM series id, TIFF axes).
    """

    array: np.ndarray
    spacing: tuple[float, ...] | None = None
    origin: tuple[float, ...] | None = None
    direction: np.ndarray | None = None
    affine: np.ndarray | None = None
    format: str = "array"
    path: Path | None = None
    mode: str | None = None
    header: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    spatial_ndim: int | None = None

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.spatial_ndim is None:
            self.spatial_ndim = _guess_spatial_ndim(self.array)
        n = self.spatial_ndim
        if n not in (2, 3):
            raise DataError(
                f"unsupported image dimensionality {self.array.shape} ({self._where()})"
            )
        self.spacing = tuple(float(s) for s in (self.spacing or (1.0,) * n))
        self.origin = tuple(float(o) for o in (self.origin or (0.0,) * n))
        self.direction = np.eye(n) if self.direction is None else np.asarray(self.direction, float)
        if len(self.spacing) != n or len(self.origin) != n or self.direction.shape != (n, n):
            raise DataError(
                f"geometry does not match a {n}D image: spacing={self.spacing}, origin={self.origin},"
                f" direction shape={self.direction.shape} ({self._where()})"
            )
        if any(not np.isfinite(s) or s <= 0 for s in self.spacing):
            raise DataError(
                f"spacing must be positive and finite, got {self.spacing} ({self._where()})"
            )
        if self.affine is None:
            self.affine = _itk_to_affine(self.spacing, self.origin, self.direction)
        self.affine = np.asarray(self.affine, dtype=float)

    def _where(self) -> str:
        return str(self.path) if self.path is not None else "in-memory image"

    @property
    def is_3d(self) -> bool:
        return self.spatial_ndim == 3

    @property
    def channel_axis(self) -> int | None:
        """``-1`` for 2D ``(H, W, C)``, ``0`` for 3D ``(C, D, H, W)``, ``None`` without channels."""
        if self.array.ndim == self.spatial_ndim:
            return None
        return -1 if self.spatial_ndim == 2 else 0

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """``(H, W)`` or ``(D, H, W)``."""
        s = self.array.shape
        if self.channel_axis is None:
            return tuple(s)
        return tuple(s[:-1]) if self.channel_axis == -1 else tuple(s[1:])

    @property
    def spacing_xyz(self) -> tuple[float, ...]:
        """Spacing in ITK order ``(sx, sy[, sz])``."""
        return tuple(reversed(self.spacing))


def _guess_spatial_ndim(a: np.ndarray) -> int:
    if a.ndim == 2:
        return 2
    if a.ndim == 3:
        # (H, W, C) with a small channel count is a 2D colour image; otherwise a volume.
        return 2 if a.shape[-1] in (3, 4) and min(a.shape[:2]) > 4 else 3
    if a.ndim == 4:
        return 3
    return a.ndim


# --------------------------------------------------------------------------- geometry helpers


def _itk_to_affine(
    spacing: tuple[float, ...], origin: tuple[float, ...], direction: np.ndarray
) -> np.ndarray:
    """ITK geometry (spacing in array order) -> (4, 4) RAS affine of index (x, y, z)."""
    n = len(spacing)
    d3 = np.eye(3)
    d3[:n, :n] = direction
    s3 = np.ones(3)
    s3[:n] = list(reversed(spacing))
    o3 = np.zeros(3)
    o3[:n] = origin
    aff = np.eye(4)
    aff[:3, :3] = _LPS_RAS @ d3 @ np.diag(s3)
    aff[:3, 3] = _LPS_RAS @ o3
    return aff


def _affine_to_itk(
    affine: np.ndarray, n: int
) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray]:
    """(4, 4) RAS affine -> (spacing in array order, origin LPS xyz, direction), for ``n`` dims."""
    m = _LPS_RAS @ affine[:3, :3]
    sp = np.linalg.norm(m, axis=0)
    sp[sp == 0] = 1.0
    direction = m / sp
    origin = _LPS_RAS @ affine[:3, 3]
    return (
        tuple(float(s) for s in reversed(sp[:n])),
        tuple(float(o) for o in origin[:n]),
        direction[:n, :n].copy(),
    )


def _nib_to_numpy(data: np.ndarray) -> np.ndarray:
    """nibabel ``(x, y, z[, c])`` -> numpy ``(z, y, x)`` / ``(c, z, y, x)`` (2D: ``(x, y)`` -> ``(y, x)``)."""
    return np.ascontiguousarray(np.transpose(data, tuple(reversed(range(data.ndim)))))


def _numpy_to_nib(array: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_nib_to_numpy` (a full axis reversal is its own inverse)."""
    return np.transpose(array, tuple(reversed(range(array.ndim))))


# --------------------------------------------------------------------------- format detection


def image_format(path: str | os.PathLike[str]) -> str:
    """Format name of ``path`` from its extension (a folder is a DICOM series).

    Raises:
        DataError: unknown extension.
    """
    p = Path(path)
    if p.is_dir():
        return "dicom"
    name = p.name.lower()
    if name.endswith(".nii.gz"):
        return "nifti"
    ext = p.suffix.lower()
    if ext in _EXT_FORMAT:
        return _EXT_FORMAT[ext]
    if p.is_file() and looks_like_dicom(p):
        return "dicom"
    raise DataError(
        f"{p}: unknown image format {ext or '(no extension)'!r}; supported: "
        + ", ".join(sorted(set(_EXT_FORMAT)))
        + " or a DICOM folder"
    )


def image_suffix(name: str) -> str | None:
    """The recognised image suffix of a file name (lower case, ``.nii.gz`` as one), or None."""
    low = name.lower()
    if low.endswith(".nii.gz"):
        return ".nii.gz"
    suffix = Path(low).suffix
    return suffix if suffix in _EXT_FORMAT else None


def looks_like_dicom(p: Path) -> bool:
    """True if ``p`` is a file with the DICOM preamble magic (``DICM`` at byte 128)."""
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


# --------------------------------------------------------------------------- reading


@contextlib.contextmanager
def _keep_locale() -> Iterator[None]:
    """Restore the process locale after a library call.

    GDCM (inside SimpleITK) switches the C locale to "C" in some code paths (seen with its DICOM
    writer), which silently turns Python's default text encoding into ASCII for the rest of the
    process: every later ``open()`` of a UTF-8 file without an explicit encoding then fails. The
    readers and writers here run under this guard so medsa never leaves the process changed.
    """
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        if locale.setlocale(locale.LC_ALL) != saved:
            locale.setlocale(locale.LC_ALL, saved)


def read_image(path: str | os.PathLike[str]) -> Image:
    """Read an image, volume or DICOM series (folder) with its geometry.

    Args:
        path: ``.png .jpg .jpeg .bmp .tif .tiff .nii .nii.gz .mha .mhd .nrrd .nhdr .dcm`` or a folder
            holding one DICOM series.

    Returns:
        :class:`Image`; see the module docstring for the axis convention.

    Raises:
        DataError: missing, empty, corrupt, truncated or unsupported file (message has the path).
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_file() and p.stat().st_size == 0:
        raise DataError(f"{p}: empty file (0 bytes)")
    fmt = image_format(p)
    readers = {
        "png": _read_raster,
        "jpeg": _read_raster,
        "bmp": _read_raster,
        "tiff": _read_tiff,
        "nifti": _read_nifti,
        "mha": _read_sitk,
        "nrrd": _read_sitk,
        "dicom": _read_dicom,
    }
    try:
        with _keep_locale():
            img = readers[fmt](p)
    except DataError as e:
        if str(p) in str(e):
            raise
        raise DataError(f"{p}: {e}") from None
    except MemoryError:
        raise DataError(f"{p}: not enough memory to read this image") from None
    except Exception as e:  # any library failure on a bad file becomes a user-facing error
        raise DataError(f"{p}: cannot read {fmt} file ({type(e).__name__}: {e})") from e
    img.format, img.path = fmt if img.format == "array" else img.format, p
    if img.array.size == 0:
        raise DataError(f"{p}: image has no pixels (shape {img.array.shape})")
    return img


def _read_raster(p: Path) -> Image:
    from PIL import Image as PILImage

    # EXIF orientation is deliberately NOT applied: masks carry none, so rotating only the image
    # would misalign image and mask.
    with PILImage.open(p) as im:
        im.load()  # force decoding now so truncated files fail here
        mode = im.mode
        if mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif mode in ("1", "LA"):
            im = im.convert("L")
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        arr = np.array(im)
        if im.mode == "RGBA":
            arr = arr[..., :3]  # alpha carries no image content for segmentation
    if mode == "P" and arr.ndim == 3 and (arr == arr[..., :1]).all():
        arr = np.ascontiguousarray(arr[..., 0])  # grayscale palette -> (H, W)
    return Image(arr, format=_fmt_from_suffix(p), mode=mode, spatial_ndim=2)


def _fmt_from_suffix(p: Path) -> str:
    return _EXT_FORMAT.get(p.suffix.lower(), "array")


def _read_tiff(p: Path) -> Image:
    import tifffile

    with tifffile.TiffFile(p) as tf:
        series = tf.series[0]
        arr = series.asarray()
        axes = series.axes
        page = tf.pages[0]
        photometric = getattr(page, "photometric", None)
        xres = page.tags.get("XResolution")
        yres = page.tags.get("YResolution")
        ij = tf.imagej_metadata or {}
    has_samples = "S" in axes and arr.shape[-1] in (3, 4)
    spatial = arr.ndim - (1 if has_samples else 0)
    if has_samples and arr.shape[-1] == 4:
        arr = arr[..., :3]
    sx = sy = 1.0
    if xres is not None and yres is not None:
        sx, sy = _tiff_res_to_spacing(xres.value), _tiff_res_to_spacing(yres.value)
    if spatial == 2:
        return Image(
            arr,
            spacing=(sy, sx),
            format="tiff",
            mode="RGB" if has_samples else str(arr.dtype),
            meta={"axes": axes, "photometric": str(photometric)},
            spatial_ndim=2,
        )
    if spatial == 3 and not has_samples:
        sz = float(ij.get("spacing", 1.0))
        return Image(arr, spacing=(sz, sy, sx), format="tiff", meta={"axes": axes}, spatial_ndim=3)
    raise DataError(f"{p}: unsupported TIFF layout, axes {axes!r} shape {arr.shape}")


def _tiff_res_to_spacing(v: Any) -> float:
    num, den = (v if isinstance(v, tuple) else (v, 1))[:2]
    if not num or not den:
        return 1.0
    return float(den) / float(num)


def _read_nifti(p: Path) -> Image:
    import nibabel as nib

    nii = nib.load(str(p))
    data = np.asanyarray(nii.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3, 4):
        raise DataError(f"{p}: unsupported NIfTI shape {data.shape} (expected 2D, 3D or 4D)")
    n = 2 if data.ndim == 2 else 3
    affine = np.asarray(nii.affine, dtype=float)
    spacing, origin, direction = _affine_to_itk(affine, n)
    return Image(
        _nib_to_numpy(data),
        spacing=spacing,
        origin=origin,
        direction=direction,
        affine=affine,
        format="nifti",
        header=nii.header.copy(),
        spatial_ndim=n,
    )


def _from_sitk(img: Any, fmt: str) -> Image:
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img)  # (z, y, x[, c])
    n = img.GetDimension()
    if n not in (2, 3):
        raise DataError(f"unsupported {n}D image")
    comps = img.GetNumberOfComponentsPerPixel()
    if comps > 1 and n == 3:
        arr = np.moveaxis(arr, -1, 0)  # (C, D, H, W)
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(n, n)
    return Image(
        np.ascontiguousarray(arr),
        spacing=tuple(reversed(img.GetSpacing())),
        origin=tuple(img.GetOrigin()),
        direction=direction,
        format=fmt,
        spatial_ndim=n,
        mode=("RGB" if comps == 3 else None) if n == 2 else None,
    )


def _read_sitk(p: Path) -> Image:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(p))
    return _from_sitk(img, image_format(p))


def _read_dicom(p: Path) -> Image:
    if p.is_dir():
        return _read_dicom_series(p)
    return _read_dicom_file(p)


def _read_dicom_series(folder: Path) -> Image:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise DataError(f"{folder}: folder holds no readable DICOM series")
    # several series in one folder: read the largest (the others are usually scouts / localisers)
    files_per_id = {sid: reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in ids}
    sid = max(files_per_id, key=lambda s: len(files_per_id[s]))
    files = files_per_id[sid]
    reader.SetFileNames(files)
    img = reader.Execute()
    out = _from_sitk(img, "dicom")
    out.meta.update(
        {"series_id": sid, "n_files": len(files), "other_series": [s for s in ids if s != sid]}
    )
    return out


def _read_dicom_file(p: Path) -> Image:
    import pydicom

    ds = pydicom.dcmread(str(p))
    if "PixelData" not in ds:
        raise DataError(f"{p}: DICOM file has no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as e:  # compressed transfer syntax without a pydicom decoder plugin
        import SimpleITK as sitk

        try:
            return _squeeze_single_slice(_from_sitk(sitk.ReadImage(str(p)), "dicom"))
        except RuntimeError:
            raise DataError(f"{p}: cannot decode DICOM pixel data ({e})") from None
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    inter = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    if slope != 1.0 or inter != 0.0:
        arr = arr.astype(np.float32) * slope + inter
    sy, sx = (float(v) for v in getattr(ds, "PixelSpacing", (1.0, 1.0)))
    ipp = [float(v) for v in getattr(ds, "ImagePositionPatient", (0.0, 0.0, 0.0))]
    iop = [float(v) for v in getattr(ds, "ImageOrientationPatient", (1, 0, 0, 0, 1, 0))]
    row, col = np.array(iop[:3]), np.array(iop[3:])
    spp = int(getattr(ds, "SamplesPerPixel", 1))
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    meta = {"modality": str(getattr(ds, "Modality", "")), "ipp": ipp, "iop": iop}
    if frames > 1 and spp == 1:  # multi-frame: (D, H, W)
        normal = np.cross(row, col)
        sz = float(getattr(ds, "SpacingBetweenSlices", getattr(ds, "SliceThickness", 1.0)) or 1.0)
        direction = np.stack([row, col, normal], axis=1)
        return Image(arr, spacing=(sz, sy, sx), origin=tuple(ipp), direction=direction,
                     format="dicom", meta=meta, spatial_ndim=3)  # fmt: skip
    # single frame: a 2D image; the in-plane direction is kept when it is axis-aligned
    d2 = np.array([[row[0], col[0]], [row[1], col[1]]])
    if not np.allclose(np.abs(np.linalg.det(d2)), 1.0, atol=1e-3):
        d2 = np.eye(2)
    return Image(arr, spacing=(sy, sx), origin=tuple(ipp[:2]), direction=d2, format="dicom",
                 mode="RGB" if spp == 3 else None, meta=meta, spatial_ndim=2)  # fmt: skip


def _squeeze_single_slice(img: Image) -> Image:
    """GDCM reads a single 2D DICOM as a ``(1, H, W)`` volume: make it ``(H, W)`` like pydicom."""
    if img.is_3d and img.channel_axis is None and img.array.shape[0] == 1:
        return Image(
            img.array[0],
            spacing=img.spacing[1:],
            origin=img.origin[:2],
            direction=img.direction[:2, :2]
            if abs(np.linalg.det(img.direction[:2, :2])) > 0.999
            else None,
            format=img.format,
            meta=img.meta,
            spatial_ndim=2,
        )
    return img


# --------------------------------------------------------------------------- writing


def write_image(
    array: np.ndarray | Image,
    path: str | os.PathLike[str],
    like: Image | None = None,
    *,
    spacing: tuple[float, ...] | None = None,
    origin: tuple[float, ...] | None = None,
    direction: np.ndarray | None = None,
) -> Path:
    """Write ``array`` to ``path`` (format from the extension), atomically.

    Args:
        array: same axis convention as :class:`Image`; or an :class:`Image` (its geometry is used).
            ``bool`` arrays are written as ``uint8``: 0/255 in PNG/JPEG/BMP/TIFF (the 2D mask
            convention of the datasets), 0/1 in NIfTI/MHA/NRRD (the label-map convention).
        path: destination; ``.png .jpg .jpeg .bmp .tif .tiff .nii .nii.gz .mha .nrrd``.
        like: copy the geometry (and for NIfTI->NIfTI the header) of this image; ``array`` must
            have the same spatial shape.
        spacing, origin, direction: explicit geometry when ``like`` is not given.

    Returns:
        The written path.

    Raises:
        DataError: unsupported extension/dtype/shape, or a shape mismatch with ``like``.
    """
    p = Path(path)
    name = p.name.lower()
    fmt = "nifti" if name.endswith(".nii.gz") else _EXT_FORMAT.get(p.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{p}: cannot write format {p.suffix!r}; use one of .png .jpg .bmp .tif .nii.gz .mha .nrrd"
        )
    if fmt == "dicom":
        raise DataError(
            f"{p}: writing DICOM is not supported; write .nii.gz or .mha (the geometry is kept)"
        )
    if isinstance(array, Image):
        like = like or array
        array = array.array
    arr = np.asarray(array)
    if like is not None:
        n = like.spatial_ndim
        ref = Image(arr, spatial_ndim=n) if arr.ndim >= n else None
        if ref is None or ref.spatial_shape != like.spatial_shape:
            raise DataError(
                f"{p}: array shape {arr.shape} does not match the reference image "
                f"{like.spatial_shape} ({like._where()})"
            )
        img = Image(arr, spacing=like.spacing, origin=like.origin, direction=like.direction,
                    affine=like.affine, header=like.header, format=like.format,
                    spatial_ndim=n)  # fmt: skip
    else:
        img = Image(arr, spacing=spacing, origin=origin, direction=direction)
    if img.array.size == 0:
        raise DataError(f"{p}: refusing to write an empty array (shape {img.array.shape})")
    writers = {"nifti": _write_nifti, "mha": _write_sitk, "nrrd": _write_sitk, "tiff": _write_tiff}
    writer = writers.get(fmt, _write_raster)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{p}: cannot create the output folder ({e})") from None
    suffix = ".nii.gz" if name.endswith(".nii.gz") else p.suffix

    def write(tmp: str) -> None:
        with _keep_locale():
            writer(img, Path(tmp), fmt)

    try:
        atomic_write(p, write, suffix=suffix)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{p}: cannot write {fmt} file ({type(e).__name__}: {e})") from e
    return p


def _as_writable_dtype(a: np.ndarray, raster: bool) -> np.ndarray:
    if a.dtype == bool:
        return a.astype(np.uint8) * (255 if raster else 1)
    if a.dtype in (np.int64, np.uint64):
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        for t in (np.uint8, np.int16, np.int32) if raster is False else (np.uint8, np.uint16):
            if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
                return a.astype(t)
    if a.dtype == np.float16:
        return a.astype(np.float32)
    return a


def _write_raster(img: Image, tmp: Path, fmt: str) -> None:
    from PIL import Image as PILImage

    if img.spatial_ndim != 2:
        raise DataError(
            f"{fmt.upper()} holds 2D images only; got shape {img.array.shape}; use .nii.gz"
        )
    a = _as_writable_dtype(img.array, raster=True)
    if np.issubdtype(a.dtype, np.integer) and a.dtype != np.uint8 and a.ndim == 2 and fmt == "png":
        if a.min() >= 0 and a.max() <= 65535:
            a = a.astype(np.uint16)
    elif (
        np.issubdtype(a.dtype, np.integer)
        and a.dtype != np.uint8
        and a.min() >= 0
        and a.max() <= 255
    ):
        a = a.astype(np.uint8)
    if a.dtype not in (np.uint8, np.uint16) or (
        a.dtype == np.uint16 and (a.ndim != 2 or fmt != "png")
    ):
        raise DataError(
            f"{fmt.upper()} needs uint8 (or uint16 grayscale PNG) data, got {img.array.dtype}; "
            "rescale first or write .tif / .nii.gz"
        )
    if a.ndim == 3 and a.shape[-1] not in (3, 4):
        raise DataError(f"{fmt.upper()} needs (H, W), (H, W, 3) or (H, W, 4), got {a.shape}")
    im = PILImage.fromarray(np.ascontiguousarray(a))
    kwargs = {"quality": 95} if fmt == "jpeg" else {}
    im.save(tmp, format=_RASTER[fmt], **kwargs)


def _write_tiff(img: Image, tmp: Path, fmt: str) -> None:
    import tifffile

    a = _as_writable_dtype(img.array, raster=True)
    sp = img.spacing
    res = (1.0 / sp[-1], 1.0 / sp[-2])
    if img.spatial_ndim == 2:
        photometric = "rgb" if a.ndim == 3 else "minisblack"
        tifffile.imwrite(tmp, a, photometric=photometric, resolution=res, resolutionunit="NONE")
    elif img.channel_axis is None:
        # ImageJ hyperstack metadata carries the slice spacing (readable by Fiji as well)
        imagej = a.dtype in (np.uint8, np.uint16, np.float32)
        meta = {"spacing": sp[0], "axes": "ZYX"} if imagej else None
        tifffile.imwrite(
            tmp, a, photometric="minisblack", resolution=res, imagej=imagej, metadata=meta
        )
    else:
        raise DataError(f"multi-channel volumes {a.shape} cannot be written as TIFF; use .nii.gz")


def _write_nifti(img: Image, tmp: Path, fmt: str) -> None:
    import nibabel as nib

    a = _as_writable_dtype(img.array, raster=False)
    if img.channel_axis == -1:
        raise DataError(f"2D colour images {a.shape} cannot be written as NIfTI; use .png or .tif")
    data = _numpy_to_nib(a)
    header = None
    if img.header is not None and isinstance(img.header, nib.Nifti1Header):
        header = img.header.copy()
    nii = nib.Nifti1Image(data, img.affine, header=header)
    nii.set_data_dtype(data.dtype)
    nii.header.set_slope_inter(1.0, 0.0)  # store values verbatim (no scaling of the new data)
    if header is not None:
        # keep the source's qform/sform codes (scanner vs aligned space)
        nii.set_qform(img.affine, code=int(header["qform_code"]) or 1)
        nii.set_sform(img.affine, code=int(header["sform_code"]) or 1)
    nib.save(nii, str(tmp))


def _write_sitk(img: Image, tmp: Path, fmt: str) -> None:
    import SimpleITK as sitk

    a = _as_writable_dtype(img.array, raster=False)
    if img.channel_axis == 0:
        s = sitk.GetImageFromArray(np.moveaxis(a, 0, -1), isVector=True)
    else:
        s = sitk.GetImageFromArray(a, isVector=img.channel_axis == -1)
    s.SetSpacing(tuple(reversed(img.spacing)))
    s.SetOrigin(tuple(img.origin))
    s.SetDirection(tuple(np.asarray(img.direction, float).ravel()))
    sitk.WriteImage(s, str(tmp), useCompression=True)
