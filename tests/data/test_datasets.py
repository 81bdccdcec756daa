"""Dataset layouts, targets, torch datasets and leakage-free splits on tiny synthetic datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_helpers import DATA, make_folder_dataset, make_nnunet_dataset

from medsa.data.datasets import (
    ChunkDataset3D,
    SliceDataset2D,
    load_dataset,
    load_splits,
    make_splits,
    save_splits,
    train_val_test_split,
)
from medsa.data.io import write_image
from medsa.data.preprocess import SamTransform
from medsa.errors import ConfigError, DataError


def test_folder_layout_with_extra_class(tmp_path):
    root = make_folder_dataset(tmp_path / "ds")
    info = load_dataset(root)
    assert info.layout == "folder" and info.dim == 2 and info.file_ending == ".jpg"
    assert info.classes == {"foreground": 1, "cup": 2}  # masks_instance is not a class
    assert info.case_ids == ["c0", "c1", "c2", "c3"] and not info.issues
    img, targets = info.load_case(info.get("c1"))
    assert img.array.shape == (20, 30, 3)
    assert targets["foreground"].dtype == bool and targets["foreground"].sum() == 10 * 14
    assert targets["cup"][5, 16] and not targets["cup"][5, 26]
    lab = info.load_label_map(info.get("c1"))
    assert lab[5, 16] == 2 and lab[5, 22] == 1 and lab[15, 5] == 0  # cup painted over disc


def test_folder_layout_orphans_and_rename(tmp_path):
    root = make_folder_dataset(tmp_path / "ds", cup=False)
    (root / "masks_cup").rmdir()
    write_image(np.zeros((20, 30), np.uint8), root / "masks" / "orphan.png")
    write_image(np.zeros((20, 30, 3), np.uint8), root / "images" / "nomask.png")
    info = load_dataset(root, classes={"polyp": 1})
    assert info.classes == {"polyp": 1}
    assert [c.id for c in info.unlabelled] == ["nomask"]
    msgs = {(Path(i.path).name, i.severity) for i in info.issues}
    assert ("orphan.png", "error") in msgs and ("nomask.png", "warning") in msgs


def test_nnunet_layout_channels_and_classes(tmp_path):
    root = make_nnunet_dataset(tmp_path / "Dataset001")
    info = load_dataset(root)
    assert info.layout == "nnunet" and info.dim == 3 and info.label_values_declared
    assert info.classes == {"RV": 1, "LV": 2} and info.channel_names == ("mod0", "mod1")
    case = info.get("case2")
    assert [p.name for p in case.images] == ["case2_0000.nii.gz", "case2_0001.nii.gz"]
    img, targets = info.load_case(case)
    assert img.array.shape == (2, 6, 10, 12) and img.spacing == (3.0, 1.0, 1.0)
    assert img.array[1].mean() > img.array[0].mean() + 50  # channel order kept
    assert targets["LV"].sum() == 9 and targets["RV"].sum() == 2 * 3 * 6


def test_nnunet_missing_channel_and_orphan_label(tmp_path):
    root = make_nnunet_dataset(tmp_path / "D", n=3)
    (root / "imagesTr" / "case1_0001.nii.gz").unlink()
    write_image(np.zeros((6, 10, 12), np.uint8), root / "labelsTr" / "ghost.nii.gz")
    info = load_dataset(root)
    assert "case1" not in info.case_ids
    text = " ".join(f"{i.path}: {i.message}" for i in info.issues)
    assert "missing channel" in text and "ghost.nii.gz" in text


def test_imagestr_layout_without_dataset_json(tmp_path):
    root = make_nnunet_dataset(tmp_path / "ACDC", n=2, channels=1, dataset_json=False)
    info = load_dataset(root)
    assert info.layout == "imagesTr" and info.classes == {"class_1": 1, "class_2": 2}
    assert info.get("case0").images[0].name == "case0.nii.gz"


def test_msd_dataset_json(tmp_path):
    root = make_nnunet_dataset(tmp_path / "Task01", n=2, channels=1, dataset_json=False)
    meta = {
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "edema", "2": "tumour"},
        "training": [
            {"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"}
            for i in range(2)
        ],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    info = load_dataset(root)
    assert info.classes == {"edema": 1, "tumour": 2} and info.channel_names == ("MRI",)
    assert len(info.cases) == 2


def test_bad_layouts(tmp_path):
    with pytest.raises(DataError, match="unknown dataset layout"):
        load_dataset(tmp_path)
    root = make_nnunet_dataset(tmp_path / "D", n=1)
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="dataset.json"):
        load_dataset(root)


def test_slice_dataset_2d_per_class_tasks_and_prompts(tmp_path):
    info = load_dataset(make_folder_dataset(tmp_path / "ds", n=3))
    ds = SliceDataset2D(info, transform=SamTransform(size=32), prompt="box")
    assert len(ds) == 3 * 2  # every image x every class
    item = ds[1]
    assert item["image"].shape == (3, 32, 32) and item["target"].shape == (32, 32)
    assert item["class_name"] in ("foreground", "cup") and item["slice"] == 0
    # the box follows the target, in resized (x, y) coordinates
    ys, xs = np.nonzero(item["target"].numpy())
    b = item["box"].numpy()
    assert abs(b[0] - xs.min()) <= 1.5 and abs(b[3] - ys.max()) <= 1.5
    only_cup = SliceDataset2D(
        info, case_ids=["c0"], class_name="cup", transform=SamTransform(size=32)
    )
    assert len(only_cup) == 1 and only_cup[0]["class_name"] == "cup"
    multi = SliceDataset2D(info, mode="multiclass", transform=SamTransform(size=32))
    assert len(multi) == 3 and set(np.unique(multi[0]["target"].numpy())) == {0, 1, 2}
    with pytest.raises(ConfigError, match="unknown class"):
        SliceDataset2D(info, class_name="lesion")
    with pytest.raises(DataError, match="unknown case"):
        SliceDataset2D(info, case_ids=["zzz"])


def test_slice_dataset_on_volumes_keeps_only_nonempty_slices(tmp_path):
    info = load_dataset(make_nnunet_dataset(tmp_path / "D", n=2))
    ds = SliceDataset2D(info, transform=SamTransform(size=16), prompt="1pt", seed=3)
    # RV on slices 1, 2 and LV on slice 4, per case
    assert sorted((d[1], d[2]) for d in ds.index if d[0] == 0) == [(1, "RV"), (2, "RV"), (4, "LV")]
    a, b = ds[0], ds[0]
    np.testing.assert_array_equal(a["points"], b["points"])  # reproducible
    assert a["image"].shape == (3, 16, 16)


def test_chunk_dataset_3d(tmp_path):
    info = load_dataset(make_nnunet_dataset(tmp_path / "D", n=2))
    ds = ChunkDataset3D(
        info, depth=4, class_name="RV", pad="zero", transform=SamTransform(size=16), prompt="box"
    )
    # 6 slices -> chunks [0..3], [4, 5, pad, pad]; RV only in the first
    assert len(ds) == 2
    it = ds[0]
    assert it["image"].shape == (4, 3, 16, 16) and it["target"].shape == (4, 16, 16)
    assert it["valid"].tolist() == [True] * 4 and it["has_prompt"].tolist() == [
        False,
        True,
        True,
        False,
    ]
    assert it["box"].shape == (4, 4) and it["box"][0].abs().sum() == 0
    mc = ChunkDataset3D(
        info, depth=4, mode="multiclass", pad="zero", transform=SamTransform(size=16)
    )
    assert len(mc) == 4 and mc[1]["valid"].tolist() == [True, True, False, False]
    rs = ChunkDataset3D(info, depth=8, resize_to=(8, 12, 12), transform=SamTransform(size=16))
    assert rs[0]["image"].shape == (8, 3, 16, 16)
    folder = load_dataset(make_folder_dataset(tmp_path / "f", n=1))
    with pytest.raises(ConfigError, match="2D dataset"):
        ChunkDataset3D(folder, depth=2)


def test_splits_are_by_group_reproducible_and_roundtrip(tmp_path):
    ids = [f"patient{p:03d}_frame0{f}" for p in range(10) for f in (1, 2)]
    s1 = make_splits(ids, n_folds=5, seed=1, group_pattern=r"^(patient\d+)")
    assert s1 == make_splits(ids, n_folds=5, seed=1, group_pattern=r"^(patient\d+)")
    assert s1 != make_splits(ids, n_folds=5, seed=2, group_pattern=r"^(patient\d+)")
    vals = [c for f in s1 for c in f["val"]]
    assert sorted(vals) == sorted(ids)  # every case validated exactly once
    for f in s1:
        assert not set(f["train"]) & set(f["val"])
        pats = lambda xs: {x.split("_")[0] for x in xs}  # noqa: E731
        assert not pats(f["train"]) & pats(f["val"])  # both frames of a patient stay together
    p = save_splits(s1, tmp_path / "splits_final.json")
    assert load_splits(p, known_ids=ids) == s1
    tvt = train_val_test_split(ids, val=0.1, test=0.2, seed=0, group_pattern=r"^(patient\d+)")
    assert len(tvt["test"]) == 4 and len(tvt["val"]) == 2 and len(tvt["train"]) == 14
    with pytest.raises(ConfigError):
        make_splits(ids, n_folds=11, group_pattern=r"^(patient\d+)")


def test_load_splits_rejects_leakage_and_unknown(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps([{"train": ["a", "b"], "val": ["b"]}]))
    with pytest.raises(DataError, match="both"):
        load_splits(p)
    p.write_text(json.dumps({"train": ["a"], "val": ["zz"]}))
    with pytest.raises(DataError, match="unknown"):
        load_splits(p, known_ids=["a", "b"])
    p.write_text("[1, 2")
    with pytest.raises(DataError, match="cannot read"):
        load_splits(p)


@pytest.mark.realdata
def test_real_layouts():
    if not (DATA / "Kvasir-SEG").is_dir():
        pytest.skip("../shared/data not present")
    kv = load_dataset(DATA / "Kvasir-SEG")
    assert kv.layout == "folder" and len(kv.cases) == 200 and not kv.issues
    dr = load_dataset(DATA / "Drishti-GS")
    assert dr.classes == {"foreground": 1, "cup": 2}
    acdc = load_dataset(DATA / "ACDC", classes={"RV": 1, "MYO": 2, "LV": 3})
    assert acdc.layout == "imagesTr" and acdc.dim == 3 and len(acdc.cases) == 60
    img, t = acdc.load_case(acdc.cases[0])
    assert (
        img.array.ndim == 3 and set(t) == {"RV", "MYO", "LV"} and all(v.any() for v in t.values())
    )


def test_malformed_dataset_json_and_ignore_label(tmp_path):
    root = make_nnunet_dataset(tmp_path / "D", n=2)
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    (root / "dataset.json").write_text(json.dumps({**meta, "channel_names": {"zero": "CT"}}))
    with pytest.raises(DataError, match="malformed"):
        load_dataset(root)
    meta["labels"]["ignore"] = 9
    (root / "dataset.json").write_text(json.dumps(meta))
    info = load_dataset(root)
    assert info.classes == {"RV": 1, "LV": 2} and info.ignore_value == 9


def test_dataset_without_any_target_for_class_is_an_error(tmp_path):
    root = make_folder_dataset(tmp_path / "ds", n=2)
    for p in (root / "masks_cup").iterdir():
        write_image(np.zeros((20, 30), np.uint8), p)
    info = load_dataset(root)
    with pytest.raises(DataError, match="no slice with a non-empty target"):
        SliceDataset2D(info, class_name="cup")


def test_nnunet_2d_png_dataset(tmp_path):
    root = tmp_path / "Dataset002_2d"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(3):
        write_image(np.full((16, 24), 40 * i, np.uint8), root / "imagesTr" / f"im{i}_0000.png")
        lab = np.zeros((16, 24), np.uint8)
        lab[1:4, 15:20] = 1
        lab[10:12, 2:5] = 2
        write_image(lab, root / "labelsTr" / f"im{i}.png")
    meta = {
        "channel_names": {"0": "R"},
        "labels": {"background": 0, "a": 1, "b": 2},
        "file_ending": ".png",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    info = load_dataset(root)
    assert info.dim == 2 and info.case_ids == ["im0", "im1", "im2"]
    img, t = info.load_case(info.cases[0])
    assert img.array.shape == (16, 24) and t["a"][2, 16] and t["b"][11, 3] and not t["a"][11, 3]
    ds = SliceDataset2D(info, transform=SamTransform(size=32), prompt="3pt")
    assert len(ds) == 6 and ds[0]["points"].shape == (3, 2)


def test_volume_channels_are_scaled_separately(tmp_path):
    info = load_dataset(make_nnunet_dataset(tmp_path / "D", n=1))
    raw = SliceDataset2D(info, transform=lambda s: s)
    img = raw[0]["image"]
    assert img.shape == (10, 12, 2)  # (H, W, C) slice of a (C, D, H, W) case
    # channel 1 has values ~100 higher; after per-channel percentile scaling both span [0, 255]
    assert abs(float(img[..., 0].mean()) - float(img[..., 1].mean())) < 40
    assert img.min() >= 0 and img.max() <= 255


def test_case_missing_an_extra_class_mask_is_left_out(tmp_path):
    root = make_folder_dataset(tmp_path / "ds", n=3)
    (root / "masks_cup" / "c1.png").unlink()
    info = load_dataset(root)
    assert info.case_ids == ["c0", "c2"]
    assert any(
        "c1.jpg" in i.path and "masks_cup" in i.message and i.severity == "error"
        for i in info.issues
    )
