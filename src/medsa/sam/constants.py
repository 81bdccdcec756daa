"""Constants of the SAM model family, kept free of torch so data code can import them cheaply."""

from __future__ import annotations

#: SAM's ImageNet pixel statistics on the 0-255 scale (segment-anything ``Sam.pixel_mean/std``)
SAM_PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
SAM_PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
