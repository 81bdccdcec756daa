"""Training datasets from the config: split, model-input transform, collate."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medsa.errors import ConfigError

from .config import TrainConfig
from .train_step import _multiclass

__all__ = ["ModelInputTransform", "build_datasets", "make_split"]


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack only what training uses (other fields, e.g. ids or None sizes, need not collate)."""
    from torch.utils.data import default_collate

    keys = [k for k in ("image", "target", "label") if k in items[0]]
    return {k: default_collate([it[k] for it in items]) for k in keys}


class ModelInputTransform:
    """Dataset sample -> model input frame, exactly as :class:`medsa.sam.SamPredictor` resizes.

    Input: ``image`` ``(H, W[, C])`` on the ``[0, 255]`` scale and ``target`` ``(H, W)`` (binary
    or label map). Output: ``image`` float32 ``(3, S, S)`` still in ``[0, 255]`` (the model
    normalises it), ``target`` float32 ``(S, S)`` (nearest), ``original_size`` ``(H, W)``.
    ``longest_side`` models (SAM): long side resized to ``S`` and the rest filled with the pixel
    mean, so that it becomes exactly 0 after normalisation as SAM's zero padding;
    ``stretch`` (LiteMedSAM): both sides resized to ``S``.
    """

    def __init__(self, model: nn.Module, size: int | None = None) -> None:
        from medsa.sam.transforms import ResizeLongestSide, ResizeStretch

        self.size = int(size or model.img_size)
        stretch = getattr(model, "resize_mode", "longest_side") == "stretch"
        if self.size > model.img_size or (stretch and self.size != model.img_size):
            raise ConfigError(
                f"data.image_size={self.size} does not fit {getattr(model, 'name', 'the model')} "
                f"(input {model.img_size}"
                + (", stretched: must be equal)" if stretch else "; must not be larger)")
                + "; change model.options.img_size instead"
            )
        self.resize = (ResizeStretch if stretch else ResizeLongestSide)(self.size)
        self.fill = np.asarray(model.pixel_mean.detach().cpu().flatten().tolist(), np.float32)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        from medsa.data.preprocess import to_three_channels

        out = dict(sample)
        img = to_three_channels(np.asarray(sample["image"], dtype=np.float32)).astype(np.float32)
        h, w = img.shape[:2]
        r = self.resize.apply_image(img)
        nh, nw = r.shape[:2]
        canvas = np.empty((self.size, self.size, 3), np.float32)
        canvas[:] = self.fill
        canvas[:nh, :nw] = r
        out["image"] = torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1)))
        out["original_size"] = (h, w)
        if sample.get("target") is not None:
            t = torch.as_tensor(np.asarray(sample["target"]).astype(np.float32))[None, None]
            t = F.interpolate(t, (nh, nw), mode="nearest-exact")[0, 0]
            tgt = torch.zeros((self.size, self.size), dtype=torch.float32)
            tgt[:nh, :nw] = t
            out["target"] = tgt
        for k in ("points", "point_labels", "box"):
            out.pop(k, None)  # prompts are simulated in the input frame by the trainer
        return out


def make_split(cfg: TrainConfig, case_ids: list[str]) -> dict[str, list[str]]:
    """``{"train", "val", "test"}`` case ids: ``data.splits_file`` (fold ``data.fold``), else a
    seeded hold-out test part (``data.test_fraction``) and fold ``data.fold`` of a
    ``data.n_folds``-fold split of the rest (cases grouped by ``data.group_pattern``)."""
    from medsa.data.datasets import load_splits, make_splits, train_val_test_split

    d = cfg.data
    if d.splits_file:
        folds = load_splits(d.splits_file, known_ids=case_ids)
        if d.fold >= len(folds):
            raise ConfigError(f"data.fold={d.fold} but {d.splits_file} has {len(folds)} fold(s)")
        f = folds[d.fold]
        return {"train": list(f["train"]), "val": list(f["val"]), "test": list(f.get("test", []))}
    outer = train_val_test_split(
        case_ids, val=0.0, test=d.test_fraction, seed=d.split_seed, group_pattern=d.group_pattern
    )
    inner = make_splits(outer["train"], d.n_folds, d.split_seed, d.group_pattern)[d.fold]
    return {"train": inner["train"], "val": inner["val"], "test": outer["test"]}


def build_datasets(
    cfg: TrainConfig, model: nn.Module
) -> tuple[Any, Any | None, dict[str, list[str]]]:
    """Train / validation datasets described by ``cfg.data`` and the split used.

    2D images and slices of volumes become :class:`medsa.data.datasets.SliceDataset2D` samples
    (one binary task per class, or label maps for MA-SAM's multi-class head); with
    ``data.depth`` volumes become :class:`~medsa.data.datasets.ChunkDataset3D` chunks.
    """
    from torch.utils.data import Subset

    from medsa.data.datasets import ChunkDataset3D, SliceDataset2D, load_dataset

    d = cfg.data
    if not d.root:
        raise ConfigError("data.root is not set (the dataset folder)")
    mapping = d.classes if isinstance(d.classes, dict) else None
    info = load_dataset(d.root, classes=mapping)
    if d.layout is not None and info.layout != d.layout:
        raise ConfigError(
            f"data.layout is {d.layout!r} but {d.root} has the {info.layout!r} layout"
        )
    selected = list(d.classes) if isinstance(d.classes, list) else []
    for c in selected:
        if c not in info.classes:
            raise ConfigError(f"unknown class {c!r}; dataset classes: {', '.join(info.classes)}")
    classes: list[str | None] = list(selected) or [None]
    split = make_split(cfg, list(info.case_ids))
    mode = "multiclass" if _multiclass(model) else "binary"
    if mode == "multiclass":
        classes = [None]
    transform = ModelInputTransform(model, d.image_size)

    def make(ids: list[str]) -> Any:
        parts = []
        kw = dict(case_ids=ids, mode=mode, transform=transform, seed=cfg.train.seed,
                  resize_to=d.resize_to, intensity=d.intensity)  # fmt: skip
        for c in classes:
            if d.depth:
                parts.append(ChunkDataset3D(info, d.depth, class_name=c, **kw))
            else:
                parts.append(SliceDataset2D(info, class_name=c, **kw))
        if len(parts) == 1:
            return parts[0]
        from torch.utils.data import ConcatDataset

        return ConcatDataset(parts)

    train = make(split["train"])
    val = make(split["val"]) if split["val"] else None
    if d.max_train_items is not None and len(train) > d.max_train_items:
        train = Subset(train, range(d.max_train_items))
    if val is not None and d.max_val_items is not None and len(val) > d.max_val_items:
        val = Subset(val, range(d.max_val_items))
    return train, val, split
