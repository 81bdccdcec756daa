"""``medsa export`` / ``--runtime onnx``: ONNX Runtime against PyTorch on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from export_helpers import tinyvit_sam, vit_tiny_sam  # noqa: E402

from medsa.errors import ConfigError  # noqa: E402
from medsa.export.export import DECODER_FILE, ENCODER_FILE, META_FILE, export_onnx  # noqa: E402
from medsa.export.runtime import OnnxPredictor, OnnxSessions, make_predictor  # noqa: E402
from medsa.export.verify import compare_export  # noqa: E402
from medsa.sam import SamPredictor  # noqa: E402

TOL = 1e-4  # the bound on logits


@pytest.fixture(scope="module", params=["vit_tiny", "tinyvit"])
def exported(request, tmp_path_factory):
    model = vit_tiny_sam() if request.param == "vit_tiny" else tinyvit_sam()
    out = tmp_path_factory.mktemp(request.param)
    written = export_onnx(model, out)
    return model, out, written


def test_export_writes_graphs_and_meta(exported) -> None:
    model, out, written = exported
    assert set(written) == {"encoder", "decoder", "meta"}
    assert (out / ENCODER_FILE).stat().st_size > 1000 and (out / DECODER_FILE).is_file()
    meta = json.loads((out / META_FILE).read_text())
    assert meta["img_size"] == model.img_size
    assert meta["resize_mode"] == model.resize_mode
    assert meta["mask_input_size"] == list(model.prompt_encoder.mask_input_size)
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_onnx_runtime_equals_pytorch(exported) -> None:
    """Embedding, low-res and original-size logits for a box, box + point + mask input, and
    two points with three masks: ONNX Runtime within 1e-4 of PyTorch."""
    model, out, _ = exported
    diffs = compare_export(model, out)
    assert len(diffs) == 7
    assert max(diffs.values()) <= TOL, diffs


def test_batched_prompts_and_dynamic_point_count(exported) -> None:
    model, out, _ = exported
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    ref = SamPredictor(model, cache_size=0)
    ort = OnnxPredictor(model, OnnxSessions(out), cache_size=0)
    ref.set_image(image)
    ort.set_image(image)
    s = float(model.img_size)
    for n_points in (1, 5):
        coords = torch.as_tensor(rng.uniform(0, s * 0.7, (3, n_points, 2)), dtype=torch.float32)
        labels = torch.as_tensor(rng.integers(0, 2, (3, n_points)), dtype=torch.int32)
        boxes = torch.tensor([[1.0, 2.0, s * 0.5, s * 0.6]] * 3) + torch.arange(3)[:, None]
        for kwargs in (
            {"point_coords": None, "point_labels": None, "boxes": boxes},
            {"point_coords": coords, "point_labels": labels},
            {"point_coords": coords, "point_labels": labels, "boxes": boxes},
        ):
            for multi in (False, True):
                want = ref.predict_torch(**kwargs, multimask_output=multi, return_logits=True)
                got = ort.predict_torch(**kwargs, multimask_output=multi, return_logits=True)
                for w, g in zip(want, got, strict=True):
                    assert w.shape == g.shape
                    assert (w.float() - g.float()).abs().max().item() <= TOL
                masks = ort.predict_torch(**kwargs, multimask_output=multi)[0]
                assert masks.dtype == torch.bool and masks.shape == (3, 3 if multi else 1, 40, 56)


def test_adapter_is_merged_into_the_graphs(tmp_path: Path) -> None:
    from medsa.adapters import apply_method
    from medsa.adapters.config import MedSAConfig

    model = apply_method(vit_tiny_sam(), MedSAConfig()).eval()
    with torch.no_grad():  # adapters start as an identity; make them matter
        for name, p in model.named_parameters():
            if "adapter" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    export_onnx(model, tmp_path)
    diffs = compare_export(model, tmp_path)
    assert max(diffs.values()) <= TOL, diffs
    # ...and the graph is not the plain backbone's: its embedding differs from the adapted one
    plain = vit_tiny_sam()
    x = torch.randn(1, 3, 128, 128)
    ort = OnnxSessions(tmp_path)
    (emb,) = ort.encoder.run(None, {"image": x.numpy()})
    with torch.no_grad():
        assert np.abs(emb - model.image_encoder(x).numpy()).max() <= TOL
        assert np.abs(emb - plain.image_encoder(x).numpy()).max() > 1e-2


def test_single_mask_decoder_selects_like_sam(tmp_path: Path) -> None:
    model = vit_tiny_sam()
    export_onnx(model, tmp_path, encoder=False, single_mask=True)
    assert not (tmp_path / ENCODER_FILE).exists()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / DECODER_FILE), providers=["CPUExecutionProvider"])
    emb = torch.randn(1, 32, 8, 8)
    feeds = {
        "image_embeddings": emb.numpy(),
        "point_coords": np.array([[[30.0, 40.0], [0.0, 0.0]]], np.float32),
        "point_labels": np.array([[1.0, -1.0]], np.float32),
        "mask_input": np.zeros((1, 1, 32, 32), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
        "orig_im_size": np.array([64.0, 128.0], np.float32),
    }
    masks, iou, low = sess.run(None, feeds)
    assert masks.shape == (1, 1, 64, 128) and iou.shape == (1, 1) and low.shape == (1, 1, 32, 32)
    pred = SamPredictor(model, cache_size=0)
    pred.features, pred.original_size, pred.input_size = emb, (64, 128), (64, 128)
    pred.is_image_set = True
    with torch.no_grad():
        _, all_iou, all_low = pred.predict_torch(
            torch.tensor([[[30.0, 40.0]]]), torch.tensor([[1]]), multimask_output=True
        )
    best = int(all_iou[0].argmax())  # 2 points (incl. padding) <= 2.5: best of the 3
    assert np.abs(low[0, 0] - all_low[0, best].numpy()).max() <= TOL
    with pytest.raises(ConfigError, match="needs both"):
        OnnxSessions(tmp_path)  # a predictor needs the encoder too


def test_make_predictor_errors(tmp_path: Path) -> None:
    model = vit_tiny_sam()
    with pytest.raises(ConfigError, match="runtime"):
        make_predictor(model, "tensorrt")
    with pytest.raises(ConfigError, match="not a medsa ONNX export"):
        OnnxSessions(tmp_path)
    with pytest.raises(ConfigError, match="nothing to export"):
        export_onnx(model, tmp_path, encoder=False, decoder=False)
    assert isinstance(make_predictor(model, "torch"), SamPredictor)


def test_export_and_predict_cli(tmp_path: Path, capsys) -> None:
    """``medsa export`` then ``medsa predict --runtime onnx --onnx-dir``: same mask as torch."""
    from PIL import Image

    from medsa.cli import main

    out = tmp_path / "onnx"
    ckpt = tmp_path / "vit_tiny.pth"
    torch.save(vit_tiny_sam().state_dict(), ckpt)  # the same weights for export and predict
    cmd = ["export", "--backbone", "vit_tiny", "--checkpoint", str(ckpt), "--out", str(out)]
    assert main(cmd) == 0
    text = capsys.readouterr().out
    assert "encoder" in text and "max |diff| embedding" in text
    img = np.zeros((48, 64, 3), np.uint8)
    img[10:30, 20:50] = 200
    Image.fromarray(img).save(tmp_path / "a.png")
    masks = {}
    for runtime in ("torch", "onnx"):
        args = ["predict", str(tmp_path / "a.png"), "--out", str(tmp_path / runtime)]
        args += ["--backbone", "vit_tiny", "--checkpoint", str(ckpt), "--box", "18,8,52,32"]
        args += ["--runtime", runtime, "--onnx-dir", str(out)]
        assert main(args) == 0
        masks[runtime] = np.array(Image.open(tmp_path / runtime / "a_mask.png"))
    assert masks["torch"].shape == (48, 64)
    assert np.array_equal(masks["torch"], masks["onnx"])
    # an export of another backbone is refused with one clear line
    err_args = ["predict", str(tmp_path / "a.png"), "--out", str(tmp_path / "x")]
    err_args += ["--backbone", "lite_medsam", "--box", "1,1,5,5", "--runtime", "onnx"]
    err_args += ["--onnx-dir", str(out)]
    capsys.readouterr()
    assert main(err_args) == 1
    assert "holds an export of 'vit_tiny'" in capsys.readouterr().err


def test_evaluate_cli_on_onnx_runtime(tmp_path: Path, monkeypatch) -> None:
    """``medsa evaluate --runtime onnx``: the metric rows of the PyTorch run, within the
    runtimes' float differences (Dice of a mask that flips a few pixels)."""
    import csv

    from PIL import Image

    from medsa.cli import main

    rng = np.random.default_rng(0)
    for d in ("images", "masks"):
        (tmp_path / "ds" / d).mkdir(parents=True)
    for i in range(3):
        img = (rng.random((48, 56, 3)) * 60).astype(np.uint8)
        m = np.zeros((48, 56), np.uint8)
        m[8 + i : 30, 10 : 40 - i] = 255
        img[m > 0] += 150
        Image.fromarray(img).save(tmp_path / "ds" / "images" / f"c{i}.png")
        Image.fromarray(m).save(tmp_path / "ds" / "masks" / f"c{i}.png")
    ckpt = tmp_path / "vit_tiny.pth"
    torch.save(vit_tiny_sam().state_dict(), ckpt)
    from medsa.export import runtime as rt

    made = []
    real = rt.make_predictor

    def spy(model, runtime="torch", **kw):
        made.append(type(pred := real(model, runtime, **kw)).__name__)
        return pred

    monkeypatch.setattr(rt, "make_predictor", spy)
    rows = {}
    for runtime in ("torch", "onnx"):
        out = tmp_path / runtime
        args = ["evaluate", "--data", str(tmp_path / "ds"), "--backbone", "vit_tiny",
                "--checkpoint", str(ckpt), "--out", str(out), "--noc-clicks", "2", "--quiet",
                "--runtime", runtime]  # fmt: skip
        assert main(args) == 0
        rows[runtime] = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows["onnx"]) == len(rows["torch"]) == 3 * 4
    for a, b in zip(rows["torch"], rows["onnx"], strict=True):
        assert (a["case_id"], a["protocol"]) == (b["case_id"], b["protocol"])
        assert abs(float(a["dice"]) - float(b["dice"])) < 0.02
    assert made == ["OnnxPredictor"]  # the onnx run decoded in ONNX Runtime, the torch one not


