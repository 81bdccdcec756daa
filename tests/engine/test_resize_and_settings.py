"""data.resize_to end to end (config -> datasets -> predict / evaluate back on the original grid)
and the inference settings adapters carry (depth, resize_to, intensity, classes, backbone).

Tiny synthetic volumes on disk, a random ``vit_tiny`` at 64 px and the box oracle predictor.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from medsa.data.io import Image, read_image, write_image
from medsa.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see the fixture

SHAPE = (7, 30, 26)  # D, H, W of the synthetic volumes
SPACING = (2.5, 0.8, 0.7)  # (sz, sy, sx)
ORIGIN = (-12.0, 30.5, 7.25)  # (x, y, z)
DIRECTION = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def _geo() -> Image:
    return Image(np.zeros(SHAPE), spacing=SPACING, origin=ORIGIN, direction=DIRECTION)


def _volume(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    img = rng.normal(100, 10, SHAPE).astype(np.float32)
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:5, 8:20, 6:18] = 1
    img[lab > 0] += 400
    return img, lab


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    """nnU-Net layout, 4 cases of ``SHAPE`` with an oblique direction, class "organ" = 1."""
    root = tmp_path_factory.mktemp("vols")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        img, lab = _volume(rng)
        write_image(img, root / "imagesTr" / f"case{i}_0000.nii.gz", like=_geo())
        write_image(lab, root / "labelsTr" / f"case{i}.nii.gz", like=_geo())
    meta = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "organ": 1},
            "file_ending": ".nii.gz"}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _cfg(tmp: Path, data_root: Path, **data):
    from medsa.engine.config import config_from_dict

    return config_from_dict(
        {
            "model": {"backbone": "vit_tiny", "options": {"img_size": 64}},
            "method": {"method": "medsa", "rank": 4, "sd_trans": True},
            "data": {"root": str(data_root), "n_folds": 2, "test_fraction": 0.0, **data},
            "prompts": {"protocols": {"bbox0.75": 1.0}},
            "train": {"max_steps": 1, "batch_size": 1, "device": "cpu", "out_dir": str(tmp)},
            "logging": {"progress": False, "tensorboard": False, "csv": False},
        }
    )


# --------------------------------------------------------------------------- config -> dataset


def test_resize_to_and_intensity_config_keys_reach_the_datasets(tmp_path, volumes):
    from medsa.data.datasets import ChunkDataset3D, SliceDataset2D
    from medsa.engine.train import build_datasets, build_model

    cfg = _cfg(tmp_path, volumes, depth=4, resize_to=[12, 16, 20], intensity="percentile")
    train, val, _ = build_datasets(cfg, build_model(cfg))
    assert isinstance(train, ChunkDataset3D) and isinstance(val, ChunkDataset3D)
    assert train.resize_to == (12, 16, 20) and train.intensity == "percentile"
    arr, targets, _ = train._load(train.cases[0])
    assert arr.shape[:3] == (12, 16, 20) and targets["organ"].shape == (12, 16, 20)
    # 12 resized slices in chunks of 4: the object (slices 2-4 of 7 -> ~3.4-8.6 of 12) spans
    # chunks 0-2; without resize_to there would be 2 chunks of the 7 slices
    assert sorted({int(idx[0]) for _, idx, _ in train.index}) == [0, 4, 8]
    # [H, W]: 2D samples, every slice resized in-plane, slice count kept
    cfg2 = _cfg(tmp_path, volumes, resize_to=[16, 20])
    tr2, _, _ = build_datasets(cfg2, build_model(cfg2))
    assert isinstance(tr2, SliceDataset2D) and tr2.resize_to == (16, 20)
    assert tr2._load(tr2.cases[0])[0].shape[:3] == (7, 16, 20)
    with pytest.raises(ConfigError, match="resize_to"):
        _cfg(tmp_path, volumes, resize_to=[8, 8, 8, 8])


def test_resize_to_3d_on_2d_data_is_refused(tmp_path):
    from PIL import Image as PILImage

    from medsa.data.datasets import SliceDataset2D, load_dataset

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    PILImage.fromarray(np.full((20, 30), 90, np.uint8)).save(tmp_path / "images" / "a.png")
    m = np.zeros((20, 30), np.uint8)
    m[5:15, 5:20] = 255
    PILImage.fromarray(m).save(tmp_path / "masks" / "a.png")
    info = load_dataset(tmp_path)
    with pytest.raises(ConfigError, match=r"\(D, H, W\) for volumes"):
        SliceDataset2D(info, resize_to=(4, 10, 10))
    ds = SliceDataset2D(info, resize_to=(10, 15))
    arr, targets, _ = ds._load(ds.cases[0])
    fg = targets["foreground"]
    assert arr.shape == (1, 10, 15) and fg.shape == (1, 10, 15) and 30 <= fg.sum() <= 45


# --------------------------------------------------------------------------- adapter settings


@pytest.fixture(scope="module")
def trained(tmp_path_factory, volumes) -> Path:
    """An SD-Trans adapter trained 1 step on chunks of 3 slices of volumes resized to 10x16x16."""
    import torch

    from medsa.engine.train import Trainer, build_datasets, build_model

    out = tmp_path_factory.mktemp("run")
    cfg = _cfg(out, volumes, depth=3, resize_to=[10, 16, 16], intensity="percentile")
    torch.manual_seed(0)
    model = build_model(cfg)
    train, val, _ = build_datasets(cfg, model)
    Trainer(cfg, train, None, model=model).fit()
    return out / "checkpoints" / "last"


def test_trainer_records_inference_settings_and_resolver_reads_them(trained):
    from medsa.adapters.io import read_adapter_meta
    from medsa.engine.model_loading import resolve_inference

    inf = read_adapter_meta(trained)["inference"]
    assert inf["depth"] == 3 and inf["resize_to"] == [10, 16, 16]
    assert inf["intensity"] == "percentile" and inf["classes"] == {"organ": 1}
    assert inf["num_classes"] == 1 and inf["model_options"] == {"img_size": 64}
    s = resolve_inference(trained.with_suffix(".safetensors"))
    assert (s.backbone, s.depth, s.resize_to, s.intensity) == ("vit_tiny", 3, (10, 16, 16),
                                                               "percentile")  # fmt: skip
    assert s.from_adapter and s.model_options == {"img_size": 64}
    # agreeing options are fine, contradicting ones are errors naming the adapter's value
    assert resolve_inference(trained, depth=3, resize_to="10,16,16").depth == 3
    for kw, msg in [
        ({"depth": 1}, "--depth 1 (trained on chunks of 3 slices)"),
        ({"resize_to": "128,128,128"}, "--resize-to 128x128x128 (trained with 10x16x16)"),
        ({"intensity": "ct:abdomen"}, "--intensity ct:abdomen (trained with percentile)"),
        ({"backbone": "vit_b"}, "--backbone vit_b contradicts"),
    ]:
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            resolve_inference(trained, **kw)


def test_old_adapter_without_settings_loads_with_a_warning(trained, tmp_path):
    from medsa.engine.model_loading import build_inference_model, resolve_inference

    old = tmp_path / "old"
    meta = json.loads(trained.with_suffix(".json").read_text())
    del meta["inference"]
    old.with_suffix(".json").write_text(json.dumps(meta))
    old.with_suffix(".safetensors").write_bytes(trained.with_suffix(".safetensors").read_bytes())
    warned: list[str] = []
    s = resolve_inference(old, warn=warned.append)
    assert s.depth is None and not s.from_adapter and s.intensity == "auto"
    assert len(warned) == 1 and "pass --depth N" in warned[0]
    assert resolve_inference(old, depth=3, warn=warned.append).depth == 3 and len(warned) == 1
    # still loads (the old file has no model options: the backbone's own img_size)
    build_inference_model(resolve_inference(old, warn=warned.append), "cpu", random_weights=True)


def test_evaluate_uses_the_stored_depth_and_refuses_a_contradicting_one(
    trained, volumes, tmp_path, capsys, monkeypatch
):
    import medsa.engine.eval_case as ev
    from medsa.cli import main

    depths: list[int] = []

    class Recording(ev.ChunkEncoder):
        def __init__(self, predictor, x, depth):
            depths.append(depth)
            super().__init__(predictor, x, depth)

    monkeypatch.setattr(ev, "ChunkEncoder", Recording)
    base = ["evaluate", "--data", str(volumes), "--adapter", str(trained), "--device", "cpu",
            "--random-weights", "--protocols", "bbox0.75", "--noc-clicks", "0", "--worst", "0", "--max-cases", "1",
            "--quiet"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "e")]) == 0, capsys.readouterr().err
    assert depths == [3]  # SD-Trans chunks of the training depth, without --depth
    cfg = json.loads((tmp_path / "e" / "summary.json").read_text())["config"]
    assert cfg["depth"] == 3 and cfg["resize_to"] == [10, 16, 16]
    assert cfg["intensity"] == "percentile"
    capsys.readouterr()
    assert main([*base, "--depth", "1", "--out", str(tmp_path / "f")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "contradicts --depth 1 (trained on chunks of 3 slices)" in err[0]
    assert depths == [3] and not (tmp_path / "f").exists()


# --------------------------------------------------------------------------- back to the input grid


def _args(tmp_path: Path, **kw) -> argparse.Namespace:
    base = dict(out=tmp_path / "out", suffix="_mask", overlay=False, auto=False, everything=False,
                intensity="auto", depth=None, resize_to=None, slice=None, propagate=False,
                key_mask=None)  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def test_predict_resize_round_trips_geometry_and_mask(oracle, tmp_path):
    """The box oracle's mask (= the box) comes back on the input grid: same shape, affine,
    spacing and direction as the input, the box itself within one voxel, other slices empty."""
    from medsa.engine.inference import Prompt
    from medsa.engine.predict import PredictJob, run_job

    img, _ = _volume(np.random.default_rng(1))
    src = write_image(img, tmp_path / "vol.nii.gz", like=_geo())
    box = Prompt(box=np.array([6, 8, 17, 19], np.float32))  # x0, y0, x1, y1 (inclusive)
    job = PredictJob(src, Path("vol"))
    job.entry = {"slices": {"3": box.to_json()}}
    # 7 -> 4 slices: input slices 3 and 4 share model slice 2, only the prompted one is kept
    (out,) = run_job(job, oracle, _args(tmp_path, resize_to=(4, 16, 16)), None)
    assert oracle.size == (16, 16)  # the model saw the resized grid
    a, b = read_image(src), read_image(out)
    assert b.array.shape == a.array.shape == SHAPE
    np.testing.assert_allclose(b.affine, a.affine)
    assert b.spacing == a.spacing and np.allclose(b.direction, a.direction)
    m = b.array > 0
    expect = np.zeros(SHAPE[1:], bool)
    expect[8:20, 6:18] = True
    assert m[3].any() and (m[3] ^ expect).sum() <= 2 * (12 + 12) + 4  # one-voxel rim at most
    assert not np.delete(m, 3, axis=0).any()  # unprompted slices stay empty
    # without resize the oracle sees the input grid and the mask is exact
    (out2,) = run_job(job, oracle, _args(tmp_path, suffix="_plain"), None)
    assert oracle.size == SHAPE[1:] and (read_image(out2).array[3] > 0).sum() == expect.sum()


def test_predict_resize_2d_keeps_the_png_size(oracle, tmp_path):
    from PIL import Image as PILImage

    from medsa.engine.inference import Prompt
    from medsa.engine.predict import PredictJob, run_job

    PILImage.fromarray(np.full((40, 60), 120, np.uint8)).save(tmp_path / "a.png")
    job = PredictJob(tmp_path / "a.png", Path("a"))
    job.entry = Prompt(box=np.array([10, 5, 29, 24], np.float32)).to_json()
    (out,) = run_job(job, oracle, _args(tmp_path, resize_to=(20, 30)), None)
    assert oracle.size == (20, 30)
    m = np.asarray(PILImage.open(out)) > 0
    assert m.shape == (40, 60) and abs(int(m.sum()) - 20 * 20) <= 2 * 40 + 4


def test_evaluate_resize_scores_on_the_original_grid(oracle, volumes, monkeypatch):
    """Predictions made on the resized grid are scored on each case's own grid and spacing."""
    import medsa.engine.eval_case as ec
    import medsa.engine.evaluate as ev
    from medsa.data.datasets import load_dataset

    seen: list[tuple] = []
    real = ec.compute_metrics

    def spy(pred, gt, spacing, cfg):
        seen.append((pred.shape, gt.shape, tuple(spacing)))
        return real(pred, gt, spacing, cfg)

    monkeypatch.setattr(ec, "compute_metrics", spy)
    info = load_dataset(volumes)
    cfg = ev.EvalConfig(protocols=("box",), noc_clicks=0, worst_k=0, resize_to=(12, 16, 16))
    res = ev.evaluate_model(oracle, info, case_ids=["case0"], config=cfg)
    assert oracle.size == (16, 16)
    assert [(p, g) for p, g, _ in seen] == [(SHAPE, SHAPE)]
    np.testing.assert_allclose(seen[0][2], SPACING, rtol=1e-6)
    dice = res.rows[0]["dice"]
    assert 0.8 < dice < 1.0  # the box survives the round trip, up to the nearest-neighbour rim
    plain = ev.evaluate_model(oracle, info, case_ids=["case0"], config=ev.EvalConfig(
        protocols=("box",), noc_clicks=0, worst_k=0))  # fmt: skip
    assert plain.rows[0]["dice"] == 1.0


