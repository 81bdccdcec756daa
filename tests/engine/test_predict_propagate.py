"""``medsa predict --propagate`` / ``--key-mask``: key slices -> one label map for the volume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medsa.cli import main as cli_main
from medsa.data.io import Image, read_image, write_image
from medsa.engine.propagate import object_keys
from medsa.errors import PromptError

TINY = ["--backbone", "vit_tiny", "--device", "cpu", "--random-weights"]


def _two_tubes() -> tuple[np.ndarray, np.ndarray]:
    """``(12, 40, 50)``: object 1 (a square) on slices 2..8, object 2 (a disc) on slices 5..10."""
    yy, xx = np.mgrid[:40, :50]
    lab = np.zeros((12, 40, 50), np.uint8)
    lab[2:9, 5:15, 5:15] = 1
    for z in range(5, 11):
        lab[z][(yy - 25) ** 2 + (xx - 35) ** 2 <= (8 - (z - 5) * 0.5) ** 2] = 2
    img = np.where(lab > 0, 1000.0, 0.0).astype(np.float32)
    img += np.random.default_rng(0).normal(0, 5, img.shape).astype(np.float32)
    return img, lab


@pytest.fixture
def volume(tmp_path: Path) -> tuple[Path, np.ndarray]:
    img, lab = _two_tubes()
    path = tmp_path / "in" / "v.nii.gz"
    path.parent.mkdir()
    write_image(Image(img, spacing=(3.0, 0.8, 0.7), origin=(1.0, 2.0, 3.0)), path)
    return path, lab


@pytest.fixture
def stub(monkeypatch, component):
    """``medsa predict`` with the connected-component stub instead of a model."""
    import medsa.engine.model_loading as M

    monkeypatch.setattr(M, "build_inference_model", lambda *a, **k: component())


def test_propagate_two_objects_from_json_keys_one_label_map(volume, tmp_path, capsys, stub):
    path, lab = volume
    prompts = {
        "v.nii.gz": {
            "slices": {
                "4": [{"box": [5, 5, 14, 14]}],
                "8": [{"box": [5, 5, 14, 14]}, {"points": [[35, 25, 1]]}],
            }
        }
    }
    pf = tmp_path / "p.json"
    pf.write_text(json.dumps(prompts))
    out = tmp_path / "out"
    rc = cli_main(["predict", str(path), "--prompts", str(pf), "--propagate", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = read_image(out / "v_mask.nii.gz")
    np.testing.assert_array_equal(res.array, lab)  # both objects on all their slices, and only
    src = read_image(path)
    assert res.spacing == src.spacing and np.allclose(res.affine, src.affine)


def test_propagate_cli_box_and_key_mask(volume, tmp_path, capsys, stub):
    path, lab = volume
    out = tmp_path / "out"
    argv = ["predict", str(path), "--box", "28,18,42,32", "--slice", "6", "--propagate"]
    assert cli_main([*argv, "--out", str(out)]) == 0, capsys.readouterr().err
    v = read_image(out / "v_mask.nii.gz").array
    np.testing.assert_array_equal(v, lab == 2)
    # without --propagate only the key slice is segmented
    assert cli_main([*argv[:-1], "--out", str(tmp_path / "o2")]) == 0
    v2 = read_image(tmp_path / "o2" / "v_mask.nii.gz").array
    assert v2[6].any() and not np.delete(v2, 6, axis=0).any()
    # a 2D mask file as key on --slice, and a (D, H, W) label map with keys of both objects
    write_image((lab[3] == 1).astype(np.uint8), tmp_path / "k2d.nii.gz")
    rc = cli_main(
        ["predict", str(path), "--key-mask", str(tmp_path / "k2d.nii.gz"), "--slice", "3"]
        + ["--out", str(tmp_path / "o3")]
    )
    assert rc == 0, capsys.readouterr().err
    np.testing.assert_array_equal(read_image(tmp_path / "o3" / "v_mask.nii.gz").array, lab == 1)
    keys = np.zeros_like(lab)
    keys[7] = lab[7]
    write_image(Image(keys, spacing=(3.0, 0.8, 0.7)), tmp_path / "k3d.nii.gz")
    rc = cli_main(
        ["predict", str(path), "--key-mask", str(tmp_path / "k3d.nii.gz")]
        + ["--out", str(tmp_path / "o4")]
    )
    assert rc == 0, capsys.readouterr().err
    np.testing.assert_array_equal(read_image(tmp_path / "o4" / "v_mask.nii.gz").array, lab)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--propagate", "--everything"], "only one of|needs prompts"),
        (["--key-mask", "KEY"], "needs --slice"),
        (["--key-mask", "KEY", "--slice", "2", "--box", "1,1,5,5"], "only one of"),
    ],
)
def test_propagate_cli_errors(volume, tmp_path, capsys, stub, extra, message):
    path, _ = volume
    write_image(np.ones((40, 50), np.uint8), tmp_path / "k.png")
    extra = [str(tmp_path / "k.png") if e == "KEY" else e for e in extra]
    rc = cli_main(["predict", str(path), *extra, "--out", str(tmp_path / "o")])
    import re

    assert rc == 1 and re.search(message, capsys.readouterr().err)


def test_propagate_2d_image_refused(tmp_path, capsys, stub):
    write_image(np.zeros((20, 20), np.uint8), tmp_path / "a.png")
    rc = cli_main(
        ["predict", str(tmp_path / "a.png"), "--box", "1,1,5,5", "--propagate"]
        + ["--out", str(tmp_path / "o")]
    )
    assert rc == 1 and "apply to volumes" in capsys.readouterr().err


def test_object_keys():
    from medsa.data.prompts import Prompt

    p = Prompt(box=[1, 1, 3, 3])
    lab = np.zeros((3, 5, 5), np.uint8)
    lab[2, 1:3, 1:3] = 2
    objs = object_keys({0: [p, None], 1: [p]}, lab)
    assert [sorted(o) for o in objs] == [[0, 1], [2]]
    assert objs[1][2].dtype == bool and objs[1][2].sum() == 4
    with pytest.raises(PromptError, match="no key slice"):
        object_keys({0: [None]})


def test_propagate_tiny_model_end_to_end(volume, tmp_path, capsys):
    """The real encoder path (random weights): runs, writes a label map with the input's geometry."""
    path, _ = volume
    out = tmp_path / "out"
    rc = cli_main(
        ["predict", str(path), "--box", "5,5,14,14", "--slice", "4", "--propagate"]
        + ["--min-score", "-1", "--out", str(out), *TINY]
    )
    assert rc == 0, capsys.readouterr().err
    res = read_image(out / "v_mask.nii.gz")
    assert res.array.shape == (12, 40, 50) and res.spacing == read_image(path).spacing
