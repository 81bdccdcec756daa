"""save_adapter / load_adapter round trips and mismatch errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from medsa.adapters import (
    FullFTConfig,
    LoRAConfig,
    MASAMConfig,
    MedSAConfig,
    apply_method,
    load_adapter,
    save_adapter,
)
from medsa.errors import CheckpointError, ConfigError

DEPTH = 2


def _outputs(model):
    torch.manual_seed(123)
    x = torch.randn(2 * DEPTH, 3, 128, 128)
    points = (torch.rand(2 * DEPTH, 1, 2) * 128, torch.ones(2 * DEPTH, 1, dtype=torch.long))
    with torch.no_grad():
        emb = model.image_encoder(x, depth=DEPTH)
        out = [emb, *model.predict_masks(emb, points=points)]
        if hasattr(model, "masam_decoder"):
            out.append(model.masam_decoder(emb))
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        MedSAConfig(rank=4, sd_trans=True, sd_fusion="cross_attn"),
        MASAMConfig(fact_rank=4, adapter_dim=8, num_classes=3),
        LoRAConfig(rank=2),
    ],
    ids=["medsa", "masam", "lora"],
)
def test_round_trip_on_fresh_backbone(cfg, tiny, randomize, tmp_path):
    model = apply_method(tiny(0), cfg)
    randomize(model, std=0.2)
    with torch.no_grad():  # pretend the decoder was fine-tuned too (MA-SAM / LoRA train it)
        for n, p in model.named_parameters():
            if p.requires_grad and n.startswith("mask_decoder."):
                p.add_(0.01)
    st = save_adapter(model, tmp_path / "run" / "best")
    assert st.name == "best.safetensors" and (tmp_path / "run" / "best.json").is_file()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best.json", "best.safetensors"]
    meta = json.loads((tmp_path / "run" / "best.json").read_text(encoding="utf-8"))
    assert meta["backbone"] == "vit_tiny" and meta["method"]["method"] == cfg.method
    # only the method's tensors are stored, not the frozen backbone
    keys = set(load_file(str(st)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= keys and not any(k.startswith("image_encoder.patch_embed") for k in keys)

    restored = load_adapter(tiny(0), tmp_path / "run" / "best.json")  # suffix is optional
    assert type(restored.medsa_method) is type(cfg)
    for a, b in zip(_outputs(model), _outputs(restored), strict=True):
        assert torch.equal(a, b)
    # a different frozen backbone gives different outputs: the file really holds only adapters
    other = load_adapter(tiny(7), tmp_path / "run" / "best")
    assert not torch.equal(_outputs(other)[0], _outputs(model)[0])


def test_full_finetune_round_trip_from_backbone_name(tiny, tmp_path):
    model = apply_method(tiny(0), FullFTConfig())
    restored = load_adapter("vit_tiny", save_adapter(model, tmp_path / "full"))
    for a, b in zip(_outputs(model), _outputs(restored), strict=True):
        assert torch.equal(a, b)


def test_mismatches_raise_checkpoint_errors(tiny, tmp_path):
    model = apply_method(tiny(0), MedSAConfig(rank=4))
    save_adapter(model, tmp_path / "a")
    js = tmp_path / "a.json"
    meta = json.loads(js.read_text(encoding="utf-8"))

    with pytest.raises(CheckpointError, match="does not exist"):
        load_adapter(tiny(0), tmp_path / "missing")
    with pytest.raises(CheckpointError, match="already applied"):
        load_adapter(model, tmp_path / "a")

    js.write_text(json.dumps({**meta, "backbone": "vit_b"}))
    with pytest.raises(CheckpointError, match="trained on backbone 'vit_b'"):
        load_adapter(tiny(0), tmp_path / "a")

    js.write_text(json.dumps({**meta, "method": {**meta["method"], "rank": 8}}))
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_adapter(tiny(0), tmp_path / "a")

    js.write_text(json.dumps({**meta, "method": {**meta["method"], "sd_trans": True}}))
    with pytest.raises(CheckpointError, match="missing image_encoder.blocks.0.depth_branch"):
        load_adapter(tiny(0), tmp_path / "a")

    js.write_text(json.dumps({**meta, "method": {**meta["method"], "rank": -1}}))
    with pytest.raises(CheckpointError, match="invalid method config"):
        load_adapter(tiny(0), tmp_path / "a")

    js.write_text(json.dumps(meta))
    tensors = load_file(str(tmp_path / "a.safetensors"))
    save_file({**tensors, "image_encoder.extra": torch.zeros(1)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected image_encoder.extra"):
        load_adapter(tiny(0), tmp_path / "a")

    (tmp_path / "a.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_adapter(tiny(0), tmp_path / "a")
    js.write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_adapter(tiny(0), tmp_path / "a")


def test_save_needs_a_method_and_keeps_old_files_on_failure(tiny, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="apply_method"):
        save_adapter(tiny(0), tmp_path / "x")
    model = apply_method(tiny(0), LoRAConfig(rank=2))
    save_adapter(model, tmp_path / "x")
    before = (tmp_path / "x.safetensors").read_bytes()

    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "x")
    assert (tmp_path / "x.safetensors").read_bytes() == before  # untouched, no temp left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "x.safetensors"]


def test_inference_settings_are_stored_and_old_files_have_none(tiny, tmp_path):
    from medsa.adapters.io import read_adapter_meta

    model = apply_method(tiny(0), MedSAConfig(rank=4, sd_trans=True))
    inf = {"depth": 8, "resize_to": [128, 128, 128], "intensity": "ct:abdomen",
           "classes": {"liver": 1}, "num_classes": 1}  # fmt: skip
    save_adapter(model, tmp_path / "new", inference=inf)
    assert read_adapter_meta(tmp_path / "new")["inference"] == inf
    load_adapter(tiny(0), tmp_path / "new")  # the extra entry does not disturb loading
    save_adapter(model, tmp_path / "old")  # what older medsa wrote: no "inference" entry
    assert "inference" not in read_adapter_meta(tmp_path / "old")
    with pytest.raises(ConfigError, match="not JSON data"):
        save_adapter(model, tmp_path / "bad", inference={"depth": object()})
    assert not (tmp_path / "bad.json").exists()


def test_adapter_state_dict_keeps_exactly_the_methods_tensors():
    """Tunable parameters, every tensor of an adapter module (frozen ones too), and the persistent
    buffers of components whose parameters all train; nothing of the frozen backbone."""
    from torch import nn

    from medsa.adapters import Adapter
    from medsa.adapters.io import adapter_state_dict

    class BufferOnly(nn.Module):  # frozen state without parameters (not "fully trained")
        def __init__(self):
            super().__init__()
            self.register_buffer("stat", torch.ones(2))

    net = nn.Module()
    net.trained = nn.BatchNorm1d(2)  # all parameters train: its running statistics belong too
    net.partly = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))  # one frozen parameter
    net.stats = BufferOnly()
    net.adapter = Adapter(2, 1)
    net.adapter.register_buffer("table", torch.zeros(3))
    net.register_buffer("scratch", torch.zeros(1), persistent=False)
    net.trained.register_buffer("cache", torch.zeros(1), persistent=False)  # not state: not kept
    net.adapter.register_buffer("lookup", torch.zeros(1), persistent=False)
    net.partly[0].weight.requires_grad_(False)
    net.adapter.down.weight.requires_grad_(False)  # a frozen adapter tensor is still the method's

    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert set(adapter_state_dict(net)) == {
        *(f"trained.{k}" for k in bn),
        "partly.0.bias", "partly.1.weight", "partly.1.bias",
        "adapter.down.weight", "adapter.down.bias", "adapter.up.weight", "adapter.up.bias",
        "adapter.table",
    }  # fmt: skip


def test_saved_description_and_files(tiny, tmp_path):
    from safetensors import safe_open

    import medsa
    from medsa.adapters.io import FORMAT, FORMAT_VERSION

    model = apply_method(tiny(0), MedSAConfig(rank=4))
    st = save_adapter(model, tmp_path / "deep" / "er" / "a")  # missing parent folders are made
    text = (tmp_path / "deep" / "er" / "a.json").read_text(encoding="utf-8")
    meta = json.loads(text)
    assert text == json.dumps(meta, indent=2) + "\n"  # readable, diff-friendly
    tensors = load_file(str(st))
    assert meta["format"] == FORMAT and meta["format_version"] == FORMAT_VERSION
    assert meta["medsa_version"] == medsa.__version__
    assert meta["num_tensors"] == len(tensors) > 0
    assert meta["num_parameters"] == sum(t.numel() for t in tensors.values())
    with safe_open(str(st), "pt") as f:
        assert f.metadata() == {"format": FORMAT}


def test_backbone_name_is_required_to_save_and_checked_on_load(tiny, tmp_path):
    model = apply_method(tiny(0), MedSAConfig(rank=4))
    model.name = "custom"
    with pytest.raises(ConfigError, match="cannot tell the backbone name"):
        save_adapter(model, tmp_path / "a")
    del model.name  # a model without a name at all
    with pytest.raises(ConfigError, match="cannot tell the backbone name"):
        save_adapter(model, tmp_path / "a")
    save_adapter(model, tmp_path / "a", backbone="vit_tiny")
    assert json.loads((tmp_path / "a.json").read_text(encoding="utf-8"))["backbone"] == "vit_tiny"
    # an unnamed or "custom" model is not checked against the stored backbone name
    for unnamed in ("custom", None):
        fresh = tiny(0)
        if unnamed is None:
            del fresh.name
        else:
            fresh.name = unnamed
        load_adapter(fresh, tmp_path / "a")
    fresh = tiny(0)
    fresh.name = "vit_b"
    with pytest.raises(CheckpointError, match="trained on backbone 'vit_tiny', but the model is"):
        load_adapter(fresh, tmp_path / "a")


def test_load_from_a_backbone_name_uses_the_given_checkpoint(tiny, randomize, tmp_path):
    model = apply_method(tiny(3), MedSAConfig(rank=4))
    randomize(model)
    save_adapter(model, tmp_path / "a")
    torch.save(tiny(3).state_dict(), tmp_path / "backbone.pth")
    restored = load_adapter("vit_tiny", tmp_path / "a", checkpoint=tmp_path / "backbone.pth")
    for a, b in zip(_outputs(model), _outputs(restored), strict=True):
        assert torch.equal(a, b)


def test_loaded_tensors_take_the_models_dtype(tiny, randomize, tmp_path):
    model = apply_method(tiny(0), MedSAConfig(rank=4))
    randomize(model)
    save_adapter(model, tmp_path / "a")
    restored = load_adapter(tiny(0).double(), tmp_path / "a")
    up = "image_encoder.blocks.0.attn_adapter.up.weight"
    got, want = restored.get_parameter(up), model.get_parameter(up)
    assert got.dtype == torch.float64 and torch.equal(got, want.double())


def test_description_checks(tiny, tmp_path):
    model = apply_method(tiny(0), MedSAConfig(rank=4))
    save_adapter(model, tmp_path / "a")
    js = tmp_path / "a.json"
    meta = json.loads(js.read_text(encoding="utf-8"))
    for bad in ([meta], {**meta, "format": "other"}):
        js.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match="is not a medsa adapter description"):
            load_adapter(tiny(0), tmp_path / "a")
    js.write_text(json.dumps({**meta, "format_version": 2, "medsa_version": "9.9"}))
    with pytest.raises(CheckpointError, match=r"written by a newer medsa \(9\.9\); upgrade"):
        load_adapter(tiny(0), tmp_path / "a")
    js.write_text(json.dumps({**meta, "format_version": "1"}))
    with pytest.raises(CheckpointError, match="invalid format_version '1'"):
        load_adapter(tiny(0), tmp_path / "a")
    js.write_text(json.dumps({k: v for k, v in meta.items() if k != "format_version"}))
    load_adapter(tiny(0), tmp_path / "a")  # a description from before the version entry
    js.write_text(json.dumps(meta))
    (tmp_path / "a.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"adapter weights .*a\.safetensors do not exist"):
        load_adapter(tiny(0), tmp_path / "a")


def test_mismatch_messages_list_a_few_keys_and_count_the_rest(tiny, tmp_path):
    model = apply_method(tiny(0), MedSAConfig(rank=4))
    save_adapter(model, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a.safetensors"))
    names = sorted(tensors)
    kept = {k: v for k, v in tensors.items() if k not in names[:7]}
    save_file({**kept, "x.a": torch.zeros(1)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_adapter(tiny(0), tmp_path / "a")
    assert str(err.value).endswith(f"missing {', '.join(names[:5])} (+2 more); unexpected x.a")
    for n_missing, tail in [(1, ""), (5, ""), (6, " (+1 more)")]:  # no count up to five keys
        gone = names[:n_missing]
        save_file(
            {k: v for k, v in tensors.items() if k not in gone}, str(tmp_path / "a.safetensors")
        )
        with pytest.raises(CheckpointError) as err:
            load_adapter(tiny(0), tmp_path / "a")
        assert str(err.value).endswith(f"on 'vit_tiny': missing {', '.join(gone[:5])}{tail}")
    save_file({**tensors, "x.a": torch.zeros(1)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_adapter(tiny(0), tmp_path / "a")
    assert str(err.value).endswith("on 'vit_tiny': unexpected x.a")  # nothing about missing

    grown = {k: torch.zeros(*v.shape, 2) for k, v in tensors.items()}
    save_file(grown, str(tmp_path / "a.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_adapter(tiny(0), tmp_path / "a")
    listed = str(err.value).split("have wrong shapes: ")[1].split("; ")
    assert len(listed) == 5
    for item in listed:
        key, shapes = item.split(": file ")
        assert (
            key in tensors
            and shapes == f"{tuple(grown[key].shape)} vs model {tuple(tensors[key].shape)}"
        )
