"""Shared model-running helpers: run SAM on a 2D image or a 3D volume with prompts.

Used by ``medsa evaluate``, ``medsa predict``, the trainer's validation and the web app.

- :class:`Prompt` (defined in :mod:`medsa.data.prompts`, re-exported here) is one prompt set for
  one object: points ``(N, 2)`` in ``(x, y)`` pixel coordinates + labels ``(N,)`` (1 positive,
  0 negative; ``N`` may be 0), and/or a box ``(4,)`` ``(x0, y0, x1, y1)``, and optionally the
  previous low-resolution mask logits ``(1, h, w)`` (iterative clicks).
- :func:`segment_image` runs the image encoder once and decodes every prompt of the image
  (batched through ``SamPredictor.predict_torch`` when the predictor has it).
- :func:`segment_volume` works slice by slice, as the Med-SA paper does for 3D ("we prompt each
  slice of 3D images"): a slice without a prompt is not encoded and stays empty.
- Multimask selection: a prompt that is ambiguous (a single point, no box) is decoded with
  ``multimask_output=True`` and the mask with the highest predicted IoU is kept, as in SAM;
  other prompts are decoded with a single output.

Images: 2D ``(H, W)`` / ``(H, W, C)``, volumes ``(D, H, W)`` / ``(C, D, H, W)``, raw intensities.
:func:`model_input` brings them to what SAM sees with the *same* pipeline as training
(``medsa.data.preprocess.scale_intensity`` once per case -- uint8 kept, otherwise 0.5/99.5
percentiles or a CT window -- then ``to_three_channels``), so evaluation matches training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

# the one prompt type of the project lives in the data layer (engine depends on data, not the
# reverse); re-exported here so ``from medsa.engine.inference import Prompt`` keeps working
from medsa.data.prompts import Prompt
from medsa.errors import DataError, PromptError

__all__ = [
    "Prompt",
    "PROTOCOLS",
    "to_uint8",
    "model_input",
    "ChunkEncoder",
    "as_predictor",
    "segment_image",
    "segment_volume",
    "simulate_prompt",
    "segment_with_protocol",
    "segment_everything",
    "best_overlap_mask",
    "segment_auto",
    "decode_prompts",
    "iterate_clicks",
    "add_click",
]

#: prompt protocols of the Med-SA paper (Sec. 4.1) plus SAM's automatic "everything" mode
#: ("box" = the tight bounding box, as in MedSAM / LiteMedSAM evaluations; "auto" = no prompt,
#: MA-SAM's multi-class head)
PROTOCOLS: tuple[str, ...] = ("1pt", "3pt", "bbox0.5", "bbox0.75", "box", "everything", "auto")


# --------------------------------------------------------------------------- images


def to_uint8(image: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """Map an image / volume to ``uint8`` ``[0, 255]`` (same shape), for display (overlays).

    ``uint8`` input is returned unchanged. Otherwise intensities are clipped to ``window`` (default:
    the 0.5 and 99.5 percentiles of the finite values, robust to CT air / MR outliers) and scaled.
    """
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    a = arr.astype(np.float32)
    finite = np.isfinite(a)
    if not finite.any():
        raise DataError("image has no finite intensity values")
    if window is None:
        lo, hi = np.percentile(a[finite], (0.5, 99.5))
    else:
        lo, hi = window
    if hi <= lo:
        hi = lo + 1.0  # constant image -> all zero rather than a division by zero
    a = np.where(finite, a, lo)
    return np.clip((a - lo) / (hi - lo) * 255.0, 0, 255).round().astype(np.uint8)


def model_input(image: np.ndarray, is_3d: bool, intensity: str = "auto") -> np.ndarray:
    """Raw image / volume -> SAM input: ``(H, W, 3)`` or ``(D, H, W, 3)`` float32 in ``[0, 255]``.

    Same as the training datasets: ``scale_intensity(image, intensity)`` per case (one window
    for all slices of a volume; per channel for multi-channel volumes, jointly for 2D colour),
    then ``to_three_channels`` (grey repeated, RGBA without alpha, 2 channels -> ``(c0, c1, c1)``).
    ``intensity``: ``auto`` | ``none`` | ``percentile`` | ``ct:<preset>`` | ``ct:<level>,<width>``.
    """
    from medsa.data.preprocess import scale_intensity, to_three_channels

    a = np.asarray(image)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if not np.issubdtype(a.dtype, np.number):
        raise DataError(f"unsupported image dtype {a.dtype}")
    if not np.isfinite(a).all():
        raise DataError("image contains NaN or infinite values")
    if is_3d:
        if a.ndim == 3:
            x = scale_intensity(a, intensity)[..., None]
        elif a.ndim == 4:  # (C, D, H, W): modalities with their own ranges
            x = np.stack([scale_intensity(c, intensity) for c in a], axis=-1)
        else:
            raise DataError(f"expected a volume (D, H, W) or (C, D, H, W), got shape {a.shape}")
        return np.stack([to_three_channels(sl) for sl in x]).astype(np.float32)
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] <= 16)):
        raise DataError(f"expected a 2D image (H, W) or (H, W, C), got shape {a.shape}")
    return np.asarray(to_three_channels(scale_intensity(a, intensity)), dtype=np.float32)


def as_predictor(model_or_predictor: Any) -> Any:
    """Return a ``SamPredictor`` for a :class:`medsa.sam.Sam` (or pass a predictor through)."""
    if hasattr(model_or_predictor, "set_image") and hasattr(model_or_predictor, "predict"):
        return model_or_predictor
    from medsa.sam import SamPredictor

    return SamPredictor(model_or_predictor)


class ChunkEncoder:
    """Depth-aware image embeddings of a volume for 3D-adapted encoders (SD-Trans, MA-SAM).

    The slices of ``x`` ``(D, H, W, 3)`` (``[0, 255]``, see :func:`model_input`) are encoded in
    consecutive chunks of ``depth`` slices, ``image_encoder(chunk, depth=len(chunk))``, as the
    trainer does (``medsa.data.preprocess.chunk_indices``, last chunk padded by repeating the last
    slice). :meth:`set_slice` puts the embedding of slice ``z`` into the predictor, which then
    decodes prompts as after ``set_image``; only the current chunk is kept in memory.
    """

    def __init__(self, predictor: Any, x: np.ndarray, depth: int) -> None:
        from medsa.data.preprocess import chunk_indices

        if depth < 1:
            raise PromptError(f"depth must be >= 1, got {depth}")
        self.predictor, self.x, self.depth = predictor, x, int(depth)
        self.chunks = chunk_indices(int(x.shape[0]), self.depth, pad="replicate")
        self._chunk: int | None = None
        self._features: Any = None
        self._input_size: tuple[int, int] = (0, 0)

    def _encode(self, k: int) -> None:
        import torch

        pred, model = self.predictor, self.predictor.model
        idx = self.chunks[k]
        imgs = [pred.transform.apply_image(np.ascontiguousarray(self.x[i])) for i in idx]
        t = torch.as_tensor(np.stack(imgs), device=pred.device).permute(0, 3, 1, 2).float()
        self._input_size = (int(t.shape[-2]), int(t.shape[-1]))
        self._features = model.image_encoder(model.preprocess(t), depth=len(idx))
        self._chunk = k

    def set_slice(self, z: int) -> None:
        """Make slice ``z``'s depth-aware embedding the predictor's current image."""
        k = int(z) // self.depth  # chunks are non-overlapping: chunk k holds k*depth ...
        if self._chunk != k:
            self._encode(k)
        j = int(np.flatnonzero(self.chunks[k] == z)[0])
        p = self.predictor
        p.reset_image()
        p.features = self._features[j : j + 1]
        p.original_size = (int(self.x.shape[1]), int(self.x.shape[2]))
        p.input_size = self._input_size
        p.is_image_set = True


def _decode_one(predictor: Any, prompt: Prompt) -> tuple[np.ndarray, float, np.ndarray]:
    """Decode one prompt on the predictor's current image: ``mask (H, W)``, score, logits ``(1, h, w)``."""
    has_points = len(prompt.points) > 0
    masks, scores, low_res = predictor.predict(
        point_coords=prompt.points if has_points else None,
        point_labels=prompt.labels if has_points else None,
        box=prompt.box,
        mask_input=prompt.mask_input,
        multimask_output=prompt.ambiguous,
    )
    masks, scores, low_res = (np.asarray(_np(x)) for x in (masks, scores, low_res))
    k = int(np.argmax(scores)) if prompt.ambiguous else 0
    return masks[k].astype(bool), float(scores[k]), low_res[k : k + 1]


