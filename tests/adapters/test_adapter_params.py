"""Parameter counts on the meta device, the ``medsa params`` command and method configs."""

from __future__ import annotations

import json

import pytest
import torch

from medsa.adapters import (
    LoRAConfig,
    MASAMConfig,
    MedSAConfig,
    apply_method,
    count_parameters,
    method_from_dict,
    method_from_yaml,
    method_to_dict,
    parse_blocks,
)
from medsa.cli import main as medsa_main
from medsa.errors import ConfigError


def _meta(name: str, cfg=None):
    from medsa.sam.build import build_sam_from_config, get_config

    with torch.device("meta"):
        model = build_sam_from_config(get_config(name), name=name)
        if cfg is not None:
            apply_method(model, cfg)
    return model


def _adapter(c: int, r: int) -> int:
    """Parameters of one bottleneck adapter: down (c*r + r) + up (r*c + c)."""
    return 2 * c * r + r + c


def test_backbone_count_matches_segment_anything():
    sam = pytest.importorskip("segment_anything")
    with torch.device("meta"):
        ref = sam.sam_model_registry["vit_b"]()
    counts = count_parameters(_meta("vit_b", LoRAConfig(rank=4)))
    assert counts.backbone == sum(p.numel() for p in ref.parameters())
    assert counts.added == 12 * 2 * 2 * 4 * 768  # A (r x C) and B (C x r) on q and v, 12 blocks


def test_medsa_vit_h_rank64_is_about_two_percent():
    counts = count_parameters(_meta("vit_h", MedSAConfig(rank=64)))
    enc = 32 * 2 * _adapter(1280, 64)  # ViT-H: 32 blocks of width 1280, two adapters each
    assert counts.modules["image_encoder"][1] == enc
    assert counts.adapters["adapter"][0] == enc + 2 * 2 * _adapter(256, 64)  # + decoder mlp/image
    assert counts.tunable == counts.added  # only the method's parameters train
    assert 0.015 < counts.tunable / counts.backbone < 0.025  # paper: 13.1M, "2%"
    assert counts.modules["prompt_encoder"][1] == 0


def test_rank_and_block_options_scale_counts_like_table7():
    r32 = count_parameters(_meta("vit_b", MedSAConfig(rank=32, decoder_adapters=False)))
    r64 = count_parameters(_meta("vit_b", MedSAConfig(rank=64, decoder_adapters=False)))
    half = count_parameters(
        _meta("vit_b", MedSAConfig(rank=64, blocks="7-12", decoder_adapters=False))
    )
    assert r64.tunable - r32.tunable == 12 * 2 * (2 * 768 * 32 + 32)
    assert half.tunable * 2 == r64.tunable  # Table 7b: half the layers, half the parameters


def test_masam_counts_share_fact_factors():
    c, r = 768, 32
    counts = count_parameters(_meta("vit_b", MASAMConfig(fact_rank=r, adapters_3d=False)))
    assert counts.adapters["fact"][0] == 2 * c * r + 12 * 2 * r * r  # U, V once + 12 x (T_q, T_v)
    assert counts.modules["mask_decoder"][0] == counts.modules["mask_decoder"][1]  # fully tuned


def test_parse_blocks():
    assert parse_blocks("17-32", 32) == list(range(16, 32))
    assert parse_blocks("1,3,5-6", 8) == [0, 2, 4, 5]
    assert parse_blocks([2, 1], 4) == [0, 1]
    assert parse_blocks(None, 3) == [0, 1, 2]
    for bad in ("0", "5-3", "a-b", "1-40"):
        with pytest.raises(ConfigError):
            parse_blocks(bad, 32)


def test_method_configs_from_dict_and_yaml(tmp_path):
    cfg = method_from_dict({"method": "medsa", "rank": 16, "blocks": "17-32", "sd_trans": True})
    assert isinstance(cfg, MedSAConfig) and cfg.rank == 16 and cfg.sd_trans
    assert method_from_dict(method_to_dict(cfg)) == cfg
    assert isinstance(method_from_dict({"method": "ma-sam"}), MASAMConfig)
    p = tmp_path / "m.yaml"
    p.write_text("method:\n  method: lora\n  rank: 8\n")
    assert method_from_yaml(p) == LoRAConfig(rank=8)
    with pytest.raises(ConfigError, match="unknown option.*rnak"):
        method_from_dict({"method": "medsa", "rnak": 3})
    with pytest.raises(ConfigError, match="unknown method"):
        method_from_dict({"method": "dora"})
    with pytest.raises(ConfigError, match="positions"):
        MedSAConfig(positions="everywhere")
    with pytest.raises(ConfigError, match="rank"):
        MedSAConfig(rank=0)
    with pytest.raises(ConfigError, match="does not exist"):
        method_from_yaml(tmp_path / "missing.yaml")