def test_serve_refuses_an_adapter_it_cannot_run_as_trained(trained):
    from medsa.serve.cli import build_model

    with pytest.raises(ConfigError, match="depth chunks of 3 slices, resize_to"):
        build_model(None, None, trained, "cpu")


def test_paper_3d_preset():
    from medsa.engine.config import load_config

    cfg = load_config("medsa_paper_3d")
    assert cfg.model.backbone == "vit_h" and cfg.method["sd_trans"] is True
    assert cfg.data.resize_to == [128, 128, 128] and cfg.data.depth == 16
    assert cfg.train.epochs == 60 and cfg.data.depth * cfg.train.batch_size == 16


def test_evaluate_names_classes_of_a_dataset_without_json_as_training_did(
    volumes, tmp_path, capsys
):
    import shutil

    import torch

    from medsa.adapters import MedSAConfig, apply_method, save_adapter
    from medsa.cli import main
    from medsa.sam import build_sam

    root = tmp_path / "nojson"  # imagesTr layout: label values only, classes "class_<v>"
    shutil.copytree(volumes / "imagesTr", root / "imagesTr")
    shutil.copytree(volumes / "labelsTr", root / "labelsTr")
    torch.manual_seed(0)
    save_adapter(apply_method(build_sam("vit_tiny"), MedSAConfig(rank=4)), tmp_path / "ad",
                 inference={"depth": None, "resize_to": None, "intensity": "auto",
                            "classes": {"organ": 1}})  # fmt: skip
    argv = ["evaluate", "--data", str(root), "--adapter", str(tmp_path / "ad"), "--device", "cpu",
            "--random-weights", "--protocols", "bbox0.75", "--noc-clicks", "0", "--worst", "0", "--max-cases", "1",
            "--quiet", "--out", str(tmp_path / "e")]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert list(summary["summary"]["bbox0.75"]["classes"]) == ["organ"]


