"""Training configuration: typed dataclass sections read from YAML with ``--set key=value`` overrides.

A config file is a mapping of sections (``model``, ``method``, ``data``, ``prompts``, ``loss``,
``optim``, ``train``, ``logging``), each mapped onto a dataclass below. Unknown sections or keys raise
:class:`~medsa.errors.ConfigError` listing the valid ones; values are type-checked (an ``int`` field
accepts ``3`` but not ``"3"`` from YAML; from ``--set`` the text is parsed as YAML first, so
``--set optim.lr=3e-4`` and ``--set train.epochs=5`` work). The ``method`` section is passed
through :func:`medsa.adapters.config.method_from_dict`, which validates it.

This module does not import torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from medsa.errors import ConfigError

__all__ = [
    "DataSection",
    "LoggingSection",
    "LossSection",
    "ModelSection",
    "OptimSection",
    "PromptSection",
    "TrainConfig",
    "TrainSection",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
    "packaged_configs",
    "parse_override",
    "resolve_config_path",
]

DEFAULT_PROTOCOLS: dict[str, float] = {"1pt": 0.3, "3pt": 0.2, "bbox0.5": 0.25, "bbox0.75": 0.25}


@dataclass
class ModelSection:
    """The SAM backbone (see :func:`medsa.sam.build_sam`)."""

    backbone: str = "vit_b"  #: vit_b | vit_l | vit_h | vit_tiny | lite_medsam
    checkpoint: str | None = None  #: pre-trained weights; None = random (lite_medsam: shipped)
    options: dict[str, Any] = field(default_factory=dict)  #: SamConfig / encoder overrides
    attention_impl: str | None = None  #: see medsa.engine.perf.set_attention_impl


@dataclass
class DataSection:
    """Dataset, split and input geometry."""

    root: str = ""  #: dataset folder (layouts understood by medsa.data.load_dataset)
    layout: str | None = None  #: expected layout (folder, nnunet, imagesTr...); None = any
    #: class names to train on (list), or a {name: label value} mapping that names the classes
    #: of a dataset without a dataset.json (e.g. ACDC {RV: 1, MYO: 2, LV: 3}); None = every class
    classes: list[str] | dict[str, int] | None = None
    split_seed: int = 0  #: seed of the case-level split (>= 0)
    n_folds: int = 5  #: cross-validation folds of the train+val part
    fold: int = 0  #: which fold is validation
    test_fraction: float = 0.2  #: share of cases held out as the test split
    group_pattern: str | None = None  #: regex keeping cases together, e.g. "^(patient\\d+)"
    splits_file: str | None = None  #: JSON written by medsa.data.save_splits (overrides the above)
    image_size: int | None = None  #: encoder input side; None = the backbone's img_size
    depth: int | None = None  #: 3D: train on chunks of this many slices (SD-Trans / MA-SAM)
    #: resize before anything else: [D, H, W] resizes volumes (the paper: [128, 128, 128]);
    #: [H, W] resizes 2D images, and every slice of a volume in-plane (slice count kept).
    #: Image linear, labels nearest; evaluate / predict resample predictions back (docs/data.md)
    resize_to: list[int] | None = None
    #: intensity scaling to [0, 255] per case: auto | none | percentile | ct:<preset> | ct:<L>,<W>
    #: (medsa.data.preprocess.scale_intensity); recorded in the adapter for evaluate / predict
    intensity: str = "auto"
    max_train_items: int | None = None  #: cap the number of training samples (quick runs)
    max_val_items: int | None = None  #: cap the number of validation samples

    def __post_init__(self) -> None:
        if self.split_seed < 0:
            raise ConfigError(f"data.split_seed must be >= 0; got {self.split_seed}")
        if self.n_folds < 2:
            raise ConfigError(f"data.n_folds must be >= 2; got {self.n_folds}")
        if not 0 <= self.fold < self.n_folds:
            raise ConfigError(f"data.fold must be in [0, {self.n_folds - 1}]; got {self.fold}")
        if not 0 <= self.test_fraction < 1:
            raise ConfigError(f"data.test_fraction must be in [0, 1); got {self.test_fraction}")
        for name in ("image_size", "depth", "max_train_items", "max_val_items"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"data.{name} must be positive; got {v}")
        if self.resize_to is not None and (
            len(self.resize_to) not in (2, 3) or min(self.resize_to) < 1
        ):
            raise ConfigError(
                f"data.resize_to must be [D, H, W] (volumes) or [H, W] positive integers; "
                f"got {self.resize_to}"
            )
        ok = self.intensity in ("auto", "none", "percentile") or self.intensity.startswith("ct:")
        if not ok:
            raise ConfigError(
                f"data.intensity must be auto, none, percentile, ct:<preset> or ct:<level>,<width>; "
                f"got {self.intensity!r}"
            )


@dataclass
class PromptSection:
    """Prompt simulation during training (protocol names: :mod:`medsa.data.prompts`)."""

    #: protocol -> sampling weight; one protocol is drawn per batch
    protocols: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_PROTOCOLS))
    #: iterative clicks: each step draws k in [0, clicks]; k no-grad passes each add one click
    #: from the error region of the model's own prediction before the trained pass
    clicks: int = 0
    #: feed the previous pass's low-resolution logits as mask prompt (SAM's interactive training)
    mask_input: bool = False
    #: protocol used for validation Dice; None = the most likely training protocol
    val_protocol: str | None = None

    def __post_init__(self) -> None:
        if not self.protocols:
            raise ConfigError("prompts.protocols must name at least one protocol")
        for k, w in self.protocols.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                raise ConfigError(f"prompts.protocols[{k!r}] must be a weight >= 0; got {w!r}")
        if sum(self.protocols.values()) <= 0:
            raise ConfigError("prompts.protocols weights must not all be 0")
        if self.clicks < 0:
            raise ConfigError(f"prompts.clicks must be >= 0; got {self.clicks}")
        # "everything" is SAM's automatic mode (a grid of independent one-point queries, scored
        # by best overlap): as a training prompt it would be one prompt of 1024 positive points
        for name in (*self.protocols, self.val_protocol):
            if name in ("everything", "auto"):
                raise ConfigError(
                    f"prompt protocol {name!r} is an evaluation mode (automatic masks), not a "
                    "training prompt; train with 1pt, 3pt, bbox0.5, bbox0.75 or box"
                )

    def default_val_protocol(self) -> str:
        if self.val_protocol is not None:
            return self.val_protocol
        return max(self.protocols.items(), key=lambda kv: kv[1])[0]


@dataclass
class LossSection:
    """Dice + BCE or SAM's focal + Dice (prompted, binary), Dice + CE (MA-SAM multi-class head);
    see engine.losses. The paper's recipe (SAM's): ``focal_dice`` with ``lambda_ce=20``
    (the focal weight), ``lambda_dice=1``, ``iou_weight=1``."""

    #: auto: dice_ce iff multi-class head, else dice_bce
    name: Literal["auto", "dice_bce", "dice_ce", "focal_dice"] = "auto"
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0  #: weight of the (B)CE term, or of the focal term for focal_dice
    batch_dice: bool = False
    #: weight of SAM's IoU-prediction MSE (predicted vs actual IoU of each output mask); the
    #: IoU head ranks the 3 candidates of a single-point prompt at inference
    iou_weight: float = 1.0

    def __post_init__(self) -> None:
        if min(self.lambda_dice, self.lambda_ce, self.iou_weight) < 0:
            raise ConfigError("loss weights must be >= 0")


@dataclass
class OptimSection:
    """AdamW with linear warm-up then cosine decay (per optimizer step)."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0  #: cosine floor as a fraction of lr
    grad_clip: float | None = 1.0  #: max global grad norm; None = off

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0; got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0; got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1); got {self.betas}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0; got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"optim.grad_clip must be > 0 or null; got {self.grad_clip}")


