"""Method configurations: one dataclass per adaptation method, built from dicts / YAML.

``method_from_dict({"method": "medsa", "rank": 64, ...})`` picks the class by its ``method`` tag
and rejects unknown keys and bad values with a :class:`~medsa.errors.ConfigError`.
This module does not import torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from medsa.errors import ConfigError

__all__ = [
    "FullFTConfig",
    "LoRAConfig",
    "MASAMConfig",
    "METHODS",
    "MedSAConfig",
    "MethodConfig",
    "ZeroShotConfig",
    "method_from_dict",
    "method_from_yaml",
    "parse_blocks",
]


#: Med-SA option values (shared with ``medsa params``' choices and the modules' checks)
POSITIONS: tuple[str, ...] = ("main", "mlp", "both")
SD_FUSIONS: tuple[str, ...] = ("add", "concat", "cross_attn")
PROMPT_CONDITIONINGS: tuple[str, ...] = ("hyper", "add", "concat", "none")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)  # nan passes "<= 0"
        or value <= 0
    ):
        raise ConfigError(f"{name} must be a positive (finite) number; got {value!r}")


def _check_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer; got {value!r}")


def parse_blocks(spec: str | list[int] | tuple[int, ...] | None, num_blocks: int) -> list[int]:
    """Turn a block selection into sorted **0-based** indices.

    ``spec`` uses **1-based** block numbers as in the paper (Table 7b: "1-16", "17-32"):
    ``None``/``"all"`` (every block), ``"17-32"``, ``"1,3,5-8"`` or a list of numbers ``[1, 2]``.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return list(range(num_blocks))
    numbers: set[int] = set()
    if isinstance(spec, str):
        for part in spec.split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", part)
            if not m:
                raise ConfigError(
                    f"cannot read block selection {spec!r}: use 1-based numbers and ranges "
                    "like '17-32' or '1,3,5-8'"
                )
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) else lo
            if hi < lo:
                raise ConfigError(f"block range {part!r} is empty (end before start)")
            numbers.update(range(lo, hi + 1))
    else:
        try:
            numbers = {int(b) for b in spec}
        except (TypeError, ValueError):
            raise ConfigError(
                f"blocks must be a string like '17-32' or a list of ints; got {spec!r}"
            ) from None
    bad = sorted(b for b in numbers if not 1 <= b <= num_blocks)
    if bad:
        raise ConfigError(
            f"blocks {bad} do not exist: this encoder has blocks 1-{num_blocks} (numbers are 1-based)"
        )
    if not numbers:
        raise ConfigError("the block selection is empty")
    return sorted(b - 1 for b in numbers)


def _check_blocks_syntax(spec: Any) -> None:
    # Validate early (without knowing the encoder depth) so that typos fail at config time.
    if spec is None or isinstance(spec, (str, list, tuple)):
        parse_blocks(spec, num_blocks=10**6)
        return
    raise ConfigError(f"blocks must be a string like '17-32' or a list of ints; got {spec!r}")