def test_predict_cli_runs_the_adapter_as_trained(trained, tmp_path, capsys, monkeypatch):
    """No --depth / --resize-to: SD-Trans chunks of 3 on the 10x16x16 grid, mask back on the
    input grid with its affine; a contradicting --resize-to is one error line, exit 1."""
    import medsa.engine.inference as inf
    from medsa.cli import main

    seen: list[tuple] = []

    class Recording(inf.ChunkEncoder):
        def __init__(self, predictor, x, depth):
            seen.append((x.shape[:3], depth))
            super().__init__(predictor, x, depth)

    monkeypatch.setattr(inf, "ChunkEncoder", Recording)
    img, _ = _volume(np.random.default_rng(2))
    src = write_image(img, tmp_path / "v.nii.gz", like=_geo())
    argv = ["predict", str(src), "--adapter", str(trained), "--box", "6,8,17,19", "--slice", "3",
            "--device", "cpu", "--random-weights"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "p")]) == 0, capsys.readouterr().err
    assert seen == [((10, 16, 16), 3)]
    a, b = read_image(src), read_image(tmp_path / "p" / "v_mask.nii.gz")
    assert b.array.shape == SHAPE and np.allclose(a.affine, b.affine)
    assert not np.delete(b.array, 3, axis=0).any()
    capsys.readouterr()
    assert main([*argv, "--resize-to", "7,30,26", "--out", str(tmp_path / "q")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resize-to 7x30x26 (trained with 10x16x16)" in err[0]
