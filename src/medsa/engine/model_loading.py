"""What inference needs from an adapter file, and the one place that reconciles it with the CLI.

``medsa train`` records in the adapter's JSON (``"inference"``, see docs/adapters.md) how the
model saw its data: chunk ``depth`` (SD-Trans / MA-SAM 3D adapters), ``resize_to``, the
``intensity`` scaling, the ``classes`` it was trained on, the backbone options and weights.
:func:`resolve_inference` turns that plus the command-line options of ``medsa evaluate`` /
``predict`` / ``serve`` into :class:`InferenceSettings`:

- an option that is not given takes the adapter's value (an SD-Trans adapter trained with
  ``depth: 8`` is run on chunks of 8 slices without ``--depth``);
- an option that contradicts the adapter (``--depth 1`` for that adapter, another backbone or
  resize) raises :class:`~medsa.errors.ConfigError`, never a silent 2D run;
- an adapter written before these fields existed still loads, with the command-line values and a
  warning where its 3D modules would otherwise go unused.

This module does not import torch at import time.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsa.errors import ConfigError

__all__ = [
    "InferenceSettings",
    "inference_meta",
    "dataset_classes",
    "resolve_inference",
    "build_inference_model",
    "load_model",
    "RANDOM_WEIGHTS_HELP",
    "SHIPPED_WEIGHTS",
    "parse_resize_to",
    "has_depth_modules",
]

DEFAULT_BACKBONE = "lite_medsam"


@dataclass(frozen=True)
class InferenceSettings:
    """How to build the model and feed it data at inference.

    Attributes:
        backbone: ``build_sam`` name.
        checkpoint: backbone weights (None: the backbone's default).
        adapter: adapter path (None: the plain backbone).
        depth: encode volumes in chunks of ``depth`` slices (None: slice by slice).
        resize_to: ``(H, W)`` / ``(D, H, W)`` model grid (None: the image's own grid);
            predictions are resampled back to the input's grid.
        intensity: ``medsa.data.preprocess.scale_intensity`` mode.
        model_options: ``build_sam`` overrides used in training (e.g. ``img_size``).
        classes: ``{name: label value}`` the adapter was trained on (None: unknown / all).
        from_adapter: the adapter file carried these settings (False: defaults / CLI only).
    """

    backbone: str
    checkpoint: Path | None = None
    adapter: Path | None = None
    depth: int | None = None
    resize_to: tuple[int, ...] | None = None
    intensity: str = "auto"
    model_options: dict[str, Any] = field(default_factory=dict)
    classes: dict[str, Any] | None = None
    from_adapter: bool = False


def parse_resize_to(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """``"128,128,128"`` / ``"256,256"`` (or a sequence) -> a checked tuple; None stays None."""
    from medsa.data.preprocess import check_resize_to

    if text is None:
        return None
    if isinstance(text, str):
        try:
            vals = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--resize-to {text!r}: expected D,H,W or H,W integers") from None
        return check_resize_to(vals)
    return check_resize_to(text)


def has_depth_modules(method: Mapping[str, Any]) -> bool:
    """Whether a method config (adapter JSON ``"method"``) has modules that only act on depth
    chunks: Med-SA's SD-Trans branch or MA-SAM's 3D adapters."""
    name = method.get("method")
    if name == "medsa":
        return bool(method.get("sd_trans", False))
    if name == "masam":
        return bool(method.get("adapters_3d", True))
    return False


def inference_meta(cfg: Any, classes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``"inference"`` entry of an adapter file from a :class:`medsa.engine.config.TrainConfig`.

    ``classes``: ``{name: label value}`` of the classes trained on (None: unknown).
    """
    d, m = cfg.data, cfg.model
    ckpt = m.checkpoint
    if ckpt and Path(ckpt).exists():
        ckpt = str(Path(ckpt).resolve())  # evaluate may run from another folder
    return {
        "depth": d.depth,
        "resize_to": list(d.resize_to) if d.resize_to is not None else None,
        "intensity": d.intensity,
        "image_size": d.image_size,
        "checkpoint": ckpt,
        "model_options": dict(m.options),
        "classes": dict(classes) if classes is not None else None,
        "num_classes": len(classes) if classes is not None else None,
    }


def dataset_classes(dataset: Any) -> dict[str, Any] | None:
    """``{name: label value}`` of the classes a training set covers (``SliceDataset2D`` /
    ``ChunkDataset3D``, also inside ``Subset`` / ``ConcatDataset``); None for other datasets."""
    parts, out = [dataset], {}
    while parts:
        ds = parts.pop(0)
        if hasattr(ds, "datasets"):  # ConcatDataset
            parts.extend(ds.datasets)
        elif hasattr(ds, "dataset") and hasattr(ds, "indices"):  # Subset
            parts.append(ds.dataset)
        elif hasattr(ds, "classes") and hasattr(getattr(ds, "info", None), "classes"):
            for c in ds.classes:
                v = ds.info.classes[c]
                out[str(c)] = list(v) if isinstance(v, tuple) else int(v)
        else:
            return None
    return out or None


def _warn(message: str) -> None:
    print(f"medsa: warning: {message}", file=sys.stderr)


def _describe_depth(depth: int | None) -> str:
    return f"chunks of {depth} slices" if depth else "single slices (no depth)"


def resolve_inference(
    adapter: str | Path | None,
    *,
    backbone: str | None = None,
    checkpoint: str | Path | None = None,
    depth: int | None = None,
    resize_to: str | Sequence[int] | None = None,
    intensity: str | None = None,
    warn: Callable[[str], None] = _warn,
) -> InferenceSettings:
    """Reconcile an adapter file's recorded settings with explicitly given options.

    ``None`` means "not given". Raises :class:`ConfigError` for an option that contradicts the
    adapter (the message names the option and the adapter's value); see the module docstring.
    """
    from medsa.adapters.io import read_adapter_meta

    if depth is not None and depth < 1:
        raise ConfigError(f"--depth must be >= 1, got {depth}")
    size = parse_resize_to(resize_to)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if adapter is None:
        return InferenceSettings(
            backbone or DEFAULT_BACKBONE, ckpt, None, depth, size, intensity or "auto"
        )
    meta = read_adapter_meta(adapter)
    name = Path(adapter).name
    stored_backbone = meta.get("backbone")
    if backbone is not None and stored_backbone and backbone != stored_backbone:
        raise ConfigError(
            f"--backbone {backbone} contradicts adapter {name}: it was trained on "
            f"{stored_backbone} (leave --backbone out)"
        )
    method = meta.get("method") or {}
    bb = backbone or stored_backbone or DEFAULT_BACKBONE
    inf = meta.get("inference")
    if not isinstance(inf, Mapping):  # written before adapters recorded their settings
        if has_depth_modules(method) and depth is None:
            warn(
                f"adapter {name} has 3D modules ({method.get('method')}) but does not record its "
                "training depth (older medsa): volumes are encoded one slice at a time, where "
                "those modules do nothing; pass --depth N (the training data.depth)"
            )
        return InferenceSettings(bb, ckpt, Path(adapter), depth, size, intensity or "auto")
    s_depth = inf.get("depth")
    s_size = tuple(int(v) for v in inf["resize_to"]) if inf.get("resize_to") else None
    s_int = str(inf.get("intensity") or "auto")
    bad = []
    if depth is not None and depth != s_depth:
        bad.append(f"--depth {depth} (trained on {_describe_depth(s_depth)})")
    if size is not None and size != s_size:
        was = "x".join(map(str, s_size)) if s_size else "no resize (original grid)"
        bad.append(f"--resize-to {'x'.join(map(str, size))} (trained with {was})")
    if intensity is not None and intensity != s_int:
        bad.append(f"--intensity {intensity} (trained with {s_int})")
    if bad:
        raise ConfigError(
            f"adapter {name} contradicts " + "; ".join(bad) + ": leave the option(s) out to use "
            "the adapter's settings"
        )
    if ckpt is None and inf.get("checkpoint"):
        stored = Path(inf["checkpoint"])
        if stored.exists():
            ckpt = stored
        else:
            warn(
                f"adapter {name} was trained on backbone weights {stored}, which do not exist "
                f"here; pass --checkpoint (now using {bb}'s default weights)"
            )
    classes = inf.get("classes")
    if isinstance(classes, Mapping):  # JSON lists back to nnU-Net region tuples
        classes = {str(k): tuple(v) if isinstance(v, list) else v for k, v in classes.items()}
    return InferenceSettings(
        bb,
        ckpt,
        Path(adapter),
        s_depth,
        s_size,
        s_int,
        dict(inf.get("model_options") or {}),
        dict(classes) if isinstance(classes, Mapping) else None,
        True,
    )


#: backbones whose ``build_sam`` loads shipped weights when no checkpoint is given
SHIPPED_WEIGHTS = ("lite_medsam",)

RANDOM_WEIGHTS_HELP = (
    "allow a backbone without weights (no --checkpoint, e.g. vit_tiny or vit_b): its masks are "
    "meaningless; for tests and smoke runs only"
)


def check_weights(name: str, checkpoint: Path | str | None, random_weights: bool) -> bool:
    """Refuse a backbone that would keep random weights (no ``checkpoint`` and none shipped)
    unless ``random_weights``; returns whether it is such an unweighted backbone.

    Raises:
        ConfigError: unknown backbone, or random weights without ``random_weights``.
        CheckpointError: ``checkpoint`` does not exist.
    """
    from medsa.errors import CheckpointError
    from medsa.sam.build import get_config

    if checkpoint is not None and not Path(checkpoint).exists():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist")
    get_config(name)  # an unknown name is reported as such, before the weights question
    unweighted = checkpoint is None and name not in SHIPPED_WEIGHTS
    if unweighted and not random_weights:
        raise ConfigError(_no_weights_message(name, None))
    return unweighted


def build_inference_model(
    settings: InferenceSettings, device: Any, random_weights: bool = False
) -> Any:
    """Backbone (``build_sam(backbone, checkpoint, **model_options)``) with the adapter applied,
    in eval mode on ``device``.

    A backbone that would keep random weights (no checkpoint and none shipped, and no adapter
    that holds every parameter, e.g. full fine-tuning) is refused unless ``random_weights``:
    such a model exits 0 with meaningless masks.

    Raises:
        ConfigError: random weights without ``random_weights=True``.
        CheckpointError: missing / unreadable / mismatching checkpoint or adapter.
    """
    from medsa.sam import build_sam

    name, adapter = settings.backbone, settings.adapter
    unweighted = check_weights(name, settings.checkpoint, random_weights or adapter is not None)
    model = build_sam(name, checkpoint=settings.checkpoint, **settings.model_options)
    if adapter is not None:
        from medsa.adapters import load_adapter

        model = load_adapter(model, adapter)
        if unweighted and not random_weights and not _adapter_covers_all(model):
            raise ConfigError(_no_weights_message(name, adapter))
    return model.to(device).eval()


def load_model(
    backbone: str | None,
    checkpoint: str | Path | None,
    adapter: str | Path | None,
    device: Any,
    random_weights: bool = False,
) -> Any:
    """Build the backbone, apply a saved adapter, move to ``device`` (eval mode).

    ``backbone=None`` means: the backbone recorded in the adapter's JSON, else ``lite_medsam``
    (settings resolved by :func:`resolve_inference`); random weights are refused unless
    ``random_weights`` (see :func:`build_inference_model`).
    """
    settings = resolve_inference(adapter, backbone=backbone, checkpoint=checkpoint)
    return build_inference_model(settings, device, random_weights=random_weights)


def _no_weights_message(name: str, adapter: Path | None) -> str:
    held = f"; the adapter {adapter} holds only the method's weights" if adapter else ""
    return (
        f"backbone {name!r} has no weights without --checkpoint{held}: give --checkpoint FILE "
        f"(the pre-trained {name} weights), or --random-weights to run it with random weights "
        "anyway (meaningless masks; for tests only)"
    )


def _adapter_covers_all(model: Any) -> bool:
    """Whether the loaded adapter holds every parameter (full fine-tuning): then the backbone's
    own (random) weights are all replaced."""
    from medsa.adapters.io import adapter_state_dict

    held = set(adapter_state_dict(model))
    return all(n in held for n, _ in model.named_parameters())