@dataclass
class MedSAConfig:
    """Med-SA (paper Sec. 3.2-3.4).

    Encoder: an :class:`~medsa.adapters.modules.Adapter` after multi-head attention
    (``positions`` "main") and one parallel to the MLP scaled by ``scale`` ("mlp"), in the
    selected ``blocks``; SD-Trans (``sd_trans``) for 3D inputs. Decoder (``decoder_adapters``):
    per two-way block a HyP-Adpt token adapter (``prompt_conditioning``), an MLP adapter and an
    image adapter. By default only the adapters train (the paper keeps the pre-trained SAM
    frozen); ``train_mask_decoder`` / ``train_prompt_encoder`` unfreeze those as the public
    reference code does.
    """

    method: ClassVar[str] = "medsa"

    rank: int | None = 64  #: adapter bottleneck width (paper: "rank", Table 7a)
    ratio: float | None = None  #: alternatively, bottleneck = round(ratio * C); overrides rank
    blocks: str | list[int] | None = None  #: 1-based, e.g. "17-32" (Table 7b); None = all
    positions: str = "both"  #: "main" | "mlp" | "both" (Table 6)
    scale: float = 0.05  #: s for the MLP-parallel adapter (Table 7c)
    activation: str = "relu"  #: "relu" (paper) | "gelu"
    sd_trans: bool = False  #: add the SD-Trans depth branch (used when depth is given)
    sd_fusion: str = "add"  #: "add" | "concat" | "cross_attn" (Table 8)
    sd_rank: int | None = None  #: depth-adapter width; None = same as the encoder adapters
    depth_residual: bool = False  #: "add" fusion: also add the raw depth attention (see SDTrans)
    decoder_adapters: bool = True  #: HyP-Adpt + MLP + image adapters in the mask decoder
    prompt_conditioning: str = "hyper"  #: "hyper" | "add" | "concat" | "none" (Table 5)
    decoder_rank: int | None = None  #: None = rank, capped at the decoder width / 4
    prompt_dim: int = 32  #: width of the reduced prompt embedding e_prompt
    hyper_layers: int = 3  #: hyper-prompting layers (paper: 3)
    #: HyP-Adpt weight shapes: "square" (r x r, then an up-projection) | "paper" (eq. 1: the
    #: last generated weight is r x C); see medsa.adapters.modules.HyPAdapter
    hyper_shapes: str = "square"
    train_mask_decoder: bool = False
    train_prompt_encoder: bool = False

    def __post_init__(self) -> None:
        if self.rank is None and self.ratio is None:
            raise ConfigError("set either rank or ratio for the adapter bottleneck")
        _check_int("rank", self.rank, allow_none=self.ratio is not None)
        if self.ratio is not None and not (
            isinstance(self.ratio, (int, float)) and 0 < self.ratio <= 4
        ):
            raise ConfigError(f"ratio must be in (0, 4]; got {self.ratio!r}")
        _check_blocks_syntax(self.blocks)
        _check_choice("positions", self.positions, POSITIONS)
        _check_positive("scale", self.scale)
        _check_choice("activation", self.activation, ("relu", "gelu"))
        _check_choice("sd_fusion", self.sd_fusion, SD_FUSIONS)
        _check_int("sd_rank", self.sd_rank, allow_none=True)
        _check_choice("prompt_conditioning", self.prompt_conditioning, PROMPT_CONDITIONINGS)
        _check_int("decoder_rank", self.decoder_rank, allow_none=True)
        if self.decoder_rank == 1 and self.prompt_conditioning == "hyper":
            raise ConfigError(
                "decoder_rank must be >= 2 with hyper prompting (LayerNorm over 1 value)"
            )
        _check_int("prompt_dim", self.prompt_dim)
        _check_int("hyper_layers", self.hyper_layers)
        _check_choice("hyper_shapes", self.hyper_shapes, ("square", "paper"))

    def mid_dim(self, dim: int) -> int:
        """Bottleneck width for tokens of width ``dim``."""
        if self.ratio is not None:
            return max(1, round(self.ratio * dim))
        assert self.rank is not None
        return self.rank


@dataclass
class MASAMConfig:
    """MA-SAM: FacT on q/v of every encoder block, two 3D adapters per block, and a fully
    fine-tuned mask decoder. ``num_classes`` adds the prompt-free multi-class
    :class:`~medsa.adapters.masam.MASAMDecoder` head as ``model.masam_decoder``."""

    method: ClassVar[str] = "masam"

    fact_rank: int = 32
    fact_scale: float = 1.0
    fact_dropout: float = 0.1
    adapters_3d: bool = True
    #: bottleneck width of the 3D adapters; 384 as the released MA-SAM code (the summary is
    #: silent). Use a smaller one on narrow encoders (LiteMedSAM's TinyViT: 64-320 wide)
    adapter_dim: int = 384
    kernel_depth: int = 3  #: 3D conv kernel (k, 1, 1) over depth
    blocks: str | list[int] | None = None
    num_classes: int | None = None  #: multi-class head (foreground classes + background)
    #: multi-class head's extra x4 upsampling: "released" (C/8 -> C/16 -> C/32, as the
    #: released code) | "constant" (C/8 throughout, SAM's hypernetworks kept)
    decoder_channels: str = "released"
    train_mask_decoder: bool = True
    train_prompt_encoder: bool = False

    def __post_init__(self) -> None:
        _check_int("fact_rank", self.fact_rank)
        _check_positive("fact_scale", self.fact_scale)
        if not (isinstance(self.fact_dropout, (int, float)) and 0 <= self.fact_dropout < 1):
            raise ConfigError(f"fact_dropout must be in [0, 1); got {self.fact_dropout!r}")
        _check_int("adapter_dim", self.adapter_dim)
        if not (
            isinstance(self.kernel_depth, int)
            and self.kernel_depth % 2 == 1
            and self.kernel_depth > 0
        ):
            raise ConfigError(
                f"kernel_depth must be a positive odd integer; got {self.kernel_depth!r}"
            )
        _check_blocks_syntax(self.blocks)
        _check_int("num_classes", self.num_classes, allow_none=True)
        _check_choice("decoder_channels", self.decoder_channels, ("released", "constant"))