def _signature(p: Prompt) -> tuple[int, bool, bool, bool]:
    return (len(p.points), p.box is not None, p.mask_input is not None, p.ambiguous)


def decode_prompts(
    predictor: Any, prompts: Sequence[Prompt]
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Decode many prompts on the predictor's current image, batched where possible.

    Prompts with the same structure (number of points, box or not, mask input or not) go through
    ``predictor.predict_torch`` as one batch; predictors without it fall back to ``predict``.
    Returns ``masks (K, H, W)`` bool, ``scores (K,)`` and the low-res logits ``(1, h, w)`` of each.
    """
    if not prompts:
        return np.zeros((0, 0, 0), bool), np.zeros(0, np.float32), []
    if not hasattr(predictor, "predict_torch") or len(prompts) == 1:
        outs = [_decode_one(predictor, p) for p in prompts]
        return (
            np.stack([o[0] for o in outs]),
            np.array([o[1] for o in outs], np.float32),
            [o[2] for o in outs],
        )
    import torch

    groups: dict[tuple[int, bool, bool, bool], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(_signature(p), []).append(i)
    size = tuple(predictor.original_size)
    dev = predictor.device
    masks: list[Any] = [None] * len(prompts)
    scores = np.zeros(len(prompts), np.float32)
    logits: list[Any] = [None] * len(prompts)
    for (n, has_box, has_mask, ambiguous), idx in groups.items():
        coords = labels = boxes = mask_in = None
        if n:
            c = np.stack([prompts[i].points for i in idx]).astype(np.float64)
            c = predictor.transform.apply_coords(c, size)
            coords = torch.as_tensor(c, dtype=torch.float, device=dev)
            labels = torch.as_tensor(
                np.stack([prompts[i].labels for i in idx]), dtype=torch.int, device=dev
            )
        if has_box:
            b = predictor.transform.apply_boxes(np.stack([prompts[i].box for i in idx]), size)
            boxes = torch.as_tensor(b, dtype=torch.float, device=dev)
        if has_mask:
            mask_in = torch.as_tensor(
                np.stack(
                    [
                        np.asarray(prompts[i].mask_input, np.float32).reshape(
                            1, *np.shape(prompts[i].mask_input)[-2:]
                        )
                        for i in idx
                    ]
                ),
                dtype=torch.float,
                device=dev,
            )
        m, s, lr = predictor.predict_torch(
            coords, labels, boxes, mask_in, multimask_output=ambiguous
        )
        best = (
            s.argmax(dim=1)
            if ambiguous
            else torch.zeros(len(idx), dtype=torch.long, device=s.device)
        )
        rows = torch.arange(len(idx), device=s.device)
        m_sel = m[rows, best].cpu().numpy().astype(bool)
        s_sel = s[rows, best].float().cpu().numpy()
        lr_sel = lr[rows, best].float().cpu().numpy()
        for j, i in enumerate(idx):
            masks[i], scores[i], logits[i] = m_sel[j], s_sel[j], lr_sel[j][None]
    return np.stack(masks), scores, logits


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def segment_image(
    predictor: Any,
    image: np.ndarray,
    prompts: Sequence[Prompt | None],
    intensity: str = "auto",
    return_logits: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, list[np.ndarray | None]]:
    """Segment one 2D image ``(H, W)`` / ``(H, W, C)`` with one prompt per object.

    ``intensity``: see :func:`model_input` (``"none"`` for an image already in ``[0, 255]``).

    Returns ``masks (K, H, W)`` bool and ``scores (K,)`` (predicted IoU; ``nan`` for a ``None``
    prompt, whose mask is empty); with ``return_logits`` also the low-resolution logits
    ``(1, h, w)`` of each mask, to feed back as ``Prompt.mask_input`` for iterative clicks.
    The image encoder runs once, and not at all if every prompt is ``None``.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise DataError(f"expected a 2D image (H, W) or (H, W, C), got shape {image.shape}")
    h, w = int(image.shape[0]), int(image.shape[1])
    for p in prompts:
        if p is not None and not p.empty:  # an empty prompt gives an empty mask, like None
            p.validate((h, w))
    masks = np.zeros((len(prompts), h, w), dtype=bool)
    scores = np.full(len(prompts), np.nan, dtype=np.float32)
    logits: list[np.ndarray | None] = [None] * len(prompts)
    todo = [i for i, p in enumerate(prompts) if p is not None and not p.empty]
    if todo:
        predictor = as_predictor(predictor)
        predictor.set_image(model_input(image, False, intensity))
        m, s, lr = decode_prompts(predictor, [prompts[i] for i in todo])  # type: ignore[misc]
        for j, i in enumerate(todo):
            masks[i], scores[i], logits[i] = m[j], s[j], lr[j]
    if return_logits:
        return masks, scores, logits
    return masks, scores


def segment_volume(
    predictor: Any,
    volume: np.ndarray,
    slice_prompts: Mapping[int, Sequence[Prompt | None]],
    n_objects: int | None = None,
    intensity: str = "auto",
    depth: int | None = None,
    batch_size: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Segment a volume ``(D, H, W)`` / ``(C, D, H, W)`` slice by slice.

    Args:
        slice_prompts: ``{z: [prompt of object 0, prompt of object 1, ...]}``; slices that are
            missing (or whose prompts are all ``None``) are not encoded and stay empty.
        n_objects: number of objects K (default: the longest prompt list).
        intensity: see :func:`model_input`; one window for the whole volume.
        depth: encode chunks of ``depth`` slices together (:class:`ChunkEncoder`; for models
            with SD-Trans / MA-SAM 3D adapters, use the training chunk depth); None: 2D slices.
        batch_size: prompted slices per image-encoder pass (``SamPredictor.expect``; 2D slices).
    Returns:
        ``masks (K, D, H, W)`` bool and ``scores (K, D)`` (``nan`` where not prompted).
    """
    vol = np.asarray(volume)
    if vol.ndim not in (3, 4):
        raise DataError(f"expected a volume (D, H, W) or (C, D, H, W), got shape {vol.shape}")
    d, h, w = vol.shape[-3:]
    bad = [z for z in slice_prompts if not 0 <= int(z) < d]
    if bad:
        raise PromptError(f"slice index {bad[0]} is outside the volume's {d} slices (0..{d - 1})")
    k = (
        n_objects
        if n_objects is not None
        else max((len(v) for v in slice_prompts.values()), default=0)
    )
    x = model_input(vol, True, intensity) if slice_prompts else None  # one window per volume
    masks = np.zeros((k, d, h, w), dtype=bool)
    scores = np.full((k, d), np.nan, dtype=np.float32)
    predictor = as_predictor(predictor) if slice_prompts else predictor
    encoder: ChunkEncoder | None = None
    if depth is None and batch_size > 1 and hasattr(predictor, "expect"):
        todo_z = [
            int(z)
            for z in sorted(int(z) for z in slice_prompts)
            if any(p is not None and not p.empty for p in slice_prompts[z])
        ]
        predictor.expect([x[z] for z in todo_z], batch_size=batch_size)  # type: ignore[index]
    for z in sorted(int(z) for z in slice_prompts):
        prompts = list(slice_prompts[z])
        if len(prompts) > k:
            raise PromptError(f"slice {z} has {len(prompts)} prompts but n_objects={k}")
        prompts += [None] * (k - len(prompts))
        if depth is None:
            m, s = segment_image(predictor, x[z], prompts, intensity="none")  # type: ignore[index,misc]
        else:
            for p in prompts:
                if p is not None and not p.empty:
                    p.validate((h, w))
            todo = [i for i, p in enumerate(prompts) if p is not None and not p.empty]
            m = np.zeros((k, h, w), dtype=bool)
            s = np.full(k, np.nan, dtype=np.float32)
            if todo:
                if encoder is None:
                    encoder = ChunkEncoder(predictor, x, depth)
                encoder.set_slice(z)
                mm, ss, _ = decode_prompts(predictor, [prompts[i] for i in todo])  # type: ignore[misc]
                m[todo], s[todo] = mm, ss
        masks[:, z], scores[:, z] = m, s
    return masks, scores


# --------------------------------------------------------------------------- protocols


def simulate_prompt(protocol: str, mask: np.ndarray, rng: np.random.Generator) -> Prompt | None:
    """Simulate the prompt of ``protocol`` for the binary target ``mask (H, W)``.

    ``None`` if the target is empty (no prompt is given for an absent object, as in the paper's
    per-slice prompting). The simulation itself lives in :mod:`medsa.data.prompts`.
    """
    from medsa.data.prompts import get_protocol

    if protocol not in PROTOCOLS or protocol in ("everything", "auto"):
        choices = ", ".join(p for p in PROTOCOLS if p not in ("everything", "auto"))
        raise PromptError(f"unknown prompt protocol {protocol!r}; choose from {choices}")
    m = np.asarray(mask).astype(bool)
    if not m.any():
        return None
    return get_protocol(protocol)(m, rng)


def segment_with_protocol(
    model_or_predictor: Any,
    image: np.ndarray,
    target: np.ndarray,
    protocol: str,
    rng: np.random.Generator,
    intensity: str = "auto",
    depth: int | None = None,
) -> np.ndarray:
    """Simulate ``protocol``'s prompts from the ground truth ``target`` and segment.

    Args:
        image: 2D ``(H, W[, C])`` or a volume ``(D, H, W)`` / ``(C, D, H, W)`` (then ``target`` is
            ``(D, H, W)`` and every slice containing the target gets its own prompt, as in the
            paper; other slices stay empty).
        protocol: ``1pt``, ``3pt``, ``bbox0.5``, ``bbox0.75``, ``box`` or ``everything`` (the
            automatic mask that best overlaps the target).
    Returns:
        the predicted mask, ``target``'s shape, bool.
    """
    t = np.asarray(target, dtype=bool)
    img = np.asarray(image)
    predictor = as_predictor(model_or_predictor)
    if t.ndim == 2:
        if protocol == "everything":
            return best_overlap_mask(segment_everything(predictor, img, intensity), t)
        p = simulate_prompt(protocol, t, rng)
        if p is None:
            return np.zeros_like(t)
        return segment_image(predictor, img, [p], intensity=intensity)[0][0]  # type: ignore[index]
    if t.ndim != 3:
        raise DataError(f"target must be (H, W) or (D, H, W), got shape {t.shape}")
    if protocol == "everything":
        x = model_input(img, True, intensity)
        out = np.zeros_like(t)
        for z in np.flatnonzero(t.reshape(len(t), -1).any(1)):
            auto = segment_everything(predictor, x[z], intensity="none")
            out[z] = best_overlap_mask(auto, t[z])
        return out
    prompts = {
        int(z): [simulate_prompt(protocol, t[z], rng)]
        for z in np.flatnonzero(t.reshape(len(t), -1).any(1))
    }
    masks, _ = segment_volume(
        predictor, img, prompts, n_objects=1, intensity=intensity, depth=depth
    )
    return masks[0]


# --------------------------------------------------------------------------- everything


def segment_everything(
    model_or_predictor: Any,
    image: np.ndarray,
    intensity: str = "auto",
    **kwargs: Any,
) -> np.ndarray:
    """SAM's automatic mode on a 2D image: all masks ``(M, H, W)`` bool, largest first.

    ``intensity``: see :func:`model_input` (``"none"`` for an image already in ``[0, 255]``).

    Uses ``medsa.sam.automatic.AutomaticMaskGenerator`` (keyword arguments are passed on).
    """
    try:
        from medsa.sam import SamPredictor
        from medsa.sam.automatic import AutomaticMaskGenerator
    except ImportError as e:  # pragma: no cover - depends on the sam package state
        raise PromptError(
            "'everything' mode needs medsa.sam.automatic, which is not available"
        ) from e
    image = np.asarray(image)
    h, w = int(image.shape[0]), int(image.shape[1])
    # a SamPredictor is passed as is: its embedding cache makes the image encoder run once
    src = model_or_predictor
    if not isinstance(src, SamPredictor):
        src = getattr(src, "model", src)
    gen = AutomaticMaskGenerator(src, **kwargs)
    records = gen.generate(model_input(image, False, intensity))
    masks = [np.asarray(r["segmentation"], dtype=bool) for r in records]
    masks.sort(key=lambda m: -int(m.sum()))
    return np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)


def segment_auto(predictor: Any) -> np.ndarray:
    """Prompt-free multi-class prediction of MA-SAM's head on the predictor's current image.

    ``model.masam_decoder(embedding)`` gives logits ``(1, K, S, S)`` in the padded input frame (as
    in training); they are cropped to the resized image, resized to the original ``(H, W)`` like
    SAM's masks, and the argmax over the K classes (0 = background) is returned ``(H, W)`` int64.
    """
    model = predictor.model
    head = getattr(model, "masam_decoder", None)
    if head is None:
        raise PromptError("this model has no MA-SAM multi-class head; it needs prompts")
    logits = head(predictor.get_image_embedding()).float()
    logits = model.postprocess_masks(logits, predictor.input_size, predictor.original_size)
    return logits.argmax(1)[0].cpu().numpy().astype(np.int64)


def best_overlap_mask(candidates: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The candidate ``(M, H, W)`` with the highest IoU with ``target (H, W)`` (empty if none).

    Used to score "everything" mode against a class: an oracle choice, as SAM's zero-shot
    evaluations do, since automatic masks carry no class.
    """
    t = np.asarray(target, dtype=bool)
    if len(candidates) == 0 or not t.any():
        return np.zeros_like(t)
    c = np.asarray(candidates, dtype=bool)
    inter = (c & t).reshape(len(c), -1).sum(1)
    union = (c | t).reshape(len(c), -1).sum(1)
    return c[int(np.argmax(inter / np.maximum(union, 1)))].copy()


def iterate_clicks(
    predictor: Any,
    image: np.ndarray,
    target: np.ndarray,
    n_clicks: int,
    rng: np.random.Generator,
    first: Prompt | None = None,
    next_click: Callable[..., Any] | None = None,
    intensity: str = "auto",
) -> list[np.ndarray]:
    """Interactive simulation on a 2D image: the mask after 1..``n_clicks`` clicks.

    Click 1 is ``first`` (default: the "1pt" protocol); every further click is placed in the
    error region of the current prediction by ``medsa.data.prompts.next_click`` (positive in a
    missed region, negative in a false-positive region), and the previous low-resolution logits
    are fed back as ``mask_input``, as in SAM's interactive training/evaluation.
    Returns the ``n_clicks`` masks ``(H, W)``.
    """
    t = np.asarray(target, dtype=bool)
    if not t.any():
        return [np.zeros_like(t) for _ in range(n_clicks)]
    if next_click is None:
        from medsa.data.prompts import next_click as _nc

        next_click = _nc
    prompt = first if first is not None else simulate_prompt("1pt", t, rng)
    assert prompt is not None
    predictor = as_predictor(predictor)
    predictor.set_image(model_input(np.asarray(image), False, intensity))
    out: list[np.ndarray] = []
    for i in range(n_clicks):
        mask, _, logits = _decode_one(predictor, prompt)
        out.append(mask)
        if i == n_clicks - 1:
            break
        nc = next_click(mask, t, rng)
        if nc is None:  # prediction already perfect: later clicks change nothing
            out += [mask] * (n_clicks - 1 - i)
            break
        prompt = add_click(prompt, nc[0], nc[1], logits)
    return out


def add_click(prompt: Prompt, xy: Any, label: int, mask_input: np.ndarray | None) -> Prompt:
    """``prompt`` plus one click ``xy (2,)`` with ``label``, feeding back ``mask_input``."""
    return prompt.with_click(xy, label, mask_input)
