"""medsa.sam exports resolve lazily and importing the package does not import torch."""

from __future__ import annotations

import subprocess
import sys


def test_all_exports_resolve() -> None:
    import medsa.sam

    for name in medsa.sam.__all__:
        assert getattr(medsa.sam, name) is not None, name


def test_import_is_light() -> None:
    code = "import sys, medsa.sam; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
