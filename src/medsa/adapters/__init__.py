"""medsa.adapters: parameter-efficient adaptation of SAM.

Med-SA (Adapter, SD-Trans, HyP-Adpt), MA-SAM (FacT + 3D adapters + multi-class decoder), LoRA,
full fine-tuning and zero-shot, installed through the hook points of :mod:`medsa.sam`.
:func:`configure_trainable` is the one place that decides what trains; :func:`save_adapter` /
:func:`load_adapter` store a method's weights alone. See docs/adapters.md.

Public names are resolved lazily so that importing this package does not import torch.
"""

from __future__ import annotations

from medsa._lazy import lazy_exports

_EXPORTS = {
    "MedSAConfig": "config",
    "MASAMConfig": "config",
    "LoRAConfig": "config",
    "FullFTConfig": "config",
    "ZeroShotConfig": "config",
    "MethodConfig": "config",
    "METHODS": "config",
    "method_from_dict": "config",
    "method_from_yaml": "config",
    "method_to_dict": "config",
    "parse_blocks": "config",
    "apply_method": "apply",
    "configure_trainable": "apply",
    "get_method": "apply",
    "encoder_blocks": "apply",
    "count_parameters": "params",
    "ParamCounts": "params",
    "save_adapter": "io",
    "load_adapter": "io",
    "adapter_state_dict": "io",
    "read_adapter_meta": "io",
    "Adapter": "modules",
    "Adapter3D": "modules",
    "AdapterModule": "modules",
    "FacTQKV": "modules",
    "FacTShared": "modules",
    "HyPAdapter": "modules",
    "LoRAQKV": "modules",
    "SDTrans": "modules",
    "MASAMDecoder": "masam",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
