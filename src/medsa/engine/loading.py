"""Model loading shared by ``medsa evaluate``, ``predict`` and ``serve``: backbone weights,
a saved adapter, and the refusal of random weights unless asked for (``--random-weights``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medsa.errors import CheckpointError, ConfigError

__all__ = ["RANDOM_WEIGHTS_HELP", "SHIPPED_WEIGHTS", "load_model"]

#: backbones whose ``build_sam`` loads shipped weights when no checkpoint is given
SHIPPED_WEIGHTS = ("lite_medsam",)

RANDOM_WEIGHTS_HELP = (
    "allow a backbone without weights (no --checkpoint, e.g. vit_tiny or vit_b): its masks are "
    "meaningless; for tests and smoke runs only"
)


def load_model(
    backbone: str | None,
    checkpoint: Path | None,
    adapter: Path | None,
    device: Any,
    random_weights: bool = False,
) -> Any:
    """Build the backbone (``medsa.sam.build_sam``), apply a saved adapter, move to ``device``.

    ``backbone=None`` means: the backbone recorded in the adapter's JSON, else ``lite_medsam``.
    A backbone that would keep random weights (no ``checkpoint`` and none shipped, and no adapter
    that holds every parameter, e.g. full fine-tuning) is refused unless ``random_weights``:
    such a model exits 0 with meaningless masks.

    Raises:
        ConfigError: random weights without ``random_weights=True``.
        CheckpointError: missing / unreadable / mismatching checkpoint or adapter.
    """
    from medsa.sam import build_sam
    from medsa.sam.build import get_config

    if checkpoint is not None and not Path(checkpoint).exists():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist")
    name = backbone
    if name is None and adapter is not None:
        from medsa.adapters.io import read_adapter_meta

        name = read_adapter_meta(adapter).get("backbone")
    name = name or "lite_medsam"
    get_config(name)  # an unknown name is reported as such, before the weights question
    unweighted = checkpoint is None and name not in SHIPPED_WEIGHTS
    if unweighted and not random_weights and adapter is None:
        raise ConfigError(_no_weights_message(name, adapter))
    model = build_sam(name, checkpoint=checkpoint)
    if adapter is not None:
        from medsa.adapters import load_adapter

        model = load_adapter(model, adapter)
        if unweighted and not random_weights and not _adapter_covers_all(model):
            raise ConfigError(_no_weights_message(name, adapter))
    return model.to(device).eval()


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