@dataclass
class LoRAConfig:
    """LoRA on the encoder's fused qkv projection (SAMed: q and v, rank 4). SAMed also fine-tunes
    the prompt encoder and mask decoder; set the ``train_*`` flags to False for encoder-only LoRA."""

    method: ClassVar[str] = "lora"

    rank: int = 4
    alpha: float | None = None  #: delta scaled by alpha / rank; None = rank (scale 1, as SAMed)
    targets: str = "qv"
    blocks: str | list[int] | None = None
    train_mask_decoder: bool = True
    train_prompt_encoder: bool = True

    def __post_init__(self) -> None:
        _check_int("rank", self.rank)
        _check_positive("alpha", self.alpha, allow_none=True)
        if not self.targets or set(self.targets) - set("qkv"):
            raise ConfigError(f"targets must be letters of 'qkv' (e.g. 'qv'); got {self.targets!r}")
        _check_blocks_syntax(self.blocks)


@dataclass
class FullFTConfig:
    """Full fine-tuning (MedSAM-style); each component can be kept frozen."""

    method: ClassVar[str] = "full"

    train_image_encoder: bool = True
    train_prompt_encoder: bool = True
    train_mask_decoder: bool = True


@dataclass
class ZeroShotConfig:
    """Pre-trained SAM as is: nothing trains."""

    method: ClassVar[str] = "zeroshot"


MethodConfig = MedSAConfig | MASAMConfig | LoRAConfig | FullFTConfig | ZeroShotConfig

#: method tag -> config class
METHODS: dict[str, type] = {
    c.method: c for c in (MedSAConfig, MASAMConfig, LoRAConfig, FullFTConfig, ZeroShotConfig)
}
_ALIASES = {
    "med-sa": "medsa",
    "ma-sam": "masam",
    "full_ft": "full",
    "fullft": "full",
    "zero-shot": "zeroshot",
    "zero_shot": "zeroshot",
    "none": "zeroshot",
}


def method_to_dict(cfg: MethodConfig) -> dict[str, Any]:
    """``{"method": tag, **fields}``: the inverse of :func:`method_from_dict` (JSON/YAML-safe)."""
    return {"method": cfg.method, **dataclasses.asdict(cfg)}


def method_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Build a method config from ``{"method": "medsa" | "masam" | "lora" | "full" | "zeroshot", ...}``."""
    if not isinstance(data, dict):
        raise ConfigError(f"a method config must be a mapping; got {type(data).__name__}")
    data = dict(data)
    tag = data.pop("method", None)
    if not isinstance(tag, str):
        raise ConfigError(f"the method config needs a 'method' key, one of {', '.join(METHODS)}")
    tag = _ALIASES.get(tag.lower(), tag.lower())
    if tag not in METHODS:
        raise ConfigError(f"unknown method {tag!r}; choose from {', '.join(METHODS)}")
    cls = METHODS[tag]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for method {tag!r}; "
            f"valid: {', '.join(sorted(names)) or '(none)'}"
        )
    if isinstance(data.get("blocks"), tuple):
        data["blocks"] = list(data["blocks"])
    try:
        return cls(**data)
    except TypeError as e:  # e.g. wrong types that dataclass init itself rejects
        raise ConfigError(f"invalid options for method {tag!r}: {e}") from None


def method_from_yaml(path: str | Path) -> MethodConfig:
    """Read a method config from a YAML file (a mapping, optionally under a ``method:`` section)."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"method config {p} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"method config {p} is not valid YAML: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("method"), dict):
        data = data["method"]
    return method_from_dict(data)
