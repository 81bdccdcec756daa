"""``--runtime`` / ``--onnx-dir`` options shared by ``medsa predict`` and ``medsa serve``
(no torch import: command-line parsing stays light)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--runtime {torch,onnx}`` and ``--onnx-dir DIR`` to a command's parser."""
    p.add_argument(
        "--runtime",
        choices=("torch", "onnx"),
        default="torch",
        help="torch (default) or onnx: encoder and prompt decoder in ONNX Runtime on the CPU "
        "(faster on CPUs; docs/export.md)",
    )
    p.add_argument(
        "--onnx-dir",
        type=Path,
        default=None,
        help="with --runtime onnx: a folder written by 'medsa export' for the same backbone + "
        "adapter (default: export the loaded model now, into a temporary folder)",
    )
