"""medsa evaluate / evaluate_model: plumbing with an oracle predictor, tiny model end-to-end,
output files, CLI errors, and a real-data LiteMedSAM check."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from medsa.cli import main as cli_main
from medsa.data.io import Image, write_image
from medsa.engine.evaluate import EvalConfig, evaluate_model
from medsa.engine.evaluate_cli import write_outputs
from medsa.engine.report import markdown_table, summarize
from medsa.errors import ConfigError, DataError

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@dataclass
class _Case:
    id: str


class SyntheticDataset:
    """Duck-typed ``DatasetInfo``: rectangles of two classes, 2D ``(H, W)`` or 3D ``(D, H, W)``."""

    def __init__(self, dim: int, n: int = 2) -> None:
        self.dim, self.root = dim, Path("synthetic")
        self.classes = {"disc": 1, "cup": 2}
        self.cases = [_Case(f"case{i}") for i in range(n)]

    @property
    def case_ids(self) -> list[str]:
        return [c.id for c in self.cases]

    def load_case(self, case: _Case):
        i = int(case.id[4:])
        rng = np.random.default_rng(i)
        shape = (5, 40, 48) if self.dim == 3 else (40, 48)
        disc, cup = np.zeros(shape, bool), np.zeros(shape, bool)
        disc[..., 4 + i : 20, 6:30] = True
        cup[..., 24:34, 30 : 44 - i] = True
        if self.dim == 3:
            disc[[0, 4]] = False  # absent on some slices
            cup[:2] = False
        spacing = (3.0, 0.5, 0.8) if self.dim == 3 else (0.5, 0.8)
        img = Image(rng.normal(size=shape).astype(np.float32), spacing=spacing)
        return img, {"disc": disc, "cup": cup}


@pytest.mark.parametrize("dim", [2, 3])
def test_oracle_gives_perfect_scores_and_per_slice_prompts(oracle, dim):
    """Tight boxes on rectangles + a predictor that returns the box = exact masks; in 3D this only
    holds if every target slice is prompted and the others stay empty."""
    ds = SyntheticDataset(dim)
    res = evaluate_model(
        oracle, ds, config=EvalConfig(protocols=("box",), seeds=(0, 1), noc_clicks=0, worst_k=0)
    )
    assert len(res.rows) == 2 * 2 * 1 * 2
    for r in res.rows:
        assert (r["dice"], r["iou"], r["hd95"], r["nsd"]) == (1.0, 1.0, 0.0, 1.0)
    # the encoder runs once per image / target slice, shared by seeds and classes
    assert oracle.n_set == (2 if dim == 2 else 2 * 4)


def test_jittered_boxes_score_below_one_and_seeds_differ(oracle):
    res = evaluate_model(
        oracle,
        SyntheticDataset(2, n=3),
        config=EvalConfig(
            protocols=("bbox0.5", "bbox0.75"), seeds=(0, 1, 2), noc_clicks=0, worst_k=0
        ),
    )
    s = res.summary
    d5, d75 = s["bbox0.5"]["avg"]["dice"], s["bbox0.75"]["avg"]["dice"]
    assert d5["mean"] < d75["mean"] < 1.0  # looser boxes -> worse masks
    assert d5["std"] > 0  # different seeds, different boxes
    # reproducible: same seeds, same numbers
    again = evaluate_model(
        oracle,
        SyntheticDataset(2, n=3),
        config=EvalConfig(protocols=("bbox0.5",), seeds=(0, 1, 2), noc_clicks=0, worst_k=0),
    )
    a = [r["dice"] for r in res.rows if r["protocol"] == "bbox0.5"]
    assert a == [r["dice"] for r in again.rows]


def test_summary_aggregation_and_table():
    rows = []
    for seed, vals in ((0, (0.8, 0.6)), (1, (0.6, 0.4))):
        for case, v in zip(("a", "b"), vals, strict=True):
            rows.append(
                {
                    "case_id": case,
                    "class": "x",
                    "protocol": "1pt",
                    "seed": seed,
                    "dice": v,
                    "iou": v,
                    "hd95": float("nan") if case == "b" else 2.0,
                    "nsd": v,
                }
            )
    s = summarize(rows)
    d = s["1pt"]["classes"]["x"]["dice"]
    assert d["mean"] == pytest.approx(0.6)  # seed means 0.7 and 0.5
    assert d["std"] == pytest.approx(np.std([0.7, 0.5], ddof=1))
    assert s["1pt"]["classes"]["x"]["hd95"]["mean"] == 2.0  # NaN skipped ...
    assert s["1pt"]["avg"]["hd95_undefined"] == 2  # ... and counted
    table = markdown_table(s, "Med-SA", n_seeds=2)
    header = table.splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")] == ["Model", "x", "Avg", "HD95 ↓"]
    assert "| Med-SA 1-point | 60.0 ± 14.1 | 60.0 ± 14.1 | 2.00 ± 0.00 |" in table


@pytest.mark.slow
def test_evaluate_tiny_model_3d_writes_all_outputs(tiny_model, tmp_path):
    # depth=2: chunks of 2 slices through the encoder (3D-adapter path)
    cfg = EvalConfig(protocols=("1pt", "bbox0.75"), seeds=(0, 1), noc_clicks=2, worst_k=2, depth=2)
    res = evaluate_model(tiny_model, SyntheticDataset(3), config=cfg, keep_worst=True)
    assert len(res.rows) == 2 * 2 * 2 * 2
    assert set(res.noc) == {"disc", "cup"} and all(len(v) == 2 for v in res.noc.values())
    for r in res.rows:
        assert 0.0 <= r["dice"] <= 1.0 and 0.0 <= r["nsd"] <= 1.0
    files = {p.name for p in write_outputs(res, tmp_path, "tiny")}
    assert files == {
        "metrics.csv",
        "summary.json",
        "results.md",
        "dice_per_class.png",
        "noc.png",
        "worst_cases.png",
    }
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert summary["n_cases"] == 2 and set(summary["summary"]) == {"1pt", "bbox0.75"}
    assert not tiny_model.training


def _write_2d_dataset(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        img = (rng.random((48, 56, 3)) * 255).astype(np.uint8)
        m = np.zeros((48, 56), np.uint8)
        m[8 + i : 30, 10 : 40 - i] = 255
        write_image(img, root / "images" / f"img{i}.png")
        write_image(m, root / "masks" / f"img{i}.png")
    return root


def test_evaluate_cli_end_to_end_2d(tmp_path, capsys):
    pytest.importorskip("medsa.data.datasets")
    data = _write_2d_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    rc = cli_main(
        [
            "evaluate",
            "--data",
            str(data),
            "--backbone",
            "vit_tiny",
            "--random-weights",
            "--device",
            "cpu",
            "--protocols",
            "1pt,3pt,bbox0.5",
            "--seeds",
            "0,1",
            "--noc-clicks",
            "2",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    with (out / "metrics.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    n_classes = len({r["class"] for r in rows})
    assert len(rows) == 3 * n_classes * 3 * 2
    assert {r["protocol"] for r in rows} == {"1pt", "3pt", "bbox0.5"}
    md = (out / "results.md").read_text(encoding="utf-8")
    header = next(ln for ln in md.splitlines() if ln.startswith("| Model"))
    assert header.split("|")[-3].strip() == "Avg" and "HD95" in header.split("|")[-2]
    assert sum(ln.startswith("| vit_tiny ") for ln in md.splitlines()) == 3
    for name in ("summary.json", "dice_per_class.png", "noc.png", "worst_cases.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--protocols", "2pt"], "unknown protocol"),
        (["--seeds", "a,b"], "--seeds"),
        (["--fold", "1"], "--split"),
        (["--subset", "test"], "--split"),  # no split: would silently score every case
        (["--classes", "liver"], "unknown class"),
        (["--device", "tpu"], "device"),
    ],
)
def test_evaluate_cli_errors(tmp_path, capsys, argv, message):
    pytest.importorskip("medsa.data.datasets")
    data = _write_2d_dataset(tmp_path / "ds", n=1)
    rc = cli_main(
        [
            "evaluate",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o"),
            "--backbone",
            "vit_tiny",
            "--random-weights",
            *argv,
        ]
    )
    assert rc == 1
    assert message in capsys.readouterr().err


def test_evaluate_missing_data_and_bad_config(tmp_path, capsys):
    rc = cli_main(["evaluate", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert rc == 1 and "does not exist" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        EvalConfig(protocols=())
    with pytest.raises(ConfigError):
        EvalConfig(protocols=("1pt", "1pt"))
    with pytest.raises(DataError, match="not in the dataset"):
        evaluate_model(object(), SyntheticDataset(2), case_ids=["zzz"])


FAST = ["--backbone", "vit_tiny", "--random-weights", "--device", "cpu", "--protocols", "bbox0.5",
        "--noc-clicks", "0", "--worst", "0", "--quiet"]  # fmt: skip


def _write_3d_dataset(root: Path, n: int = 2) -> Path:
    """nnU-Net layout, one channel, volumes (4, 16, 20) with spacing (3, 1, 1)."""
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    geo = Image(np.zeros((4, 16, 20)), spacing=(3.0, 1.0, 1.0))
    for i in range(n):
        write_image(rng.normal(100, 10, (4, 16, 20)).astype(np.float32),
                    root / "imagesTr" / f"case{i}_0000.nii.gz", like=geo)  # fmt: skip
        lab = np.zeros((4, 16, 20), np.uint8)
        lab[1:3, 3:9, 4:12] = 1
        write_image(lab, root / "labelsTr" / f"case{i}.nii.gz", like=geo)
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1},
            "numTraining": n, "file_ending": ".nii.gz"}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_evaluate_refuses_label_spacing_mismatch_as_check_data(tmp_path, capsys):
    """A label whose spacing differs from its image's (a check-data *error*) stops evaluate with
    the label file named, instead of scoring HD95 / NSD in the wrong millimetres."""
    from medsa.data.check import check_dataset

    data = _write_3d_dataset(tmp_path / "ds")
    lab = np.zeros((4, 16, 20), np.uint8)
    lab[1:3, 3:9, 4:12] = 1
    write_image(lab, data / "labelsTr" / "case1.nii.gz", spacing=(2.0, 1.0, 1.0))
    assert any(
        i["severity"] == "error" and "spacing" in i["message"] for i in check_dataset(data).issues
    )
    out = tmp_path / "o"
    rc = cli_main(["evaluate", "--data", str(data), "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert rc == 1 and "case1.nii.gz" in err and "spacing" in err and "Traceback" not in err
    assert not (out / "metrics.csv").exists()
    # an origin-only difference is a check-data warning: evaluated as before
    write_image(lab, data / "labelsTr" / "case1.nii.gz",
                like=Image(lab, spacing=(3.0, 1.0, 1.0), origin=(5, 0, 0)))  # fmt: skip
    assert cli_main(["evaluate", "--data", str(data), "--out", str(out), *FAST]) == 0


def test_evaluate_nan_image_names_the_file(tmp_path, capsys):
    data = _write_3d_dataset(tmp_path / "ds")
    vol = np.full((4, 16, 20), 100, np.float32)
    vol[0, 0, 0] = np.nan
    write_image(vol, data / "imagesTr" / "case0_0000.nii.gz", spacing=(3.0, 1.0, 1.0))
    rc = cli_main(["evaluate", "--data", str(data), "--out", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err
    assert rc == 1 and "case0_0000.nii.gz" in err and "NaN" in err


def test_evaluate_refuses_to_overwrite_results_without_flag(tmp_path, capsys, monkeypatch):
    """Existing results are refused before the model is loaded; --overwrite replaces them."""
    import medsa.engine.model_loading as ml

    data = _write_2d_dataset(tmp_path / "ds", n=1)
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.csv").write_text("old")
    argv = ["evaluate", "--data", str(data), "--out", str(out), *FAST]
    real = ml.build_inference_model

    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded before the output checks")

    monkeypatch.setattr(ml, "build_inference_model", no_model)
    rc = cli_main(argv)
    err = capsys.readouterr().err
    assert rc == 1 and "metrics.csv" in err and "--overwrite" in err
    assert (out / "metrics.csv").read_text() == "old"
    monkeypatch.setattr(ml, "build_inference_model", real)
    assert cli_main([*argv, "--overwrite"]) == 0
    assert (out / "metrics.csv").read_text().startswith("case_id")


def test_evaluate_unwritable_out_fails_before_work(tmp_path, capsys, monkeypatch):
    import medsa.engine.model_loading as ml

    data = _write_2d_dataset(tmp_path / "ds", n=1)
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "o"  # below a file: cannot be created, even as root
    monkeypatch.setattr(ml, "build_inference_model", lambda *a, **k: pytest.fail("model loaded"))
    rc = cli_main(["evaluate", "--data", str(data), "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert rc == 1 and str(out) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_evaluate_full_disk_is_one_clear_line_and_leaves_no_tmp(tmp_path, capsys, monkeypatch):
    """A write failing with ENOSPC after the work: one line naming --out and the file, the
    table still printed, no partial ``.tmp`` file left."""
    import csv as csv_mod
    import errno

    data = _write_2d_dataset(tmp_path / "ds", n=1)
    out = tmp_path / "o"

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(csv_mod.DictWriter, "writeheader", full)
    rc = cli_main(["evaluate", "--data", str(data), "--out", str(out), *FAST])
    captured = capsys.readouterr()
    assert rc == 1 and "Traceback" not in captured.err
    assert "no space left" in captured.err and str(out) in captured.err
    assert "metrics.csv" in captured.err
    assert "| vit_tiny" in captured.out  # the numbers are not lost
    assert not list(out.glob("*.tmp"))


@pytest.mark.realdata
@pytest.mark.slow
def test_litemedsam_kvasir_bbox_realdata(tmp_path):
    """LiteMedSAM with jittered-box prompts (BBox 0.75) on 4 Kvasir-SEG polyps: Dice > 0.7."""
    root = DATA / "Kvasir-SEG"
    if not root.is_dir():
        pytest.skip("../shared/data/Kvasir-SEG not available")
    datasets = pytest.importorskip("medsa.data.datasets")
    from medsa.sam import build_sam

    try:
        model = build_sam("lite_medsam")
    except Exception as e:  # weights missing -> skip, not fail
        pytest.skip(f"LiteMedSAM weights unavailable: {e}")
    ds = datasets.load_dataset(root)
    res = evaluate_model(
        model,
        ds,
        config=EvalConfig(
            protocols=("bbox0.75",), seeds=(0,), max_cases=4, noc_clicks=0, worst_k=0
        ),
    )
    assert len(res.rows) == 4
    dice = res.mean_dice("bbox0.75")
    assert dice > 0.7, dice
    assert all(math.isfinite(r["hd95"]) for r in res.rows)


def test_evaluate_cli_split_subset_and_adapter(tmp_path, capsys):
    """--split/--fold/--subset select the cases; --adapter rebuilds the adapter's own backbone."""
    pytest.importorskip("medsa.data.datasets")
    torch = pytest.importorskip("torch")
    from medsa.adapters import MedSAConfig, apply_method, save_adapter
    from medsa.sam import build_sam

    data = _write_2d_dataset(tmp_path / "ds", n=3)
    split = tmp_path / "splits.json"
    split.write_text(
        json.dumps(
            [
                {"train": ["img0", "img1"], "val": ["img2"]},
                {"train": ["img2"], "val": ["img0", "img1"]},
            ]
        )
    )
    torch.manual_seed(0)
    model = apply_method(build_sam("vit_tiny"), MedSAConfig())
    save_adapter(model, tmp_path / "ad" / "medsa")
    out = tmp_path / "out"
    rc = cli_main(
        [
            "evaluate",
            "--data",
            str(data),
            "--split",
            str(split),
            "--fold",
            "1",
            "--adapter",
            str(tmp_path / "ad" / "medsa.safetensors"),
            "--random-weights",  # the adapter holds only Med-SA's weights, vit_tiny has none
            "--device",
            "cpu",
            "--protocols",
            "bbox0.75",
            "--noc-clicks",
            "0",
            "--worst",
            "0",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    with (out / "metrics.csv").open(encoding="utf-8") as f:
        assert sorted(r["case_id"] for r in csv.DictReader(f)) == ["img0", "img1"]
    assert "vit_tiny + medsa" in (out / "results.md").read_text(encoding="utf-8")
    rc = cli_main(
        [
            "evaluate",
            "--data",
            str(data),
            "--split",
            str(split),
            "--fold",
            "2",
            "--backbone",
            "vit_tiny",
            "--random-weights",
            "--out",
            str(out),
        ]
    )
    assert rc == 1 and "out of range" in capsys.readouterr().err


@pytest.mark.slow
def test_everything_protocol_scores_best_automatic_mask(tiny_model):
    pytest.importorskip("medsa.sam.automatic")
    from medsa.engine.inference import best_overlap_mask, segment_everything
    from medsa.sam import SamPredictor

    opts = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    cfg = EvalConfig(
        protocols=("everything",), seeds=(0, 1), noc_clicks=0, worst_k=0, everything=opts
    )
    ds = SyntheticDataset(2, n=1)
    res = evaluate_model(tiny_model, ds, config=cfg)
    assert len(res.rows) == 1 * 2 * 1 * 2
    # deterministic: both seeds identical; and equal to the oracle choice among automatic masks
    img, targets = ds.load_case(ds.cases[0])
    from medsa.engine.metrics import dice

    auto = segment_everything(SamPredictor(tiny_model), img.array, **opts)
    assert len(auto) > 0
    for r in res.rows:
        best = best_overlap_mask(auto, targets[r["class"]])
        assert r["dice"] == pytest.approx(dice(best, targets[r["class"]]))


@pytest.fixture(scope="module")
def masam_model():
    torch = pytest.importorskip("torch")
    from medsa.adapters import MASAMConfig, apply_method
    from medsa.sam import build_sam

    torch.manual_seed(0)
    return apply_method(build_sam("vit_tiny"), MASAMConfig(num_classes=3)).eval()


@pytest.mark.slow
def test_auto_protocol_uses_masam_head_on_every_slice(masam_model, oracle):
    import torch

    from medsa.engine.inference import model_input, segment_auto
    from medsa.engine.metrics import compute_metrics
    from medsa.sam import SamPredictor

    ds = SyntheticDataset(3, n=1)
    cfg = EvalConfig(protocols=("auto",), seeds=(0, 1), noc_clicks=3, worst_k=0)
    res = evaluate_model(masam_model, ds, config=cfg)
    assert len(res.rows) == 1 * 2 * 1 * 2 and res.noc == {}  # no prompts -> no NoC curve
    img, targets = ds.load_case(ds.cases[0])
    x = model_input(img.array, True)
    pred = SamPredictor(masam_model)
    labels = []
    with torch.inference_mode():
        for xz in x:  # every slice, also those without any target
            pred.set_image(xz)
            labels.append(segment_auto(pred))
    labels = np.stack(labels)
    assert labels.shape == (5, 40, 48) and labels.max() < 3
    for r in res.rows:
        ref = compute_metrics(labels == ds.classes[r["class"]], targets[r["class"]], img.spacing)
        assert r["dice"] == pytest.approx(ref["dice"]) and r["nsd"] == pytest.approx(ref["nsd"])
    with pytest.raises(ConfigError, match="multi-class head"):
        evaluate_model(oracle, ds, config=cfg)


def test_predict_auto_with_masam_adapter(masam_model, tmp_path, capsys):
    from medsa.adapters import save_adapter

    save_adapter(masam_model, tmp_path / "masam")
    vol = Image(
        np.random.default_rng(0).normal(size=(3, 24, 28)).astype(np.float32),
        spacing=(2.0, 1.0, 1.0),
    )
    write_image(vol, tmp_path / "v.nii.gz")
    out = tmp_path / "out"
    rc = cli_main(
        [
            "predict",
            str(tmp_path / "v.nii.gz"),
            "--auto",
            "--adapter",
            str(tmp_path / "masam.safetensors"),
            "--random-weights",  # MA-SAM's adapter on vit_tiny, which has no weights
            "--depth",
            "2",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    from medsa.data.io import read_image

    lab = read_image(out / "v_mask.nii.gz").array
    assert lab.shape == (3, 24, 28) and lab.max() < 3
    rc = cli_main(
        [
            "predict",
            str(tmp_path / "v.nii.gz"),
            "--auto",
            "--backbone",
            "vit_tiny",
            "--random-weights",
            "--out",
            str(tmp_path / "out2"),
        ]
    )
    assert rc == 1 and "multi-class head" in capsys.readouterr().err


def test_protocol_seed_overrides_and_worst_cases_are_distinct(oracle):
    ds = SyntheticDataset(2, n=3)
    cfg = EvalConfig(protocols=("box",), seeds=(0,), noc_clicks=0, worst_k=3)
    res = evaluate_model(
        oracle, ds, protocols=["bbox0.5", "1pt"], seeds=[3, 4], config=cfg, keep_worst=True
    )
    assert {r["protocol"] for r in res.rows} == {"bbox0.5", "1pt"}
    assert {r["seed"] for r in res.rows} == {3, 4}
    keys = [it["key"] for it in res.worst_items]
    assert len(keys) == 3 and len(set(keys)) == 3  # one panel per (case, class)
    worst_dice = min(r["dice"] for r in res.rows)
    assert res.worst_items[0]["dice"] == worst_dice


def test_prompt_simulation_failure_is_reported_not_fatal(oracle, monkeypatch):
    import medsa.data.prompts as P
    from medsa.errors import PromptError

    real = P.get_protocol

    def flaky(name):
        fn = real(name)

        def wrapped(mask, rng):
            if mask.sum() < 200:  # the smaller "cup" target: no prompt can be built
                raise PromptError("could not build a box")
            return fn(mask, rng)

        return wrapped

    monkeypatch.setattr(P, "get_protocol", flaky)
    res = evaluate_model(
        oracle,
        SyntheticDataset(2, n=1),
        config=EvalConfig(protocols=("box",), noc_clicks=0, worst_k=0),
    )
    by_class = {r["class"]: r for r in res.rows}
    assert by_class["disc"]["dice"] == 1.0 and by_class["cup"]["dice"] == 0.0
    assert len(res.prompt_failures) == 1 and "cup" in res.prompt_failures[0]
