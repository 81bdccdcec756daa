"""ONNX export (``medsa export``) and the ONNX Runtime predictor (``--runtime onnx``).

Names resolve lazily (the submodules import torch / onnxruntime)::

    from medsa.export import export_onnx, make_predictor, OnnxPredictor
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "export_onnx": "export",
    "read_meta": "export",
    "OnnxMeta": "export",
    "make_predictor": "runtime",
    "OnnxPredictor": "runtime",
    "OnnxSessions": "runtime",
    "onnx_sessions": "runtime",
    "RUNTIMES": "runtime",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
