"""``medsa demo``: data discovery, the bundled sample, and a real LiteMedSAM run on it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsa.cli import main as cli_main
from medsa.engine import demo
from medsa.errors import DataError


def test_find_data_root_explicit_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder"):
        demo.find_data_root(tmp_path / "nope")


def test_find_data_root_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSA_DATA", str(tmp_path))
    assert demo.find_data_root(None) == tmp_path


def test_bundled_dataset_one_nucleus_per_case(tmp_path: Path) -> None:
    root = demo.bundled_dataset(tmp_path, max_objects=5)
    masks = sorted((root / "masks").glob("*.png"))
    assert len(masks) == 5 == len(list((root / "images").glob("*.png")))
    inst = np.asarray(Image.open(demo.BUNDLED_SAMPLE / "instances.png"))
    sizes = []
    for m in masks:
        a = np.asarray(Image.open(m))
        assert set(np.unique(a)) == {0, 255}
        ids = np.unique(inst[a > 0])
        assert len(ids) == 1  # exactly one nucleus
        assert np.array_equal(a > 0, inst == ids[0])
        sizes.append(int((a > 0).sum()))
    # the largest nuclei were kept
    all_sizes = np.sort(np.bincount(inst.ravel())[1:])[::-1]
    assert sorted(sizes, reverse=True) == all_sizes[:5].tolist()


def test_pick_cases_is_reproducible_and_bounded() -> None:
    ids = [f"c{i}" for i in range(20)]
    a = demo.pick_cases(ids, 5, seed=3)
    assert a == demo.pick_cases(ids, 5, seed=3)
    assert len(set(a)) == 5 and set(a) <= set(ids)
    assert demo.pick_cases(ids[:3], 5, seed=0) == ids[:3]


def test_demo_rejects_bad_cases(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["demo", "--sample", "--cases", "0"]) == 1
    assert "--cases must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_on_bundled_sample_with_real_litemedsam(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's main job, on the bundled sample: real weights, box prompts, Dice table."""
    assert cli_main(["demo", "--sample", "--cases", "4"]) == 0
    out = capsys.readouterr().out
    assert "DSB2018-nuclei (bundled)" in out and "Dice" in out
    mean = float(re.search(r"mean Dice over datasets: ([0-9.]+)", out).group(1))
    assert mean > 0.75, out


def test_demo_refuses_a_backbone_without_weights(capsys: pytest.CaptureFixture[str]) -> None:
    """As predict / evaluate / serve: no silent Dice table from a random model."""
    assert cli_main(["demo", "--sample", "--backbone", "vit_tiny", "--cases", "1"]) == 1
    err = capsys.readouterr().err
    assert "'vit_tiny' has no weights" in err and "--random-weights" in err
    assert cli_main(["demo", "--sample", "--checkpoint", "/no/such/file.pth"]) == 1
    assert "does not exist" in capsys.readouterr().err
