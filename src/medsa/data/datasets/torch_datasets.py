"""Torch datasets over an indexed dataset: 2D slices (:class:`SliceDataset2D`) and 3D chunks
(:class:`ChunkDataset3D`), with per-case intensity scaling, optional resizing and prompt simulation."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from medsa.errors import ConfigError, DataError

from .layouts import Case, DatasetInfo

__all__ = ["SliceDataset2D", "ChunkDataset3D"]


class _CaseCache:
    """Small per-dataset LRU of loaded cases (no global state; each worker has its own)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def get(self, key: tuple[str, str], load: Callable[[], Any]) -> Any:
        if key in self._d:
            self._d.move_to_end(key)
            return self._d[key]
        val = load()
        if self.size > 0:
            self._d[key] = val
            while len(self._d) > self.size:
                self._d.popitem(last=False)
        return val


def _check_mode(mode: str) -> None:
    if mode not in ("binary", "multiclass"):
        raise ConfigError(f"mode must be 'binary' or 'multiclass', got {mode!r}")


class _Base:
    def __init__(
        self,
        info: DatasetInfo,
        case_ids: Sequence[str] | None,
        class_name: str | None,
        mode: str,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None,
        intensity: str,
        prompt: str | None,
        seed: int,
        cache_size: int,
        resize_to: Sequence[int] | None = None,
    ) -> None:
        from medsa.data.preprocess import SamTransform, check_resize_to

        _check_mode(mode)
        self.info = info
        self.resize_to = check_resize_to(resize_to, info.dim)
        ids = info.case_ids if case_ids is None else list(case_ids)
        unknown = sorted(set(ids) - set(info.case_ids))
        if unknown:
            raise DataError(f"{info.root}: unknown case id(s) {unknown[:5]}")
        by_id = {c.id: c for c in info.cases}
        self.cases = [by_id[i] for i in ids]
        if class_name is not None and class_name not in info.classes:
            raise ConfigError(
                f"unknown class {class_name!r}; dataset classes: {', '.join(info.classes)}"
            )
        self.classes = [class_name] if class_name is not None else list(info.classes)
        self.mode = mode
        self.transform = transform if transform is not None else SamTransform()
        self.intensity = intensity
        self.prompt = prompt
        self.seed = seed
        self.epoch = 0
        self._cache = _CaseCache(cache_size)
        if prompt is not None:
            from medsa.data.prompts import get_protocol

            get_protocol(prompt)  # fail early on a typo

    def set_epoch(self, epoch: int) -> None:
        """New random prompts each epoch, reproducible for a given (seed, epoch, index)."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def _load(self, case: Case) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
        """Image scaled to [0, 255] with a leading slice axis ``(Z, H, W[, C])``, targets ``(Z, H, W)``
        (after ``resize_to``: image linear, targets and label map nearest)."""
        from medsa.data.preprocess import resize_spatial, resized_shape, scale_intensity

        def load() -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
            img, targets = self.info.load_case(case)
            if not np.isfinite(img.array).all():
                raise DataError(f"case {case.id}: image contains NaN/inf ({case.images[0]})")
            # per case (consistent across slices); per channel for volumes, whose channels are
            # modalities with different ranges (2D channels are colours: scaled jointly)
            if img.channel_axis != 0 or img.array.dtype == np.uint8:
                arr = scale_intensity(img.array, self.intensity)
            else:
                ax = img.channel_axis
                chans = [scale_intensity(c, self.intensity) for c in np.moveaxis(img.array, ax, 0)]
                arr = np.stack(chans, axis=ax)
            if img.is_3d:
                if img.channel_axis == 0:
                    arr = np.moveaxis(arr, 0, -1)  # (D, H, W, C)
            else:
                arr = arr[None]
                targets = {k: v[None] for k, v in targets.items()}
            labmap = self.info.load_label_map(case) if self.mode == "multiclass" else None
            if labmap is not None and not img.is_3d:
                labmap = labmap[None]
            if self.resize_to is not None:  # scaled first, then resized (as at inference)
                shape = resized_shape(arr.shape[:3], self.resize_to)
                arr = resize_spatial(arr, shape, kind="image", channels_last=arr.ndim == 4)
                targets = {k: resize_spatial(v, shape, kind="label") for k, v in targets.items()}
                if labmap is not None:
                    labmap = resize_spatial(labmap, shape, kind="label")
            return arr, targets, labmap

        return self._cache.get(("case", case.id), load)

    def _index_targets(self, case: Case) -> dict[str, np.ndarray]:
        """Targets ``(Z, H, W)`` only (no image read, resized as :meth:`_load` does): used to
        build the sample index cheaply."""
        from medsa.data.preprocess import resize_spatial, resized_shape

        targets = self.info.load_targets(case)
        out = {}
        for k, v in targets.items():
            v = v[None] if v.ndim == 2 else v
            if self.resize_to is not None:
                v = resize_spatial(v, resized_shape(v.shape, self.resize_to), kind="label")
            out[k] = v
        return out

    def _add_prompt(
        self, sample: dict[str, Any], mask: np.ndarray, rng: np.random.Generator
    ) -> None:
        from medsa.data.prompts import get_protocol

        if self.prompt is None:
            return
        p = get_protocol(self.prompt)(mask, rng)
        sample["points"], sample["point_labels"] = p.points, p.labels
        if p.box is not None:
            sample["box"] = p.box


class SliceDataset2D(_Base):
    """2D training samples: each 2D image, or each slice of a volume, per class ("task").

    Items (after the default :class:`~medsa.data.preprocess.SamTransform`): ``image`` float32
    ``(3, S, S)``, ``target`` float32 ``(S, S)`` (binary for ``class_name``; label map in
    ``"multiclass"`` mode), ``case_id``, ``slice`` (int, 0 for 2D), ``class_name``,
    ``original_size``; with ``prompt=`` also ``points`` ``(N, 2)``, ``point_labels`` ``(N,)``,
    ``box`` ``(4,)`` in resized-image ``(x, y)`` coordinates.

    Args:
        info: from :func:`load_dataset`.
        case_ids: subset (e.g. a split); default all.
        class_name: one class; ``None`` = every class is a separate binary task (binary mode).
        mode: ``"binary"`` (per-class target) or ``"multiclass"`` (label map, MA-SAM).
        transform: sample dict -> sample dict; default ``SamTransform()``.
        intensity: see :func:`~medsa.data.preprocess.scale_intensity` (applied per case).
        include_empty: also keep slices whose target is empty (no prompt then).
        prompt: protocol name from :data:`~medsa.data.prompts.PROMPT_PROTOCOLS` or ``None``.
        seed: prompt randomness (with :meth:`set_epoch`).
        cache_size: number of loaded cases kept in memory.
        resize_to: ``(H, W)``: resize every image (every slice of a volume) in-plane first;
            ``(D, H, W)``: resize each volume (3D datasets only). Image linear, targets
            nearest; the samples then live on the resized grid.
    """

    def __init__(
        self,
        info: DatasetInfo,
        case_ids: Sequence[str] | None = None,
        class_name: str | None = None,
        mode: str = "binary",
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        intensity: str = "auto",
        include_empty: bool = False,
        prompt: str | None = None,
        seed: int = 0,
        cache_size: int = 4,
        resize_to: Sequence[int] | None = None,
    ) -> None:
        super().__init__(
            info, case_ids, class_name, mode, transform, intensity, prompt, seed, cache_size,
            resize_to,
        )  # fmt: skip
        if prompt is not None and include_empty:
            raise ConfigError(
                "include_empty=True cannot be combined with prompts (empty slices have none)"
            )
        self.index: list[tuple[int, int, str | None]] = []
        for ci, case in enumerate(self.cases):
            targets = self._index_targets(case)
            if mode == "multiclass":
                any_fg = np.any(np.stack([targets[c] for c in self.classes]), axis=0)
                zs = (
                    range(any_fg.shape[0])
                    if include_empty
                    else np.nonzero(any_fg.any(axis=(1, 2)))[0]
                )
                self.index += [(ci, int(z), None) for z in zs]
                continue
            for cname in self.classes:
                t = targets[cname]
                zs = range(t.shape[0]) if include_empty else np.nonzero(t.any(axis=(1, 2)))[0]
                self.index += [(ci, int(z), cname) for z in zs]
        if not self.index:
            raise DataError(
                f"{info.root}: no slice with a non-empty target for class(es) {self.classes} in the "
                f"{len(self.cases)} selected case(s)"
            )

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ci, z, cname = self.index[i]
        case = self.cases[ci]
        arr, targets, labmap = self._load(case)
        if self.mode == "multiclass":
            target = labmap[z].astype(np.uint8)  # type: ignore[index]
            mask = target > 0
        else:
            mask = targets[cname][z]
            target = mask.astype(np.uint8)
        sample: dict[str, Any] = {"image": arr[z], "target": target, "case_id": case.id, "slice": z,
                                  "class_name": cname or "all"}  # fmt: skip
        if mask.any():
            self._add_prompt(sample, mask, self._rng(i))
        return self.transform(sample)


class ChunkDataset3D(_Base):
    """3D samples: chunks of ``depth`` consecutive slices (MA-SAM / SD-Trans input).

    Items: ``image`` float32 ``(D, 3, S, S)``, ``target`` float32 ``(D, S, S)``, ``valid`` bool
    ``(D,)`` (False for zero-padded slices past the end), ``slices`` int64 ``(D,)``, ``case_id``,
    ``class_name``; with ``prompt=``: ``points`` ``(D, N, 2)``, ``point_labels`` ``(D, N)`` (-1 on
    slices without target), ``box`` ``(D, 4)`` (zeros there), ``has_prompt`` bool ``(D,)`` (the
    paper prompts every slice separately).

    Args:
        depth, stride, pad: see :func:`~medsa.data.preprocess.chunk_indices`.
        resize_to: resize each volume to ``(D, H, W)`` first (the paper uses 128^3), trilinear for
            images / nearest for labels; ``(H, W)`` resizes in-plane only (slice count kept).
        only_nonempty: skip chunks whose target is empty.
        Other arguments as :class:`SliceDataset2D`.
    """

    def __init__(
        self,
        info: DatasetInfo,
        depth: int,
        case_ids: Sequence[str] | None = None,
        class_name: str | None = None,
        mode: str = "binary",
        stride: int | None = None,
        pad: str = "replicate",
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        intensity: str = "auto",
        resize_to: Sequence[int] | None = None,
        only_nonempty: bool = True,
        prompt: str | None = None,
        seed: int = 0,
        cache_size: int = 4,
    ) -> None:
        from medsa.data.preprocess import chunk_indices

        if info.dim != 3:
            raise ConfigError(f"{info.root} is a 2D dataset; use SliceDataset2D")
        super().__init__(
            info, case_ids, class_name, mode, transform, intensity, prompt, seed, cache_size,
            resize_to,
        )  # fmt: skip
        self.depth = depth
        self.index: list[tuple[int, np.ndarray, str | None]] = []
        for ci, case in enumerate(self.cases):
            targets = self._index_targets(case)
            names: list[str | None] = [None] if mode == "multiclass" else list(self.classes)
            for cname in names:
                t = (
                    np.any(np.stack([targets[c] for c in self.classes]), axis=0)
                    if cname is None
                    else targets[cname]
                )
                for idx in chunk_indices(t.shape[0], depth, stride, pad):
                    if only_nonempty and not t[idx[idx >= 0]].any():
                        continue
                    self.index.append((ci, idx, cname))
        if not self.index:
            raise DataError(
                f"{info.root}: no chunk with a non-empty target for class(es) {self.classes} in the "
                f"{len(self.cases)} selected case(s)"
            )

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        from medsa.data.preprocess import take_slices

        ci, idx, cname = self.index[i]
        case = self.cases[ci]
        arr, targets, labmap = self._load(case)
        tvol = (labmap if cname is None else targets[cname]).astype(np.uint8)  # type: ignore[union-attr]
        imgs, tgts = take_slices(arr, idx), take_slices(tvol, idx)
        rng = self._rng(i)
        items = []
        for z in range(len(idx)):
            s: dict[str, Any] = {"image": imgs[z], "target": tgts[z]}
            if self.prompt is not None and tgts[z].any():
                self._add_prompt(s, tgts[z] > 0, rng)
            items.append(self.transform(s))
        out: dict[str, Any] = {
            "image": torch.stack([torch.as_tensor(it["image"]) for it in items]),
            "target": torch.stack([torch.as_tensor(it["target"]) for it in items]),
            "valid": torch.as_tensor(idx >= 0),
            "slices": torch.as_tensor(idx),
            "case_id": case.id,
            "class_name": cname or "all",
            "original_size": items[0].get("original_size"),
        }
        if self.prompt is not None:
            n = max((len(it["points"]) for it in items if "points" in it), default=0)
            pts = np.zeros((len(idx), n, 2), np.float32)
            labs = np.full((len(idx), n), -1, np.int64)
            box = np.zeros((len(idx), 4), np.float32)
            has = np.zeros(len(idx), bool)
            for z, it in enumerate(items):
                if "points" in it:
                    k = len(it["points"])
                    pts[z, :k], labs[z, :k], has[z] = it["points"], it["point_labels"], True
                if "box" in it:
                    box[z], has[z] = it["box"], True
            out.update(points=torch.from_numpy(pts), point_labels=torch.from_numpy(labs),
                       box=torch.from_numpy(box), has_prompt=torch.from_numpy(has))  # fmt: skip
        return out