def test_serve_service_on_onnx_runtime(exported, tmp_path: Path) -> None:
    """``medsa serve --runtime onnx``: the service's masks equal the PyTorch service's."""
    from PIL import Image

    from medsa.serve.service import SegmentationService, ServeConfig

    model, out, _ = exported
    img = np.zeros((40, 56, 3), np.uint8)
    img[8:30, 12:44] = 210
    (tmp_path / "root").mkdir()
    Image.fromarray(img).save(tmp_path / "root" / "a.png")
    masks = {}
    for runtime in ("torch", "onnx"):
        cfg = ServeConfig(
            roots=(tmp_path / "root",),
            output_dir=tmp_path / f"out_{runtime}",
            runtime=runtime,
            onnx_dir=out if runtime == "onnx" else None,
        )
        service = SegmentationService(model, cfg)
        try:
            loaded = service.open(0, "a.png")
            pred = service.predict(loaded, 0, [(30.0, 20.0, 1)], [10.0, 6.0, 46.0, 32.0], True)
        finally:
            service.close()
        assert pred.masks.shape == (3, 40, 56)
        masks[runtime] = pred.masks
    agree = (masks["torch"] == masks["onnx"]).mean()
    assert agree >= 0.999, agree  # logits equal to 1e-5; a pixel may sit on the threshold
