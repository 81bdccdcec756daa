"""build_sam: configs, strict checkpoint loading and its error messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsa.errors import CheckpointError, ConfigError
from medsa.sam import Sam, build_sam
from medsa.sam.build import MODEL_NAMES, get_config, read_state_dict


@pytest.fixture()
def tiny_state(tiny_oracle) -> dict[str, torch.Tensor]:
    ref, _ = tiny_oracle
    return {k: v.clone() for k, v in ref.state_dict().items()}


def test_model_names() -> None:
    assert set(MODEL_NAMES) == {"vit_b", "vit_l", "vit_h", "vit_tiny", "lite_medsam"}


def test_load_pth_and_safetensors_give_identical_weights(tiny_oracle, tiny_state, tmp_path) -> None:
    from safetensors.torch import save_file

    _, ckpt = tiny_oracle
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_state.items()}, str(st))
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": tiny_state, "epoch": 3}, wrapped)
    models = [build_sam("vit_tiny", checkpoint=p) for p in (ckpt, st, wrapped)]
    for m in models:
        assert isinstance(m, Sam) and not m.training and m.name == "vit_tiny"
        for k, v in m.state_dict().items():
            assert torch.equal(v, tiny_state[k]), k


def test_missing_key(tiny_state, tmp_path) -> None:
    del tiny_state["mask_decoder.iou_token.weight"]
    path = tmp_path / "missing.pth"
    torch.save(tiny_state, path)
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): mask_decoder.iou_token.weight"):
        build_sam("vit_tiny", checkpoint=path)


def test_unexpected_keys_are_listed_with_count(tiny_state, tmp_path) -> None:
    for i in range(12):
        tiny_state[f"extra.{i:02d}"] = torch.zeros(1)
    path = tmp_path / "extra.pth"
    torch.save(tiny_state, path)
    with pytest.raises(CheckpointError) as err:
        build_sam("vit_tiny", checkpoint=path)
    msg = str(err.value)
    assert "12 unexpected key(s)" in msg and "extra.00" in msg and "(+2 more)" in msg
    assert "extra.11" not in msg
    assert str(path) in msg


def test_wrong_shape(tiny_state, tmp_path) -> None:
    tiny_state["image_encoder.pos_embed"] = torch.zeros(1, 16, 16, 32)
    path = tmp_path / "shape.pth"
    torch.save(tiny_state, path)
    with pytest.raises(
        CheckpointError, match=r"image_encoder.pos_embed: checkpoint \(1, 16, 16, 32\)"
    ):
        build_sam("vit_tiny", checkpoint=path)


def test_wrong_variant_is_named(tmp_path) -> None:
    """A ViT-B checkpoint given for vit_l (and LiteMedSAM for vit_b) suggests the right name."""
    with torch.device("meta"):
        vit_b_keys = build_sam_from_meta("vit_b")
    state = {k: torch.zeros(1) for k in vit_b_keys}
    state["image_encoder.patch_embed.proj.weight"] = torch.zeros(768, 3, 16, 16)
    path = tmp_path / "b.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"look like a 'vit_b' checkpoint"):
        build_sam("vit_tiny", checkpoint=path)

    lite = tmp_path / "lite.pth"
    torch.save({"image_encoder.layers.0.blocks.0.conv1.c.weight": torch.zeros(1)}, lite)
    with pytest.raises(CheckpointError, match=r"'lite_medsam'"):
        build_sam("vit_tiny", checkpoint=lite)


def build_sam_from_meta(name: str) -> list[str]:
    from medsa.sam.build import build_sam_from_config

    return list(build_sam_from_config(get_config(name), name=name).state_dict())


def test_missing_and_corrupt_files(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        build_sam("vit_tiny", checkpoint=tmp_path / "nope.pth")
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match=r"could not read checkpoint .*corrupt.pth"):
        build_sam("vit_tiny", checkpoint=bad)
    bad_st = tmp_path / "corrupt.safetensors"
    bad_st.write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="corrupt.safetensors"):
        read_state_dict(bad_st)
    not_sd = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_sd)
    with pytest.raises(CheckpointError, match="state dict"):
        build_sam("vit_tiny", checkpoint=not_sd)


def test_pickled_code_is_refused(tmp_path) -> None:
    """weights_only loading: a checkpoint that needs arbitrary unpickling is an error."""

    path = tmp_path / "obj.pth"
    torch.save({"x": _Obj()}, path)
    with pytest.raises(CheckpointError, match="could not read") as e:
        read_state_dict(path)
    # medsa never suggests unsafe loading: torch's hint that weights_only=False "will likely
    # succeed" must not be passed on (nor the message's other lines)
    msg = str(e.value)
    assert "weights_only" not in msg and "likely succeed" not in msg and "\n" not in msg
    assert "obj.pth" in msg


def test_pickled_code_is_refused_by_the_cli(tmp_path, capsys) -> None:
    """Same through `medsa predict --checkpoint`: one line, no unsafe-loading hint."""
    from medsa.cli import main

    path = tmp_path / "obj.pth"
    torch.save({"x": _Obj()}, path)
    img = tmp_path / "a.png"
    from medsa.data.io import write_image

    write_image(np.zeros((16, 16), np.uint8), img)
    argv = ["predict", str(img), "--box", "1,1,8,8", "--out", str(tmp_path / "o")]
    rc = main([*argv, "--backbone", "vit_tiny", "--checkpoint", str(path), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and "obj.pth" in err
    assert "weights_only" not in err and "likely succeed" not in err and "Traceback" not in err


class _Obj:
    pass


def test_overrides_and_config_errors() -> None:
    m = build_sam("vit_tiny", img_size=256, decoder_mlp_dim=48)
    assert m.img_size == 256 and m.image_encoder.embedding_size == 16
    assert m.prompt_encoder.mask_input_size == (64, 64)
    assert m.mask_decoder.transformer.layers[0].mlp.lin1.out_features == 48
    with pytest.raises(ConfigError, match="unknown model"):
        build_sam("vit_x")
    with pytest.raises(ConfigError, match="unknown option"):
        build_sam("vit_tiny", not_an_option=1)
    with pytest.raises(ConfigError, match="out_chans"):
        build_sam("vit_tiny", prompt_embed_dim=64)


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_full_sam_key_layout_matches_official(name: str) -> None:
    from segment_anything import sam_model_registry

    from medsa.sam.build import build_sam_from_config

    with torch.device("meta"):
        ref = sam_model_registry[name]()
        ours = build_sam_from_config(get_config(name), name=name)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }


def test_preprocessing_overrides_reach_predictor() -> None:
    """MedSAM-style overrides: stretch resize and /255 scaling without mean/std."""
    import numpy as np

    from medsa.sam import SamPredictor
    from medsa.sam.transforms import ResizeStretch

    m = build_sam(
        "vit_tiny", resize_mode="stretch", pixel_mean=(0.0, 0.0, 0.0), pixel_std=(255.0,) * 3
    )
    pred = SamPredictor(m)
    assert isinstance(pred.transform, ResizeStretch)
    x = torch.full((1, 3, 128, 128), 255.0)
    assert torch.equal(m.preprocess(x), torch.ones(1, 3, 128, 128))
    pred.set_image(np.zeros((30, 50, 3), np.uint8))
    assert pred.input_size == (128, 128) and pred.original_size == (30, 50)
    masks, _, _ = pred.predict(box=[0, 0, 50, 30], multimask_output=False)
    assert masks.shape == (1, 30, 50)
