"""medsa: adapt Segment Anything (SAM) to medical images with parameter-efficient adapters.

The top-level import is deliberately light (no torch import); sub-packages import what they need.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
