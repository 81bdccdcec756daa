"""Method configs: every option's accepted and refused values, block selections, dict / YAML."""

from __future__ import annotations

import math

import pytest

from medsa.adapters import (
    FullFTConfig,
    LoRAConfig,
    MASAMConfig,
    MedSAConfig,
    ZeroShotConfig,
    method_from_dict,
    method_from_yaml,
    method_to_dict,
    parse_blocks,
)
from medsa.errors import ConfigError

NOT_INTS = [0, -1, True, 1.0, "2"]  # bool is an int to Python, not a width
NOT_POSITIVE = [0, -0.5, math.nan, math.inf, True, "0.1"]


@pytest.mark.parametrize(
    "cls, field, bad, good",
    [
        (MedSAConfig, "rank", NOT_INTS, [1, 64]),
        (MedSAConfig, "sd_rank", NOT_INTS, [None, 1]),
        (MedSAConfig, "decoder_rank", NOT_INTS, [None, 2]),
        (MedSAConfig, "prompt_dim", [*NOT_INTS, None], [1]),
        (MedSAConfig, "hyper_layers", [*NOT_INTS, None], [1]),
        (MedSAConfig, "scale", [*NOT_POSITIVE, None], [1e-6, 1]),
        (MASAMConfig, "fact_rank", [*NOT_INTS, None], [1]),
        (MASAMConfig, "adapter_dim", [*NOT_INTS, None], [1]),
        (MASAMConfig, "num_classes", NOT_INTS, [None, 1]),
        (MASAMConfig, "fact_scale", [*NOT_POSITIVE, None], [0.5]),
        (LoRAConfig, "rank", [*NOT_INTS, None], [1]),
        (LoRAConfig, "alpha", NOT_POSITIVE, [None, 0.5, 8]),
    ],
)
def test_numeric_options(cls, field, bad, good):
    for value in good:
        assert getattr(cls(**{field: value}), field) == value
    for value in bad:
        with pytest.raises(ConfigError, match=f"^{field} must be a positive") as err:
            cls(**{field: value})
        assert str(err.value).endswith(f"; got {value!r}")


@pytest.mark.parametrize(
    "cls, field, choices",
    [
        (MedSAConfig, "positions", ("main", "mlp", "both")),
        (MedSAConfig, "activation", ("relu", "gelu")),
        (MedSAConfig, "sd_fusion", ("add", "concat", "cross_attn")),
        (MedSAConfig, "prompt_conditioning", ("hyper", "add", "concat", "none")),
        (MedSAConfig, "hyper_shapes", ("square", "paper")),
        (MASAMConfig, "decoder_channels", ("released", "constant")),
    ],
)
def test_choice_options(cls, field, choices):
    for value in choices:
        assert getattr(cls(**{field: value}), field) == value
    with pytest.raises(ConfigError) as err:
        cls(**{field: choices[0].upper()})
    assert (
        str(err.value) == f"{field} must be one of {', '.join(choices)}; got {choices[0].upper()!r}"
    )


def test_medsa_rank_ratio_and_decoder_width():
    assert MedSAConfig(rank=None, ratio=0.25).mid_dim(64) == 16
    assert MedSAConfig(rank=8, ratio=0.25).mid_dim(64) == 16  # ratio overrides rank
    assert MedSAConfig(rank=8).mid_dim(64) == 8
    assert MedSAConfig(ratio=0.001).mid_dim(64) == 1  # at least one channel
    assert MedSAConfig(ratio=4).ratio == 4
    for bad in (0, -0.1, 4.5, "0.5"):
        with pytest.raises(ConfigError, match=rf"^ratio must be in \(0, 4\]; got {bad!r}$"):
            MedSAConfig(ratio=bad)
    with pytest.raises(ConfigError, match="^set either rank or ratio for the adapter bottleneck$"):
        MedSAConfig(rank=None)
    # a 1-wide decoder adapter is fine, except for HyP-Adpt's LayerNorm over one value
    assert MedSAConfig(decoder_rank=1, prompt_conditioning="add").decoder_rank == 1
    with pytest.raises(ConfigError, match="decoder_rank must be >= 2 with hyper prompting"):
        MedSAConfig(decoder_rank=1, prompt_conditioning="hyper")


def test_masam_dropout_and_kernel():
    assert MASAMConfig(fact_dropout=0).fact_dropout == 0
    assert MASAMConfig(fact_dropout=0.99).fact_dropout == 0.99
    for bad in (1, -0.1, "0.1", None):
        with pytest.raises(ConfigError, match=rf"^fact_dropout must be in \[0, 1\); got {bad!r}$"):
            MASAMConfig(fact_dropout=bad)
    assert MASAMConfig(kernel_depth=1).kernel_depth == 1
    assert MASAMConfig(kernel_depth=5).kernel_depth == 5
    for bad in (2, 0, -1, 3.0):
        with pytest.raises(
            ConfigError, match=f"^kernel_depth must be a positive odd integer; got {bad!r}$"
        ):
            MASAMConfig(kernel_depth=bad)


