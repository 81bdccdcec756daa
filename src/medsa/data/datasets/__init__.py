"""Dataset layouts, torch datasets (2D slices, 3D chunks) and leakage-free splits.

One import path for all of it (``from medsa.data.datasets import load_dataset, ChunkDataset3D``);
the code lives in three modules by concern:

- :mod:`~medsa.data.datasets.layouts`: ``load_dataset`` detects a folder's layout (``folder``,
  ``nnunet`` / MSD, ``imagesTr``) and indexes its cases (``DatasetInfo``, ``Case``)
- :mod:`~medsa.data.datasets.torch_datasets`: ``SliceDataset2D`` / ``ChunkDataset3D`` training
  samples (intensity scaling, optional ``resize_to``, prompt simulation)
- :mod:`~medsa.data.datasets.splits`: splits by CASE (optionally by a group of cases, e.g. all
  frames of one patient, via a regex), so slices of one volume never end up in both train and
  validation

This package does not import torch (the torch datasets import it when used).
"""

from __future__ import annotations

from .layouts import IMAGE_EXTS, Case, DatasetInfo, Issue, binarize_mask, load_dataset
from .splits import load_splits, make_splits, save_splits, train_val_test_split
from .torch_datasets import ChunkDataset3D, SliceDataset2D

__all__ = [
    "Case",
    "Issue",
    "DatasetInfo",
    "IMAGE_EXTS",
    "load_dataset",
    "binarize_mask",
    "SliceDataset2D",
    "ChunkDataset3D",
    "make_splits",
    "train_val_test_split",
    "save_splits",
    "load_splits",
]