@dataclass
class TrainSection:
    """Loop settings."""

    epochs: int = 10
    max_steps: int | None = None  #: total optimizer steps (overrides epochs for the schedule)
    batch_size: int = 2  #: per process
    grad_accum: int = 1  #: micro-batches per optimizer step
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  #: auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"  #: auto | cpu | cuda | cuda:N (DDP: cuda:LOCAL_RANK)
    grad_checkpointing: bool = False  #: recompute ViT blocks in backward (less memory)
    seed: int = 0
    num_workers: int = 0
    val_every: int = 1  #: validate every N epochs (0 = never; best = last)
    val_at_start: bool = False  #: also validate before the first step (the zero-shot baseline)
    #: also write checkpoints/last.* every N optimizer steps (0: only by time and at epoch ends)
    save_every: int = 0
    #: also write checkpoints/last.* when this many minutes of training passed since the last
    #: save (0: off); at most this much work is lost to a kill, even in a long epoch
    save_every_minutes: float = 5.0
    out_dir: str = "runs/medsa"
    #: memory (MB) for caching the frozen encoder blocks' output per training image (reused by
    #: later epochs, clicks and validation; docs/training.md); null = auto: 2048 on the CPU, 0
    #: (off) elsewhere; 0 = off
    prefix_cache_mb: float | None = None

    def __post_init__(self) -> None:
        if self.prefix_cache_mb is not None and not self.prefix_cache_mb >= 0:
            raise ConfigError(
                f"train.prefix_cache_mb must be >= 0 or null; got {self.prefix_cache_mb}"
            )
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1; got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1 or null; got {self.max_steps}")
        for name in ("num_workers", "val_every", "save_every", "save_every_minutes", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0; got {getattr(self, name)}")
        if not self.out_dir:
            raise ConfigError("train.out_dir must not be empty")


@dataclass
class LoggingSection:
    tensorboard: bool = True  #: events under <out_dir>/tensorboard
    csv: bool = True  #: <out_dir>/log.csv, one row per log / validation event
    log_every: int = 10  #: optimizer steps between loss log rows
    progress: bool = True  #: tqdm bar on rank 0

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ConfigError(f"logging.log_every must be >= 1; got {self.log_every}")


def _default_method() -> dict[str, Any]:
    return {"method": "medsa"}


@dataclass
class TrainConfig:
    """The whole training configuration."""

    model: ModelSection = field(default_factory=ModelSection)
    method: dict[str, Any] = field(default_factory=_default_method)
    data: DataSection = field(default_factory=DataSection)
    prompts: PromptSection = field(default_factory=PromptSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def __post_init__(self) -> None:
        from medsa.adapters.config import method_from_dict, method_to_dict

        # validate + normalise (aliases, defaults filled in) so that a saved config is explicit
        self.method = method_to_dict(method_from_dict(self.method))

    def method_config(self):
        """The :class:`medsa.adapters.config.MethodConfig` of ``method``."""
        from medsa.adapters.config import method_from_dict

        return method_from_dict(self.method)


# ---------------------------------------------------------------------------------------------
# typed construction


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted where floats are)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name)
            except ConfigError:
                continue
        raise ConfigError(
            f"{name} must be {' or '.join(_type_name(a) for a in args)}; got {value!r}"
        )
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}"
            )
        return value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list; got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping; got {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {
            _coerce(str(k), kt, name): _coerce(v, vt, f"{name}[{k!r}]") for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number; got {value!r}")
        if not math.isfinite(value):  # .nan / .inf from YAML would train garbage silently
            raise ConfigError(f"{name} must be a finite number; got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name} must be a string; got {value!r}")
        return str(value)
    raise ConfigError(f"{name}: unsupported config type {tp}")  # pragma: no cover


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"section {prefix.rstrip('.') or 'config'} must be a mapping; got {data!r}"
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"section {prefix.rstrip('.')!r}" if prefix else "the config"
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + str(k) for k in unknown)} in {where}; "
            f"valid: {', '.join(prefix + n for n in names)}"
        )
    kwargs = {}
    for n in names:
        if n not in data:
            continue
        tp = hints[n]
        if dataclasses.is_dataclass(tp):
            kwargs[n] = _build(tp, data[n], f"{prefix}{n}.")
        else:
            kwargs[n] = _coerce(data[n], tp, prefix + n)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from nested dicts (e.g. parsed YAML)."""
    if data is None:
        data = {}
    return _build(TrainConfig, data, "")


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain nested dicts (YAML/JSON-safe)."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> ``(["optim", "lr"], 0.0003)``; the value is parsed as YAML."""
    import yaml

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse the value of override {text!r}: {e}") from None
    # YAML reads "3e-4" as a string (no dot in the mantissa); users mean a number
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value) if any(c in value for c in "eE.") else value
    return key.split("."), value


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(_valid_keys(tp, f"{prefix}{f.name}."))
        else:
            out.append(prefix + f.name)
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides to raw config dicts (before validation).

    Keys are dotted paths into the sections (``optim.lr``, ``method.rank``,
    ``prompts.protocols.1pt``). A path that names no config field raises ConfigError listing the
    valid keys; values are type-checked when the config is built.
    """
    import copy

    data = copy.deepcopy(data) if data else {}
    valid = _valid_keys(TrainConfig)
    sections = {k.split(".")[0] for k in valid}
    for text in overrides:
        path, value = parse_override(text)
        head = path[0]
        if head not in sections:
            raise ConfigError(
                f"unknown config key {'.'.join(path)!r}; valid keys: {', '.join(valid)}, method.<option>"
            )
        if head == "method":
            if len(path) == 1 and not isinstance(value, dict):
                raise ConfigError(
                    f"--set method=... needs a mapping like {{method: lora, rank: 4}}; got {text!r}"
                )
            if len(path) > 2:
                raise ConfigError(f"method overrides look like method.rank=16; got {text!r}")
        elif len(path) == 1:
            raise ConfigError(f"override {text!r} must name a key inside section {head!r}")
        else:
            field_key = ".".join(path[:2])
            if field_key not in valid:
                near = [k for k in valid if k.startswith(head + ".")]
                raise ConfigError(
                    f"unknown config key {'.'.join(path)!r}; valid keys in {head!r}: {', '.join(near)}"
                )
            if len(path) > 2 and (head, path[1]) not in (
                ("prompts", "protocols"),
                ("model", "options"),
            ):
                raise ConfigError(f"{field_key} has no sub-keys; got {text!r}")
        if head == "method" and len(path) == 1:
            data["method"] = value  # replace the whole method section
            continue
        if head == "method" and not isinstance(data.get("method"), dict):
            data["method"] = _default_method()  # --set method.rank=8 on the default method
        if len(path) > 2:  # dict-valued field: the rest is ONE key (protocol names have dots)
            path = [*path[:2], ".".join(path[2:])]
        node = data
        for p in path[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"cannot set {text!r}: {p!r} is not a mapping in the config")
            node = nxt
        node[path[-1]] = value
    return data


def packaged_configs() -> dict[str, Path]:
    """Example configs shipped in ``medsa/configs``: name (file stem) -> path."""
    folder = Path(__file__).resolve().parents[1] / "configs"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def resolve_config_path(path: str | Path) -> Path:
    """A config file path, or the name of a packaged config (``medsa_vit_b_2d``)."""
    p = Path(path)
    if p.exists():
        return p
    shipped = packaged_configs()
    if str(path) in shipped:
        return shipped[str(path)]
    raise ConfigError(
        f"config file {p} does not exist (packaged configs: {', '.join(shipped) or 'none'})"
    )


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (a path or a packaged config name; the defaults when ``path`` is None)
    and apply ``key=value`` overrides."""
    import yaml

    data: Any = {}
    if path is not None:
        p = resolve_config_path(path)
        try:
            data = yaml.safe_load(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {p}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must contain a mapping of sections")
    return config_from_dict(apply_overrides(data, list(overrides or [])))