def test_cli_params_table_and_json(capsys):
    assert medsa_main(["params", "--backbone", "vit_h", "--method", "medsa", "--rank", "64"]) == 0
    out = capsys.readouterr().out
    assert "image_encoder" in out and "adapter: hyp_adapter" in out and "tunable" in out
    counts = count_parameters(_meta("vit_h", MedSAConfig(rank=64)))
    assert f"{counts.tunable:,}" in out
    assert (
        medsa_main(["params", "--backbone", "vit_b", "--method", "lora", "--rank", "4", "--json"])
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["method"]["rank"] == 4 and data["adapters"]["lora"]["total"] == 12 * 4 * 4 * 768


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backbone", "vit_x"], "unknown model"),
        (["--method", "medsa", "--blocks", "40"], "do not exist"),
        (["--method", "medsa", "--rank", "0"], "positive"),
    ],
)
def test_cli_params_bad_input_is_a_clean_error(argv, message, capsys):
    assert medsa_main(["params", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_params_from_yaml_config(tmp_path, capsys):
    cfg = tmp_path / "masam.yaml"
    cfg.write_text("method: masam\nfact_rank: 8\nadapters_3d: false\n")
    assert medsa_main(["params", "--backbone", "vit_b", "--config", str(cfg), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"]["fact_rank"] == 8
    assert data["adapters"]["fact"]["total"] == 2 * 768 * 8 + 12 * 2 * 8 * 8


def test_each_adapter_kind_counts_its_tunable_parameters():
    """The per-kind ``(total, tunable)`` column: every adapter trains after ``apply_method``;
    freezing one kind moves exactly its parameters out of the tunable column, no other's."""
    from medsa.adapters import AdapterModule

    model = _meta("vit_b", MedSAConfig(rank=4, prompt_conditioning="hyper"))
    before = count_parameters(model)
    assert len(before.adapters) >= 2  # plain adapters and the prompt-conditioned ones
    assert all(tot == tun > 0 for tot, tun in before.adapters.values())
    kind, (n_kind, _) = next(iter(before.adapters.items()))
    for m in model.modules():
        if isinstance(m, AdapterModule) and m.kind == kind:
            m.requires_grad_(False)
    after = count_parameters(model)
    assert after.adapters[kind] == (n_kind, 0)
    assert {k: v for k, v in after.adapters.items() if k != kind} == {
        k: v for k, v in before.adapters.items() if k != kind
    }
    assert after.tunable == before.tunable - n_kind and after.total == before.total


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--method", "medsa"], {"method": "medsa"}),
        (
            ["--method", "medsa", "--rank", "4", "--blocks", "1-2", "--positions", "mlp",
             "--sd-fusion", "concat", "--prompt-conditioning", "add", "--no-decoder-adapters"],
            {"method": "medsa", "rank": 4, "blocks": "1-2", "positions": "mlp", "sd_trans": True,
             "sd_fusion": "concat", "prompt_conditioning": "add", "decoder_adapters": False},
        ),
        (["--method", "medsa", "--sd-trans"], {"method": "medsa", "sd_trans": True}),
        (["--method", "masam", "--rank", "8", "--num-classes", "3"],
         {"method": "masam", "fact_rank": 8, "num_classes": 3}),
        # options of another method are not passed on
        (["--method", "lora", "--rank", "2", "--positions", "mlp", "--sd-trans",
          "--num-classes", "3", "--no-decoder-adapters"], {"method": "lora", "rank": 2}),
        (["--method", "full", "--rank", "4", "--blocks", "1"], {"method": "full"}),
        (["--method", "zeroshot", "--rank", "4"], {"method": "zeroshot"}),
    ],
)  # fmt: skip
def test_cli_params_options_build_the_method_section(argv, expected):
    import argparse

    from medsa.adapters.cli import _method_dict, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(argv)
    assert args.backbone == "vit_h" and not args.json and args.config is None
    assert _method_dict(args) == expected


def test_cli_params_json_and_table_report_the_counts(capsys):
    cfg = MedSAConfig(rank=4, blocks="1")
    counts = count_parameters(_meta("vit_tiny", cfg))
    argv = ["params", "--backbone", "vit_tiny", "--rank", "4", "--blocks", "1"]
    assert medsa_main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == {
        "backbone": "vit_tiny",
        "method": method_to_dict(cfg),
        "modules": {k: {"total": t, "tunable": u} for k, (t, u) in counts.modules.items()},
        "adapters": {k: {"total": t, "tunable": u} for k, (t, u) in counts.adapters.items()},
        "total": counts.total,
        "tunable": counts.tunable,
        "pretrained": counts.backbone,
    }
    assert data["tunable"] > 0 and data["pretrained"] > 0

    assert medsa_main(argv) == 0
    first, *rest = capsys.readouterr().out.splitlines()
    opts = ", ".join(f"{k}={v}" for k, v in method_to_dict(cfg).items() if k != "method")
    assert first == f"backbone vit_tiny, method medsa ({opts})"
    assert "\n".join(rest) == counts.format()
    assert medsa_main(["params", "--backbone", "vit_tiny", "--method", "zeroshot"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "backbone vit_tiny, method zeroshot"


def test_cli_params_accepts_every_value_of_each_option():
    """The paper's option values (Table 5 / 6 / 8), written out here, all reach a valid config."""
    import argparse

    from medsa.adapters.cli import _method_dict, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for flag, field, values in [
        ("--positions", "positions", ["main", "mlp", "both"]),
        ("--sd-fusion", "sd_fusion", ["add", "concat", "cross_attn"]),
        ("--prompt-conditioning", "prompt_conditioning", ["hyper", "add", "concat", "none"]),
    ]:
        for value in values:
            d = _method_dict(parser.parse_args(["--method", "medsa", flag, value]))
            assert d[field] == value and getattr(method_from_dict(d), field) == value
    for tag in ["medsa", "masam", "lora", "full", "zeroshot"]:
        assert method_from_dict(_method_dict(parser.parse_args(["--method", tag]))).method == tag
    for bad in (["--method", "dora"], ["--positions", "attn"], ["--sd-fusion", "mean"],
                ["--prompt-conditioning", "film"]):  # fmt: skip
        with pytest.raises(SystemExit):  # argparse names the valid values
            parser.parse_args(bad)
