"""Builders of tiny synthetic datasets shared by tests/data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medsa.data.io import Image, write_image

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def make_folder_dataset(root: Path, n: int = 4, cup: bool = True) -> Path:
    rng = np.random.default_rng(0)
    for d in ("images", "masks", "masks_cup", "masks_instance"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
        write_image(img, root / "images" / f"c{i}.jpg")
        disc = np.zeros((20, 30), np.uint8)
        disc[2:12, 10 + i : 25] = 255
        write_image(disc, root / "masks" / f"c{i}.png")
        if cup:
            c = np.zeros((20, 30), np.uint8)
            c[4:8, 15:20] = 255
            write_image(c, root / "masks_cup" / f"c{i}.png")
        write_image((disc > 0).astype(np.uint16) * 7, root / "masks_instance" / f"c{i}.png")
    return root


def make_nnunet_dataset(
    root: Path, n: int = 4, channels: int = 2, dataset_json: bool = True
) -> Path:
    rng = np.random.default_rng(1)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n):
        geo = Image(np.zeros((6, 10, 12)), spacing=(3.0, 1.0, 1.0))
        for c in range(channels):
            vol = rng.normal(100 * c, 10, (6, 10, 12)).astype(np.float32)
            name = f"case{i}_{c:04d}.nii.gz" if dataset_json else f"case{i}.nii.gz"
            write_image(vol, root / "imagesTr" / name, like=geo)
        lab = np.zeros((6, 10, 12), np.uint8)
        lab[1:3, 2:5, 3:9] = 1  # class 1 on slices 1-2
        lab[4, 5:8, 1:4] = 2  # class 2 on slice 4 only
        write_image(lab, root / "labelsTr" / f"case{i}.nii.gz", like=geo)
    if dataset_json:
        meta = {
            "channel_names": {str(c): f"mod{c}" for c in range(channels)},
            "labels": {"background": 0, "RV": 1, "LV": 2},
            "numTraining": n,
            "file_ending": ".nii.gz",
        }
        (root / "dataset.json").write_text(json.dumps(meta))
    return root
