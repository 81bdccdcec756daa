"""Fixtures shared by every test folder."""

from __future__ import annotations

import locale
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

#: geometry of the DICOM series written by ``write_dicom_series`` (SimpleITK order x, y, z)
DICOM_SPACING = (0.9, 0.7, 2.5)
DICOM_ORIGIN = (-10.0, 20.0, 5.5)


@pytest.fixture
def write_dicom_series() -> Callable[[Path, np.ndarray], Path]:
    """Factory ``write(folder, arr)``: a CT DICOM series of the ``(D, H, W)`` array ``arr``, one
    file per slice, with spacing ``DICOM_SPACING`` and origin ``DICOM_ORIGIN``; returns ``folder``.

    GDCM's DICOM writer switches the C locale to "C" (Python's default text encoding then becomes
    ASCII for the whole process, which broke later tests); the writer restores it.
    """
    sitk = pytest.importorskip("SimpleITK")

    def write(folder: Path, arr: np.ndarray) -> Path:
        saved_locale = locale.setlocale(locale.LC_ALL)
        vol = sitk.GetImageFromArray(arr)
        vol.SetSpacing(DICOM_SPACING)
        vol.SetOrigin(DICOM_ORIGIN)
        folder.mkdir(parents=True)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        try:
            for z in range(arr.shape[0]):
                sl = vol[:, :, z]
                sl.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.1")  # series UID
                # one study and frame of reference for the whole series, as a scanner writes
                # (GDCM would invent a study per slice; DICOM-SEG needs them shared)
                sl.SetMetaData("0020|000d", "1.2.826.0.1.3680043.2.1125.1.2")
                sl.SetMetaData("0020|0052", "1.2.826.0.1.3680043.2.1125.1.3")
                sl.SetMetaData(
                    "0020|0032", "\\".join(map(str, vol.TransformIndexToPhysicalPoint((0, 0, z))))
                )
                sl.SetMetaData("0020|0013", str(z))
                sl.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
                sl.SetMetaData("0008|0060", "CT")
                writer.SetFileName(str(folder / f"{z:03d}.dcm"))
                writer.Execute(sl)
        finally:
            locale.setlocale(locale.LC_ALL, saved_locale)
        return folder

    return write


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test, restored afterwards: tiny models run faster on one
    thread than on two on a shared 2-core box (measured ~8x under load) and are immune to OpenMP
    spin-waiting."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