def test_lora_targets():
    for ok in ("q", "k", "v", "qv", "qkv"):
        assert LoRAConfig(targets=ok).targets == ok
    for bad in ("", "qx", "o", "X"):
        with pytest.raises(ConfigError, match=f"^targets must be letters of 'qkv'.*got {bad!r}$"):
            LoRAConfig(targets=bad)
    # a type dataclass init cannot handle is still a ConfigError through method_from_dict
    with pytest.raises(ConfigError, match="^invalid options for method 'lora': "):
        method_from_dict({"method": "lora", "targets": 5})


@pytest.mark.parametrize("cls", [MedSAConfig, MASAMConfig, LoRAConfig])
def test_blocks_are_checked_when_the_config_is_made(cls):
    # the encoder's depth is not known yet: any block number passes here (apply_method checks)
    for ok in (None, "all", "1-2", [1, 2], (3,), "70-80", [999]):
        assert cls(blocks=ok).blocks == ok
    for bad, message in [
        (5, "^blocks must be a string like '17-32' or a list of ints; got 5$"),
        ("x", "^cannot read block selection 'x'"),
        ([0], r"^blocks \[0\] do not exist"),
        ("3-1", r"^block range '3-1' is empty \(end before start\)$"),
    ]:
        with pytest.raises(ConfigError, match=message):
            cls(blocks=bad)


def test_parse_blocks_forms_and_errors():
    assert parse_blocks("all", 3) == parse_blocks(" ALL ", 3) == parse_blocks("", 3) == [0, 1, 2]
    assert parse_blocks(" 2 - 3 , 1 ", 4) == [0, 1, 2]
    assert parse_blocks("2-2", 4) == [1]
    assert parse_blocks("4", 4) == [3] and parse_blocks((1, "2"), 4) == [0, 1]
    assert parse_blocks("1-12", 12) == list(range(12))
    with pytest.raises(ConfigError) as err:
        parse_blocks("3-5,9", 4)
    assert str(err.value) == (
        "blocks [5, 9] do not exist: this encoder has blocks 1-4 (numbers are 1-based)"
    )
    with pytest.raises(ConfigError, match=r"^cannot read block selection '1;2': use 1-based"):
        parse_blocks("1;2", 4)
    with pytest.raises(
        ConfigError, match="^blocks must be a string like '17-32' or a list of ints; got"
    ):
        parse_blocks([1, "x"], 4)
    with pytest.raises(ConfigError, match="^blocks must be a string"):
        parse_blocks([None], 4)
    with pytest.raises(ConfigError, match="^the block selection is empty$"):
        parse_blocks([], 4)


def test_method_from_dict_tags_and_options():
    for tag, cls in [
        ("medsa", MedSAConfig), ("Med-SA", MedSAConfig), ("MA-SAM", MASAMConfig),
        ("masam", MASAMConfig), ("LoRA", LoRAConfig), ("full_ft", FullFTConfig),
        ("fullft", FullFTConfig), ("full", FullFTConfig), ("zero-shot", ZeroShotConfig),
        ("zero_shot", ZeroShotConfig), ("none", ZeroShotConfig), ("zeroshot", ZeroShotConfig),
    ]:  # fmt: skip
        assert type(method_from_dict({"method": tag})) is cls
    data = {"method": "medsa", "rank": 4}
    method_from_dict(data)
    assert data == {"method": "medsa", "rank": 4}  # the caller's dict is not consumed
    cfg = method_from_dict({"method": "lora", "blocks": (1, 2)})
    assert cfg.blocks == [1, 2]  # tuples become lists: YAML / JSON round trips compare equal
    assert method_from_dict(method_to_dict(cfg)) == cfg
    assert method_to_dict(ZeroShotConfig()) == {"method": "zeroshot"}

    with pytest.raises(ConfigError, match="^a method config must be a mapping; got list$"):
        method_from_dict(["medsa"])
    for missing in ({}, {"method": 3}):
        with pytest.raises(ConfigError) as err:
            method_from_dict(missing)
        assert str(err.value) == (
            "the method config needs a 'method' key, one of medsa, masam, lora, full, zeroshot"
        )
    with pytest.raises(ConfigError) as err:
        method_from_dict({"method": "DoRA"})
    assert str(err.value) == "unknown method 'dora'; choose from medsa, masam, lora, full, zeroshot"
    with pytest.raises(ConfigError) as err:
        method_from_dict({"method": "full", "rank": 4, "alpha": 1})
    assert str(err.value) == (
        "unknown option(s) alpha, rank for method 'full'; valid: train_image_encoder, "
        "train_mask_decoder, train_prompt_encoder"
    )
    with pytest.raises(ConfigError, match=r"valid: \(none\)$"):
        method_from_dict({"method": "zeroshot", "rank": 4})


def test_method_from_yaml(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("method: masam\nfact_rank: 8\n", encoding="utf-8")
    assert method_from_yaml(flat) == MASAMConfig(fact_rank=8)
    nested = tmp_path / "nested.yaml"  # a training config's method: section
    nested.write_text("data: {root: x}\nmethod:\n  method: lora\n  rank: 2\n", encoding="utf-8")
    assert method_from_yaml(str(nested)) == LoRAConfig(rank=2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^method config .*bad\.yaml is not valid YAML: "):
        method_from_yaml(bad)
    with pytest.raises(ConfigError, match=r"^method config .*nope\.yaml does not exist$"):
        method_from_yaml(tmp_path / "nope.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="must be a mapping; got NoneType"):
        method_from_yaml(empty)
