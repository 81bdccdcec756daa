"""medsa predict: end-to-end on a tiny random-weight model, geometry, prompts, error paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medsa.cli import main as cli_main
from medsa.data.io import Image, read_image, write_image
from medsa.engine.inference import Prompt, segment_image, segment_volume
from medsa.engine.predict import (
    cli_prompt,
    collect_inputs,
    parse_prompt_entry,
    parse_slices,
)
from medsa.errors import DataError, PromptError

TINY = ["--backbone", "vit_tiny", "--random-weights", "--device", "cpu"]


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    write_image((rng.random((40, 50)) * 255).astype(np.uint8), d / "a.png")
    write_image((rng.random((36, 44, 3)) * 255).astype(np.uint8), d / "sub" / "b.jpg")
    vol = Image(
        rng.normal(size=(6, 40, 50)).astype(np.float32),
        spacing=(2.5, 0.8, 0.7),
        origin=(10.0, -5.0, 3.0),
        direction=np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]]),
    )
    write_image(vol, d / "v.nii.gz")
    (d / "notes.txt").write_text("not an image")
    return d


def test_predict_folder_with_cli_box_keeps_geometry(inputs: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    rc = cli_main(
        [
            "predict",
            str(inputs),
            "--out",
            str(out),
            "--box",
            "4,4,30,30",
            "--slice",
            "2:3",
            "--overlay",
            *TINY,
        ]
    )
    assert rc == 0, capsys.readouterr().err
    a = read_image(out / "a_mask.png")
    assert a.array.shape == (40, 50) and set(np.unique(a.array)) <= {0, 255}
    b = read_image(out / "sub" / "b_mask.png")  # JPEG input -> lossless PNG mask
    assert b.array.shape == (36, 44)
    src, v = read_image(inputs / "v.nii.gz"), read_image(out / "v_mask.nii.gz")
    assert v.array.shape == (6, 40, 50)
    np.testing.assert_allclose(v.spacing, src.spacing, rtol=1e-6)
    np.testing.assert_allclose(v.origin, src.origin, atol=1e-5)
    np.testing.assert_allclose(v.affine, src.affine, atol=1e-5)
    # only the prompted slices 2..3 can contain foreground
    assert not v.array[[0, 1, 4, 5]].any()
    for name in ("a_overlay.png", "v_overlay.png", "sub/b_overlay.png"):
        assert (out / name).stat().st_size > 0
    assert not (out / "notes_mask.png").exists()


def test_predict_json_prompts_multi_object_and_per_slice(inputs: Path, tmp_path: Path, capsys):
    prompts = {
        "a.png": [{"points": [[10, 12, 1], [30, 30, 0]]}, {"box": [20, 5, 45, 35]}],
        "sub/b.jpg": {"points": [[10, 12]]},
        "v.nii.gz": {
            "slices": {
                "1": {"box": [5, 5, 20, 20]},
                "4": [{"box": [5, 5, 20, 20]}, {"points": [[30, 30, 1]]}],
            }
        },
    }
    pf = tmp_path / "prompts.json"
    pf.write_text(json.dumps(prompts))
    out = tmp_path / "out"
    rc = cli_main(
        [
            "predict",
            str(inputs / "a.png"),
            str(inputs / "sub" / "b.jpg"),
            str(inputs / "v.nii.gz"),
            "--prompts",
            str(pf),
            "--out",
            str(out),
            *TINY,
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert set(np.unique(read_image(out / "a_mask.png").array)) <= {0, 1, 2}
    v = read_image(out / "v_mask.nii.gz").array
    assert set(np.unique(v)) <= {0, 1, 2}
    assert not v[[0, 2, 3, 5]].any()  # slices without prompts stay empty
    assert not (v[1] == 2).any()  # object 2 is only prompted on slice 4


def test_predict_errors_continue_and_exit_1(inputs: Path, tmp_path: Path, capsys):
    (inputs / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    rc = cli_main(
        [
            "predict",
            str(inputs / "a.png"),
            str(inputs / "broken.png"),
            str(tmp_path / "missing.png"),
            "--out",
            str(out),
            "--point",
            "10,10",
            *TINY,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert "broken.png" in err and "missing.png" in err
    assert (out / "a_mask.png").exists()  # the good file was still segmented
    # a point outside the image: clear message, no traceback, no output written
    rc = cli_main(
        ["predict", str(inputs / "a.png"), "--out", str(tmp_path / "o2"), "--point", "60,10", *TINY]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "outside" in err and "Traceback" not in err
    assert not (tmp_path / "o2" / "a_mask.png").exists()
    # a volume needs --slice for CLI prompts
    rc = cli_main(
        ["predict", str(inputs / "v.nii.gz"), "--out", str(out), "--box", "1,1,9,9", *TINY]
    )
    assert rc == 1 and "--slice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "no prompt"),
        (["--point", "1,2", "--everything"], "only one of"),
        (["--point", "1;2"], "comma-separated"),
        (["--point", "1,2,5"], "label must be 1"),
        (["--box", "1,2,3"], "x0,y0,x1,y1"),
        (["--prompts", "nope.json"], "does not exist"),
    ],
)
def test_predict_cli_prompt_errors(inputs: Path, tmp_path: Path, capsys, argv, message):
    rc = cli_main(["predict", str(inputs / "a.png"), "--out", str(tmp_path / "o"), *argv, *TINY])
    assert rc == 1
    assert message in capsys.readouterr().err


def test_predict_refuses_to_overwrite_results_without_flag(inputs: Path, tmp_path: Path, capsys):
    """Existing results are kept (exit 1, the file named) unless --overwrite; checked before the
    model is loaded, so nothing at all is written."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_mask.png").write_bytes(b"old result")
    argv = ["predict", str(inputs / "a.png"), str(inputs / "sub"), "--out", str(out)]
    rc = cli_main([*argv, "--box", "4,4,30,30", *TINY])
    err = capsys.readouterr().err
    assert rc == 1 and "a_mask.png" in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "a_mask.png").read_bytes() == b"old result"
    assert not (out / "b_mask.png").exists()  # refused before any work, not per file
    assert cli_main([*argv, "--box", "4,4,30,30", "--overwrite", *TINY]) == 0
    assert read_image(out / "a_mask.png").array.shape == (40, 50)


