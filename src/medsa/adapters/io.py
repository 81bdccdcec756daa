"""Save / load a method's weights alone: ``<path>.safetensors`` + ``<path>.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medsa._fs import atomic_write, atomic_write_text
from medsa.errors import CheckpointError, ConfigError, MedsaError

from .apply import apply_method, get_method
from .config import method_from_dict, method_to_dict
from .modules import AdapterModule

__all__ = ["adapter_state_dict", "load_adapter", "read_adapter_meta", "save_adapter"]

FORMAT = "medsa-adapter"
FORMAT_VERSION = 1


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a method owns: every tunable parameter, all parameters and persistent buffers
    of adapter modules (frozen ones included, e.g. MA-SAM's positional-encoding copy), and the
    persistent buffers of fully fine-tuned components (e.g. the prompt encoder's random Fourier
    matrix). Shared tensors appear once, under their first name."""
    adapter_prefixes = [n for n, m in model.named_modules() if isinstance(m, AdapterModule)]

    def in_adapter(name: str) -> bool:
        return any(name.startswith(p + ".") for p in adapter_prefixes)

    out: dict[str, torch.Tensor] = {}
    fully_trained: dict[str, bool] = {}
    for name, p in model.named_parameters():
        top = name.partition(".")[0]
        fully_trained[top] = fully_trained.get(top, True) and p.requires_grad
        if p.requires_grad or in_adapter(name):
            out[name] = p
    persistent = set(model.state_dict())
    for name, b in model.named_buffers():
        keep = in_adapter(name) or fully_trained.get(name.partition(".")[0], False)
        if keep and name in persistent and name not in out:
            out[name] = b
    return out


def save_adapter(
    model: nn.Module,
    path: str | Path,
    backbone: str | None = None,
    inference: dict[str, Any] | None = None,
) -> Path:
    """Write the method's tensors to ``<path>.safetensors`` and its description to ``<path>.json``.

    The JSON holds the method config, the backbone name (``model.name`` unless ``backbone`` is
    given), the medsa version and, when given, ``inference``: what inference needs to see the
    data as training did (depth, resize_to, intensity, classes, ...; written by the trainer, see
    :func:`medsa.engine.model_loading.inference_meta`; files without it still load). Both files are written to temporary files first and moved into
    place, so an interrupted save never leaves a truncated file behind. Returns the
    ``.safetensors`` path.
    """
    from safetensors.torch import save_file

    from medsa import __version__

    cfg = get_method(model)
    if cfg is None:
        raise ConfigError("no method is applied to this model; call apply_method first")
    name = backbone or getattr(model, "name", None)
    if not name or name == "custom":
        raise ConfigError("cannot tell the backbone name; pass backbone='vit_b' (or similar)")
    st_path, json_path = _paths(path)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "medsa_version": __version__,
        "backbone": name,
        "method": method_to_dict(cfg),
        "num_tensors": len(tensors),
        "num_parameters": int(sum(t.numel() for t in tensors.values())),
    }
    if inference is not None:
        try:
            json.dumps(inference)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"adapter inference settings are not JSON data: {e}") from None
        meta["inference"] = dict(inference)
    atomic_write(st_path, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    atomic_write_text(json_path, json.dumps(meta, indent=2) + "\n")
    return st_path


def read_adapter_meta(path: str | Path) -> dict[str, Any]:
    """Read and check ``<path>.json``."""
    _, json_path = _paths(path)
    if not json_path.is_file():
        raise CheckpointError(f"adapter description {json_path} does not exist")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"adapter description {json_path} is unreadable: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{json_path} is not a medsa adapter description")
    version = meta.get("format_version", 0)  # 0: written before the version entry existed
    if not isinstance(version, int):
        raise CheckpointError(f"{json_path} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{json_path} was written by a newer medsa ({meta.get('medsa_version')}); upgrade medsa"
        )
    return meta


def load_adapter(
    model_or_backbone: nn.Module | str,
    path: str | Path,
    checkpoint: str | Path | None = None,
) -> nn.Module:
    """Re-apply a saved method and load its weights strictly.

    Args:
        model_or_backbone: a *fresh* (un-adapted) backbone, or its name to build one with
            :func:`medsa.sam.build_sam` (``checkpoint`` = its pre-trained weights).
        path: the path given to :func:`save_adapter` (with or without suffix).
    Returns:
        the adapted model.
    Raises:
        CheckpointError: missing/corrupt files, another backbone, or tensors that do not match.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_adapter_meta(path)
    st_path, _ = _paths(path)
    if isinstance(model_or_backbone, str):
        from medsa.sam import build_sam

        model = build_sam(model_or_backbone, checkpoint=checkpoint)
    else:
        model = model_or_backbone
    name = getattr(model, "name", None)
    if name not in (None, "custom") and meta.get("backbone") != name:
        raise CheckpointError(
            f"adapter {st_path.name} was trained on backbone {meta.get('backbone')!r}, "
            f"but the model is {name!r}"
        )
    try:
        cfg = method_from_dict(meta["method"])
    except (KeyError, MedsaError) as e:
        raise CheckpointError(f"adapter description has an invalid method config: {e}") from None
    if get_method(model) is not None:
        raise CheckpointError(
            "load_adapter needs a fresh backbone, but a method is already applied"
        )
    if not st_path.is_file():
        raise CheckpointError(f"adapter weights {st_path} do not exist")
    try:
        tensors = load_file(str(st_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"adapter weights {st_path} are unreadable: {e}") from None
    apply_method(model, cfg)
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:

        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        raise CheckpointError(
            f"adapter weights {st_path.name} do not match method {cfg.method!r} on {name!r}: "
            + (f"missing {few(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {few(unexpected)}" if unexpected else "")
        )
    bad = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise CheckpointError(
            f"adapter weights {st_path.name} have wrong shapes: " + "; ".join(bad[:5])
        )
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(tensors[k])  # copy_ casts to the model's dtype and device
    return model
