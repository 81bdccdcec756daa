"""Unit tests of path confinement (medsa.serve.paths) and mask run-length encoding."""

from __future__ import annotations

import os

import numpy as np
import pytest

from medsa.serve.images import default_save_name
from medsa.serve.paths import (
    AccessDenied,
    NotFound,
    RootSet,
    image_suffix,
    safe_output_name,
)
from medsa.serve.rle import rle_decode, rle_encode


@pytest.fixture
def rootset(roots) -> RootSet:
    return RootSet.from_paths([roots["root"]])


@pytest.mark.parametrize(
    "rel",
    [
        "../secret.txt",
        "sub/../../secret.txt",
        "..",
        "/etc/passwd",
        "//etc/passwd",
        "~/secret.txt",
        "C:/Windows/win.ini",
        "sub\\..\\..\\secret.txt",
        "rgb.png\x00.txt",
    ],
)
def test_traversal_is_denied(rootset, rel):
    with pytest.raises(AccessDenied):
        rootset.resolve(0, rel)


def test_inside_paths_resolve(rootset, roots):
    assert rootset.resolve(0, "rgb.png") == roots["root"] / "rgb.png"
    assert rootset.resolve(0, "./sub//vol.nii.gz") == roots["root"] / "sub" / "vol.nii.gz"
    assert rootset.resolve(0, "") == roots["root"]
    with pytest.raises(NotFound):
        rootset.resolve(0, "missing.png")
    with pytest.raises(NotFound):
        rootset.resolve(1, "rgb.png")  # only one root


def test_symlink_escaping_root_is_denied(rootset, roots):
    root = roots["root"]
    os.symlink(roots["tmp"] / "secret.png", root / "link.png")
    os.symlink(roots["tmp"], root / "linkdir")
    os.symlink(root / "rgb.png", root / "inside.png")  # stays inside: allowed
    with pytest.raises(AccessDenied):
        rootset.resolve(0, "link.png")
    with pytest.raises(AccessDenied):
        rootset.resolve(0, "linkdir/secret.png")
    assert rootset.resolve(0, "inside.png") == root / "rgb.png"
    assert not rootset.inside(0, root / "link.png")
    assert rootset.inside(0, root / "inside.png")


def test_safe_output_name():
    assert safe_output_name("case_01-mask.nii.gz") == "case_01-mask.nii.gz"
    for bad in ["../x.png", "a/b.png", ".hidden.png", "", "x\x00.png", "a..png", "é.png", "/x.png"]:
        with pytest.raises(AccessDenied):
            safe_output_name(bad)


def test_image_suffix_and_default_names():
    assert image_suffix("A.NII.GZ") == ".nii.gz"
    assert image_suffix("x.jpeg") == ".jpeg"
    assert image_suffix("x.txt") is None
    assert image_suffix(".png") is None  # a suffix alone is not a file name
    assert default_save_name("ct scan.nii.gz", True, "nifti") == "ct_scan_mask.nii.gz"
    assert default_save_name("a.dcm", True, "dicom") == "a_mask.nii.gz"
    assert default_save_name("b.mha", True, "mha") == "b_mask.mha"
    assert default_save_name("..évil.jpg", False, "jpeg") == "vil_mask.png"
    # every default name is accepted by the output-name check
    safe_output_name(default_save_name("..évil.jpg", False, "jpeg"))


def test_rle_round_trip():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 5), (33, 64)]:
        for p in (0.0, 0.3, 1.0):
            m = rng.random(shape) < p
            runs = rle_encode(m)
            assert sum(runs) == m.size
            assert runs[0] == (m.size if not m.any() else int(np.argmax(m.ravel())))
            np.testing.assert_array_equal(rle_decode(runs, shape), m)


def test_rle_decode_rejects_wrong_length():
    from medsa.errors import PromptError

    with pytest.raises(PromptError, match="sum to 12"):
        rle_decode([3, 4], (3, 4))
    with pytest.raises(PromptError):
        rle_decode([20, -8], (3, 4))