def test_predict_unwritable_out_fails_before_work(inputs: Path, tmp_path: Path, capsys):
    """An --out that cannot be created is one clear line naming it, before the model loads."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "sub"  # a folder below a file: cannot be created, even as root
    rc = cli_main(["predict", str(inputs / "a.png"), "--out", str(out), "--box", "1,1,9,9", *TINY])
    err = capsys.readouterr().err
    assert rc == 1 and str(out) in err and "--out" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_predict_slice_on_2d_image_is_an_error(inputs: Path, tmp_path: Path, capsys):
    """--slice names slices of a volume; given with a 2D image it is refused, not ignored."""
    out = tmp_path / "o"
    argv = ["predict", str(inputs / "a.png"), "--out", str(out), "--box", "4,4,30,30"]
    rc = cli_main([*argv, "--slice", "2", *TINY])
    err = capsys.readouterr().err
    assert rc == 1 and "a.png" in err and "--slice" in err and "2D" in err
    assert not (out / "a_mask.png").exists()


def test_predict_refuses_random_weights_unless_asked(inputs: Path, tmp_path: Path, capsys):
    """A backbone without weights gives meaningless masks: exit 1 unless --random-weights."""
    out = tmp_path / "o"
    argv = ["predict", str(inputs / "a.png"), "--out", str(out), "--box", "4,4,30,30"]
    rc = cli_main([*argv, "--backbone", "vit_tiny", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and "vit_tiny" in err and "--checkpoint" in err and "--random-weights" in err
    assert not (out / "a_mask.png").exists()
    assert cli_main([*argv, "--backbone", "vit_tiny", "--random-weights", "--device", "cpu"]) == 0


def test_prompt_parsing():
    p = cli_prompt(["1,2", "3,4,0"], "0,0,5,6")
    assert p.points.tolist() == [[1, 2], [3, 4]] and p.labels.tolist() == [1, 0]
    assert p.box.tolist() == [0, 0, 5, 6]
    assert cli_prompt(None, None) is None
    objs = parse_prompt_entry(
        {"objects": [{"box": [1, 2, 3, 4]}, {"points": [[1, 1, 0]]}]}, False, "f"
    )
    assert len(objs) == 2 and objs[1].labels.tolist() == [0]
    vol = parse_prompt_entry({"slices": {"3": {"box": [1, 2, 3, 4]}}}, True, "v")
    assert list(vol) == [3]
    with pytest.raises(PromptError, match="slices"):
        parse_prompt_entry({"box": [1, 2, 3, 4]}, True, "v")
    with pytest.raises(PromptError, match="unknown prompt keys"):
        parse_prompt_entry({"bx": [1, 2, 3, 4]}, False, "f")
    with pytest.raises(PromptError, match="x0 <= x1"):
        Prompt(box=[5, 5, 1, 1]).validate((10, 10))
    Prompt(box=[5, 5, 5, 7]).validate((10, 10))  # one pixel wide: a valid tight box
    with pytest.raises(PromptError, match="labels must be 1 or 0"):
        Prompt.from_json({"points": [[1, 2, 0.5]]})
    assert parse_slices("2:4", 6) == [2, 3, 4]
    with pytest.raises(PromptError, match="outside"):
        parse_slices("6", 6)


def test_engine_prompt_is_the_data_prompt():
    from medsa.data import prompts as data_prompts
    from medsa.engine import inference

    assert inference.Prompt is data_prompts.Prompt  # one prompt type, re-exported by the engine
    assert not hasattr(inference, "from_data_prompt")
    p = cli_prompt(None, "1,2,3,4")  # box only: points are the empty (0, 2) array
    assert p.points.shape == (0, 2) and not p.ambiguous and not p.empty


def test_collect_inputs_recurses_skips_out_and_disambiguates(tmp_path: Path):
    d = tmp_path / "data"
    (d / "x").mkdir(parents=True)
    for name in ("a.png", "a.jpg", "x/c.nii.gz", "x/readme.md", ".hidden.png"):
        (d / name).write_bytes(b"0")
    (d / "out").mkdir()
    (d / "out" / "a_mask.png").write_bytes(b"0")
    jobs, errors = collect_inputs([d, tmp_path / "nope"], out_dir=d / "out")
    rels = sorted(j.rel.as_posix() for j in jobs)
    assert rels == ["a_jpg", "a_png", "x/c"]
    assert len(errors) == 1 and "nope" in errors[0]


def test_segment_image_and_volume_with_oracle(oracle):
    img = np.zeros((30, 40), np.uint8)
    masks, scores = segment_image(
        oracle, img, [Prompt(box=[2, 3, 10, 8]), None, Prompt(points=[[20, 20]])]
    )
    assert masks.shape == (3, 30, 40)
    assert masks[0].sum() == 9 * 6 and not masks[1].any() and np.isnan(scores[1])
    assert scores[2] == pytest.approx(0.9)  # ambiguous point: best of the 3 outputs
    vol = np.random.default_rng(0).normal(size=(5, 30, 40))
    m, s = segment_volume(
        oracle, vol, {1: [Prompt(box=[0, 0, 4, 4])], 3: [None, Prompt(box=[1, 1, 2, 2])]}
    )
    assert m.shape == (2, 5, 30, 40) and oracle.n_set == 3  # 1 + 2 slices encoded
    assert m[0, 1].sum() == 25 and not m[0, [0, 2, 3, 4]].any() and m[1, 3].sum() == 4
    with pytest.raises(PromptError, match="outside the volume"):
        segment_volume(oracle, vol, {7: [Prompt(box=[0, 0, 4, 4])]})
    with pytest.raises(DataError):
        segment_volume(oracle, vol[0], {})


def test_empty_prompt_gives_empty_mask_like_none(oracle):
    masks, scores = segment_image(oracle, np.zeros((30, 40), np.uint8), [Prompt(), None])
    assert masks.shape == (2, 30, 40) and not masks.any() and np.isnan(scores).all()
    assert oracle.n_set == 0  # nothing to decode: the image encoder is not run


def test_batched_decoding_matches_single(tiny_model):
    from medsa.engine.inference import _decode_one, decode_prompts
    from medsa.sam import SamPredictor

    pred = SamPredictor(tiny_model)
    pred.set_image((np.random.default_rng(1).random((48, 64, 3)) * 255).astype(np.uint8))
    prompts = [
        Prompt(points=[[10, 12]]),
        Prompt(points=[[30, 20]]),
        Prompt(box=[5, 5, 40, 30]),
        Prompt(points=[[1, 2], [30, 40]], labels=[1, 0]),
        Prompt(box=[0, 0, 20, 20]),
    ]
    m, s, lr = decode_prompts(pred, prompts)
    for i, p in enumerate(prompts):
        m1, s1, lr1 = _decode_one(pred, p)
        assert s[i] == pytest.approx(s1, abs=1e-5)
        np.testing.assert_allclose(lr[i], lr1, atol=1e-4)
        assert (m[i] != m1).mean() < 1e-3  # threshold ties at most


def test_predict_everything_writes_label_map(inputs: Path, tmp_path: Path, capsys, monkeypatch):
    """--everything writes all automatic masks as labels 1..M (later, smaller masks on top);
    the generator is replaced by a fixed one so the expected map is known."""
    import medsa.engine.predict as P

    big = np.zeros((40, 50), bool)
    big[5:30, 5:40] = True
    small = np.zeros((40, 50), bool)
    small[10:15, 10:15] = True
    seen = {}

    def fake(predictor, image, **kw):
        seen.update(kw, shape=np.shape(image))
        return np.stack([big, small])

    monkeypatch.setattr(P, "segment_everything", fake)
    out = tmp_path / "out"
    rc = cli_main(
        [
            "predict",
            str(inputs / "a.png"),
            "--everything",
            "--points-per-side",
            "8",
            "--out",
            str(out),
            *TINY,
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert seen == {"points_per_side": 8, "intensity": "none", "shape": (40, 50, 3)}
    lab = read_image(out / "a_mask.png").array
    expected = np.where(small, 2, np.where(big, 1, 0))
    np.testing.assert_array_equal(lab, expected)


def test_segment_everything_runs_on_tiny_model(tiny_model):
    pytest.importorskip("medsa.sam.automatic")
    from medsa.engine.inference import segment_everything

    img = (np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8)
    masks = segment_everything(
        tiny_model, img, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0
    )
    assert masks.ndim == 3 and masks.shape[1:] == (40, 50) and masks.dtype == bool
    areas = masks.reshape(len(masks), -1).sum(1)
    assert (np.diff(areas) <= 0).all()  # largest first


def test_predict_dicom_series_folder_gives_nifti_with_same_geometry(
    tmp_path: Path, capsys, write_dicom_series
):
    arr = (np.random.default_rng(0).random((4, 24, 32)) * 1000).astype(np.int16)
    series = write_dicom_series(tmp_path / "in" / "series", arr)
    out = tmp_path / "out"
    rc = cli_main(
        [
            "predict",
            str(tmp_path / "in"),
            "--out",
            str(out),
            "--box",
            "2,2,20,15",
            "--slice",
            "1",
            *TINY,
        ]
    )
    assert rc == 0, capsys.readouterr().err
    src, pred = read_image(series), read_image(out / "series_mask.nii.gz")
    assert pred.array.shape == src.array.shape == (4, 24, 32)
    np.testing.assert_allclose(pred.spacing, src.spacing, rtol=1e-5)
    np.testing.assert_allclose(pred.origin, src.origin, atol=1e-4)
    assert not pred.array[[0, 2, 3]].any()


def test_model_input_matches_training_intensity_pipeline():
    from medsa.data.preprocess import scale_intensity
    from medsa.engine.inference import model_input
    from medsa.errors import ConfigError

    rng = np.random.default_rng(0)
    gray = (rng.random((6, 7)) * 255).astype(np.uint8)
    x = model_input(gray, False)
    assert x.shape == (6, 7, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x[..., 1], gray)  # uint8 kept as is
    ct = rng.normal(0, 400, size=(3, 6, 7)).astype(np.float32)
    v = model_input(ct, True)
    assert v.shape == (3, 6, 7, 3)
    np.testing.assert_allclose(v[..., 0], scale_intensity(ct, "auto"))  # one window per volume
    w = model_input(ct, True, "ct:0,400")
    assert w.min() == 0 and w.max() == 255
    two = model_input(np.stack([ct, -ct]), True)  # (C, D, H, W): per-channel, (c0, c1, c1)
    np.testing.assert_allclose(two[..., 1], two[..., 2])
    with pytest.raises(ConfigError):
        model_input(ct, True, "bogus")
    with pytest.raises(DataError, match="NaN"):
        model_input(np.full((4, 4), np.nan), False)


def test_chunk_encoder_matches_2d_embeddings_and_passes_depth(tiny_model):
    """Without 3D adapters a chunk embedding equals the per-slice one; with SD-Trans it differs
    (the depth reaches the encoder) and segment_volume(depth=...) uses it."""
    import torch

    from medsa.adapters import MedSAConfig, apply_method
    from medsa.engine.inference import ChunkEncoder, model_input
    from medsa.sam import SamPredictor, build_sam

    vol = np.random.default_rng(0).normal(size=(5, 30, 40)).astype(np.float32)
    x = model_input(vol, True)
    pred = SamPredictor(tiny_model)
    enc = ChunkEncoder(pred, x, depth=2)
    with torch.inference_mode():
        enc.set_slice(4)  # last chunk is (4, 4): padded by repetition
        chunk_feat = pred.features.clone()
        pred.set_image(x[4])
        torch.testing.assert_close(chunk_feat, pred.features, atol=1e-4, rtol=1e-4)

    torch.manual_seed(0)
    model3d = apply_method(build_sam("vit_tiny"), MedSAConfig(sd_trans=True)).eval()
    for m in model3d.modules():  # make the (zero-initialised) adapters matter
        if m.__class__.__name__ in ("SDTrans", "Adapter"):
            for prm in m.parameters():
                torch.nn.init.normal_(prm, std=0.1)
    p3 = SamPredictor(model3d)
    with torch.inference_mode():
        ChunkEncoder(p3, x, depth=5).set_slice(2)
        f3 = p3.features.clone()
        p3.set_image(x[2])
        assert (f3 - p3.features).abs().max() > 1e-3
        prompts = {2: [Prompt(box=[5, 5, 25, 20])]}
        m_depth, _ = segment_volume(p3, vol, prompts, depth=5)
        m_flat, _ = segment_volume(p3, vol, prompts)
    assert m_depth.shape == m_flat.shape == (1, 5, 30, 40)
    assert not m_depth[0, [0, 1, 3, 4]].any()


def test_segment_with_protocol_2d_and_3d(oracle, tiny_model):
    from medsa.engine.inference import segment_with_protocol

    rng = np.random.default_rng(0)
    vol = rng.normal(size=(4, 30, 40)).astype(np.float32)
    target = np.zeros((4, 30, 40), bool)
    target[1:3, 5:12, 8:20] = True
    # oracle predictor returns the box: tight boxes reproduce rectangles exactly, slice by slice
    out = segment_with_protocol(oracle, vol, target, "box", rng)
    np.testing.assert_array_equal(out, target)
    assert oracle.n_set == 2  # only the two slices with a target were encoded
    out2d = segment_with_protocol(oracle, vol[1], target[1], "bbox0.75", rng)
    assert out2d.shape == (30, 40) and 0 < (out2d & target[1]).sum() < target[1].sum() + 200
    assert not segment_with_protocol(oracle, vol[0], target[0], "1pt", rng).any()  # no target
    with pytest.raises(PromptError, match="unknown prompt protocol"):
        segment_with_protocol(oracle, vol[1], target[1], "2pt", rng)
    m = segment_with_protocol(tiny_model, vol, target, "3pt", rng)
    assert m.shape == target.shape and not m[[0, 3]].any()
