"""medsa.engine.config: YAML sections as typed dataclasses, --set overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsa.engine.config import (
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_yaml,
    load_config,
    parse_override,
)
from medsa.errors import ConfigError


def test_defaults_and_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None)
    assert isinstance(cfg, TrainConfig)
    assert cfg.method["method"] == "medsa" and cfg.method["rank"] == 64  # filled from MedSAConfig
    p = tmp_path / "cfg.yaml"
    p.write_text(config_to_yaml(cfg))
    assert load_config(p) == cfg


def test_yaml_sections_and_typed_overrides(tmp_path: Path) -> None:
    p = tmp_path / "cfg.yaml"
    p.write_text(
        "model: {backbone: vit_tiny}\n"
        "method: {method: lora, rank: 2}\n"
        "prompts: {protocols: {1pt: 1.0}, clicks: 2}\n"
        "train: {epochs: 3}\n"
    )
    cfg = load_config(
        p,
        [
            "optim.lr=3e-4",  # YAML would keep '3e-4' a string; we read a number
            "train.epochs=5",
            "method.rank=8",
            "prompts.protocols.bbox0.5=0.5",
            "data.classes=[polyp]",
            "train.max_steps=null",
            "model.options.img_size=64",
        ],
    )
    named = load_config(None, ["data.classes={RV: 1, MYO: 2, LV: 3}"])
    assert named.data.classes == {"RV": 1, "MYO": 2, "LV": 3}
    assert cfg.model.backbone == "vit_tiny"
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 5 and cfg.train.max_steps is None
    assert cfg.method["method"] == "lora" and cfg.method["rank"] == 8
    assert cfg.prompts.protocols == {"1pt": 1.0, "bbox0.5": 0.5}
    assert cfg.prompts.clicks == 2
    assert cfg.data.classes == ["polyp"]
    assert cfg.model.options == {"img_size": 64}
    assert cfg.method_config().rank == 8


def test_parse_override() -> None:
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("a.b=x y") == (["a", "b"], "x y")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("novalue")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["optim.lrr=1"], r"unknown config key 'optim.lrr'; valid keys in 'optim': optim.lr"),
        (["foo.bar=1"], r"unknown config key 'foo.bar'; valid keys: model.backbone"),
        (["train.epochs=abc"], r"train.epochs must be an integer; got 'abc'"),
        (["train.epochs=2.5"], r"train.epochs must be an integer"),
        (["train.epochs=0"], r"train.epochs must be >= 1"),
        (["train.precision=fp64"], r"train.precision must be one of auto, bf16, fp16, fp32"),
        (["logging.csv=maybe"], r"logging.csv must be true or false"),
        (["method.bogus=1"], r"unknown option\(s\) bogus for method 'medsa'; valid: activation"),
        (["method.method=sam2"], r"unknown method 'sam2'"),
        (["optim=1"], r"must name a key inside section 'optim'"),
        (["optim.lr.x=1"], r"optim.lr has no sub-keys"),
        (["prompts.protocols.1pt=-1"], r"must be a weight >= 0"),
        (["data.fold=7"], r"data.fold must be in \[0, 4\]"),
    ],
)
def test_override_errors(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_unknown_section_and_key_in_yaml(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"unknown key\(s\) optimizer in the config; valid: model"
    ):
        config_from_dict({"optimizer": {}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) train.epoch in section 'train'"):
        config_from_dict({"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match="section train must be a mapping"):
        config_from_dict({"train": [1, 2]})


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {backbone: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must contain a mapping"):
        load_config(lst)


def test_apply_overrides_does_not_mutate_input() -> None:
    raw = {"train": {"epochs": 1}}
    out = apply_overrides(raw, ["train.epochs=4"])
    assert raw == {"train": {"epochs": 1}} and out["train"]["epochs"] == 4


def test_val_protocol_default() -> None:
    cfg = load_config(None, ["prompts.protocols={1pt: 0.2, bbox0.75: 0.8}"])
    assert cfg.prompts.default_val_protocol() == "bbox0.75"
    cfg = load_config(None, ["prompts.val_protocol=3pt"])
    assert cfg.prompts.default_val_protocol() == "3pt"


def test_packaged_example_configs_are_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    paths = sorted((root / "src" / "medsa" / "configs").glob("*.yaml")) + sorted(
        (root / "examples").glob("*.yaml")
    )
    assert paths, "no example configs found"
    for p in paths:
        load_config(p)


def test_packaged_config_by_name() -> None:
    from medsa.engine.config import packaged_configs

    names = packaged_configs()
    assert {"medsa_vit_b_2d", "masam_3d", "lora_vit_b_2d"} <= set(names)
    cfg = load_config("masam_3d", ["method.num_classes=3"])
    assert cfg.method["method"] == "masam" and cfg.method["num_classes"] == 3
    assert cfg.loss.name == "dice_ce" and cfg.data.depth == 8
    with pytest.raises(ConfigError, match="packaged configs: .*medsa_vit_b_2d"):
        load_config("no_such_config")
