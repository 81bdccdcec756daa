"""One case of ``medsa evaluate``: prompts simulated from the ground truth, predictions per
protocol / seed / class (2D images, every prompted slice of a volume, key-slice propagation, NoC
clicks) and their metrics on the original grid. :mod:`medsa.engine.eval_pipeline` schedules
these functions (inline, or read-ahead and metrics in worker processes); the loop and the
outputs are in :mod:`medsa.engine.evaluate`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medsa.engine.inference import (
    ChunkEncoder,
    add_click,
    best_overlap_mask,
    decode_prompts,
    model_input,
    segment_auto,
    segment_everything,
)
from medsa.engine.metrics import compute_metrics
from medsa.engine.volume_protocols import KEYSLICE_PROTOCOLS, keyslice_predictions
from medsa.errors import ConfigError, DataError, PromptError

if TYPE_CHECKING:
    from medsa.engine.evaluate import EvalConfig


def _rng(seed: int, case_id: str, class_name: str, protocol: str) -> np.random.Generator:
    """Independent, reproducible stream per (seed, case, class, protocol) -- stable across runs
    and independent of evaluation order or which other protocols are run."""
    key = [
        seed,
        zlib.crc32(case_id.encode()),
        zlib.crc32(class_name.encode()),
        zlib.crc32(protocol.encode()),
    ]
    return np.random.default_rng(key)


def _spacing(img: Any, ndim: int) -> tuple[float, ...]:
    sp = getattr(img, "spacing", None)
    if sp is None:
        return (1.0,) * ndim
    sp = tuple(float(s) for s in sp)
    return sp[-ndim:] if len(sp) >= ndim else (1.0,) * ndim


def _evaluate_case(
    predictor: Any, ds: Any, case: Any, classes: list[str], cfg: EvalConfig, keep: bool
) -> tuple[list[dict[str, Any]], dict[str, list[float]], list[dict[str, Any]], list[str]]:
    """One case, sequentially: read (:func:`_prepare_case`), predict (:func:`_predict_case`),
    score (:func:`_score_case`). ``medsa.engine.eval_pipeline`` runs the same three steps
    overlapped (reading and scoring in worker processes, encoder passes batched)."""
    prep = _prepare_case(ds, case, classes, cfg)
    preds, noc_masks, failures = _predict_case(predictor, prep, classes, cfg, ds.classes)
    rows, noc, store = _score_case(prep, preds, noc_masks, classes, cfg, keep)
    return rows, noc, store, failures


@dataclass
class _Prepared:
    """A case read and preprocessed (what a prefetch worker hands to the model loop)."""

    case_id: str
    x: np.ndarray  # (H, W, 3) / (D, H, W, 3) float32 in [0, 255]
    gts: dict[str, np.ndarray]  # class -> bool (H, W) / (D, H, W)
    spacing: tuple[float, ...]
    is_3d: bool
    # the targets on the case's own grid (== gts unless EvalConfig.resize_to): metrics use these
    orig_gts: dict[str, np.ndarray]


def _prepare_case(ds: Any, case: Any, classes: list[str], cfg: EvalConfig) -> _Prepared:
    img, targets = ds.load_case(case)
    if hasattr(ds, "layout") and hasattr(img, "spacing"):
        from medsa.data.check import label_geometry_errors

        # a label whose spacing differs from its image scores HD95 / NSD in the wrong mm (and
        # check-data calls it an error): refuse instead of reporting numbers
        bad = label_geometry_errors(ds, case, img)
        if bad:
            raise DataError(f"case {case.id!r}: {bad[0]} (see `medsa check-data {ds.root}`)")
    is_3d = bool(getattr(img, "is_3d", getattr(ds, "dim", 2) == 3))
    # (H, W, 3) / (D, H, W, 3) float in [0, 255], scaled as the training datasets do
    try:
        x = model_input(img.array, is_3d, cfg.intensity)
    except DataError as e:  # e.g. NaN / inf values: name the file
        where = ", ".join(str(p) for p in getattr(case, "images", ())) or str(case.id)
        raise DataError(f"case {case.id!r} ({where}): {e}") from None
    gts = {}
    for c in classes:
        if c not in targets:
            raise DataError(f"case {case.id!r} has no label for class {c!r}")
        g = np.asarray(targets[c], dtype=bool)
        gts[c] = g if is_3d else g.reshape(g.shape[-2:])
    ref = next(iter(gts.values()))
    spatial = x.shape[:-1]
    if ref.shape != tuple(spatial):
        raise DataError(
            f"case {case.id!r}: label shape {ref.shape} != image shape {tuple(spatial)}"
        )
    orig_gts = gts  # metrics are computed against these, on the case's own grid
    if cfg.resize_to is not None:  # the model's grid, as in training (data.resize_to)
        x, gts = _resize_case(x, gts, cfg.resize_to)
    return _Prepared(case.id, x, gts, _spacing(img, ref.ndim), is_3d, orig_gts)


def _encoded_slices(prep: _Prepared, cfg: EvalConfig) -> list[int | None]:
    """The slices :func:`_predict_case` sets as image (``[None]`` for 2D), in order."""
    if not prep.is_3d:
        return [None]
    if "auto" in cfg.protocols:
        return list(range(prep.x.shape[0]))
    any_t = np.zeros(prep.x.shape[0], dtype=bool)
    for g in prep.gts.values():
        any_t |= g.reshape(len(g), -1).any(1)
    return [int(z) for z in np.flatnonzero(any_t)]


def _combos(cfg: EvalConfig, classes: list[str]) -> list[tuple[str, int, str]]:
    return [(p, s, c) for p in cfg.protocols for s in cfg.seeds for c in classes]


def _predict_case(
    predictor: Any,
    prep: _Prepared,
    classes: list[str],
    cfg: EvalConfig,
    class_values: Any,
) -> tuple[dict[Any, np.ndarray], dict[str, list[np.ndarray]], list[str]]:
    """Run the model on one prepared case: predictions per (protocol, seed, class), the NoC
    masks per class, and the prompts that could not be simulated."""
    from medsa.data.prompts import get_protocol, next_click

    x, gts, is_3d, case_id = prep.x, prep.gts, prep.is_3d, prep.case_id
    ref = next(iter(gts.values()))
    slices = range(x.shape[0]) if is_3d else [None]
    encoder = ChunkEncoder(predictor, x, cfg.depth) if (is_3d and cfg.depth) else None
    combos = _combos(cfg, classes)
    preds = {k: np.zeros(ref.shape, dtype=bool) for k in combos}
    rngs = {k: _rng(k[1], case_id, k[2], k[0]) for k in combos}
    prop = _propagator(predictor, x, is_3d, cfg, gts)  # key-slice protocols (volume_protocols.py)
    encoder = None if prop is not None else encoder
    per_slice = ("everything", "auto", *KEYSLICE_PROTOCOLS)
    protocol_fns = {p: get_protocol(p) for p in cfg.protocols if p not in per_slice}
    model = getattr(predictor, "model", None)
    if "auto" in cfg.protocols and getattr(model, "masam_decoder", None) is None:
        raise ConfigError(
            "protocol 'auto' needs a model with MA-SAM's multi-class head "
            "(an adapter trained with method masam and num_classes)"
        )
    noc_masks = {
        c: [np.zeros(ref.shape, dtype=bool) for _ in range(cfg.noc_clicks)] for c in classes
    }
    noc_rngs = {c: _rng(cfg.seeds[0], case_id, c, "noc") for c in classes}

    prompted = [p for p in cfg.protocols if p not in per_slice]
    failures: list[str] = []
    run_noc = cfg.noc_clicks > 0 and bool(prompted)
    class_ids = {c: int(class_values[c]) for c in classes}
    for z in slices:
        gt2 = {c: (g[z] if z is not None else g) for c, g in gts.items()}
        has_target = any(m.any() for m in gt2.values())
        # without a target a slice gets no prompt (prediction stays empty); only the
        # prompt-free "auto" head has to look at every slice
        if not has_target and "auto" not in cfg.protocols:
            continue
        xz = x[z] if z is not None else x
        if prop is not None:
            prop.activate(z)  # its (batched, cached) embedding also serves the propagation
        elif encoder is not None:
            encoder.set_slice(z)  # depth-aware embedding of the chunk around z
        else:
            predictor.set_image(xz)
        if "auto" in cfg.protocols:
            lab = segment_auto(predictor)
            for combo in combos:
                if combo[0] == "auto":
                    _put(preds[combo], z, lab == class_ids[combo[2]])
        todo, prompts, everything = [], [], []
        for combo in combos:
            prot, seed, cls = combo
            m = gt2[cls]
            if not m.any() or prot == "auto" or prot in KEYSLICE_PROTOCOLS:
                continue
            if prot == "everything":
                everything.append(combo)
            else:
                try:
                    prompt = protocol_fns[prot](m, rngs[combo])
                except PromptError as e:
                    # e.g. no box of the requested IoU fits a tiny object at the border: this
                    # slice gets no prompt (empty prediction); reported, not fatal
                    where = f" slice {z}" if z is not None else ""
                    failures.append(f"{case_id} / {cls} / {prot} / seed {seed}{where}: {e}")
                    continue
                todo.append(combo)
                prompts.append(prompt)
        if prompts:
            out, _, _ = decode_prompts(predictor, prompts)
            for combo, mk in zip(todo, out, strict=True):
                _put(preds[combo], z, mk)
        if run_noc and has_target:
            present = [c for c, m in gt2.items() if m.any()]
            series = _click_series(
                predictor,
                [gt2[c] for c in present],
                cfg.noc_clicks,
                [noc_rngs[c] for c in present],
                get_protocol("1pt"),
                next_click,
            )
            for cls, masks in zip(present, series, strict=True):
                for k, mk in enumerate(masks):
                    _put(noc_masks[cls][k], z, mk)
        if everything:  # last: the generator re-sets the (2D) image embedding
            # deterministic: one run serves every seed and class
            auto = segment_everything(predictor, xz, intensity="none", **cfg.everything)
            for combo in everything:
                _put(preds[combo], z, best_overlap_mask(auto, gt2[combo[2]]))
    if prop is not None:
        preds.update(keyslice_predictions(prop, combos, gts, rngs))
        prop.close()

    return preds, noc_masks, failures


def _score_case(
    prep: _Prepared,
    preds: dict[Any, np.ndarray],
    noc_masks: dict[str, list[np.ndarray]],
    classes: list[str],
    cfg: EvalConfig,
    keep: bool,
) -> tuple[list[dict[str, Any]], dict[str, list[float]], list[dict[str, Any]]]:
    """Metric rows, NoC Dice curve and worst-case candidates of one case (no model: this runs
    in a worker process in the pipelined evaluation)."""
    gts, is_3d, case_id, spacing = prep.gts, prep.is_3d, prep.case_id, prep.spacing
    orig_gts = prep.orig_gts
    x = prep.x
    rows = []
    for prot, seed, cls in _combos(cfg, classes):
        pred = _to_grid(preds[(prot, seed, cls)], orig_gts[cls].shape)
        met = compute_metrics(pred, orig_gts[cls], spacing, cfg.metrics)
        rows.append({"case_id": case_id, "class": cls, "protocol": prot, "seed": int(seed), **met})
    store = []
    if keep:  # images only for this case's candidates for the worst-case figure
        cands = [{"dice": r["dice"], "key": (case_id, r["class"]), "row": r} for r in rows]
        for c in _worst_distinct(cands, cfg.worst_k):
            r = c["row"]
            g = gts[r["class"]]
            pred = preds[(r["protocol"], r["seed"], r["class"])]
            z = int(np.argmax(g.reshape(g.shape[0], -1).sum(1))) if is_3d else None
            title = f"{case_id} {r['class']} {r['protocol']} s{r['seed']}"
            title += (f" z={z}" if z is not None else "") + f"\nDice {r['dice']:.2f}"
            store.append(
                {
                    "dice": r["dice"],
                    "key": c["key"],
                    "image": np.clip(x[z] if z is not None else x, 0, 255).astype(np.uint8),
                    "gt": g[z] if z is not None else g,
                    "pred": pred[z] if z is not None else pred,
                    "title": title,
                }
            )
    noc: dict[str, list[float]] = {}
    prompted = [p for p in cfg.protocols if p not in ("everything", "auto", *KEYSLICE_PROTOCOLS)]
    if cfg.noc_clicks > 0 and prompted:
        from medsa.engine.metrics import dice

        noc = {
            c: [dice(_to_grid(mk, orig_gts[c].shape), orig_gts[c]) for mk in noc_masks[c]]
            for c in classes
            if gts[c].any()
        }
    return rows, noc, store


def _resize_case(
    x: np.ndarray, gts: dict[str, np.ndarray], resize_to: Sequence[int]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Model input ``(H, W, 3)`` / ``(D, H, W, 3)`` (linear) and binary targets (nearest) on the
    ``resize_to`` grid."""
    from medsa.data.preprocess import resize_spatial, resized_shape

    shape = resized_shape(x.shape[:-1], resize_to)
    xr = resize_spatial(x, shape, kind="image", channels_last=True)
    return xr, {c: resize_spatial(g, shape, kind="label") for c, g in gts.items()}


def _to_grid(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A prediction on the model grid resampled (nearest) to the case's own grid ``shape``."""
    from medsa.data.preprocess import resize_spatial

    return mask if mask.shape == shape else resize_spatial(mask, shape, kind="label")


def _propagator(predictor: Any, x: np.ndarray, is_3d: bool, cfg: EvalConfig, gts: Any) -> Any:
    """A VolumePropagator of the case when key-slice protocols are asked (else None)."""
    if not any(p in KEYSLICE_PROTOCOLS for p in cfg.protocols):
        return None
    if not is_3d:
        raise ConfigError("the keyslice-* protocols need 3D data (volumes)")
    from medsa.engine.propagate import VolumePropagator

    prop = VolumePropagator(predictor, x, depth=cfg.depth, model_ready=True)
    prop.embed(np.flatnonzero(np.any([g.reshape(len(g), -1).any(1) for g in gts.values()], 0)))
    return prop


def _put(volume: np.ndarray, z: int | None, mask: np.ndarray) -> None:
    """Write a 2D prediction into ``volume`` (slice ``z``) or over a 2D array (``z`` None)."""
    if z is None:
        volume[...] = mask
    else:
        volume[z] = mask


def _click_series(
    predictor: Any,
    targets: Sequence[np.ndarray],
    n: int,
    rngs: Sequence[np.random.Generator],
    first_fn: Any,
    next_click: Any,
) -> list[list[np.ndarray]]:
    """For each target ``(H, W)``: the masks after 1..n clicks on the image already set in
    ``predictor`` (as :func:`medsa.engine.inference.iterate_clicks`, previous logits fed back).

    Targets are independent objects, so click k of all of them is decoded as one batch.
    """
    prompts = [first_fn(t, r) for t, r in zip(targets, rngs, strict=True)]
    out: list[list[np.ndarray]] = [[] for _ in targets]
    active = list(range(len(targets)))
    for i in range(n):
        if not active:
            break
        masks, _, logits = decode_prompts(predictor, [prompts[j] for j in active])
        still = []
        for mask, lg, j in zip(masks, logits, active, strict=True):
            out[j].append(mask)
            if i == n - 1:
                continue
            nc = next_click(mask, targets[j], rngs[j])
            if nc is None:  # already perfect: the curve stays flat
                out[j] += [mask] * (n - 1 - i)
                continue
            prompts[j] = add_click(prompts[j], nc[0], nc[1], lg)
            still.append(j)
        active = still
    return out


def _worst_distinct(items: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The ``k`` lowest-Dice items, at most one per (case, class) (its worst protocol / seed)."""
    out: list[dict[str, Any]] = []
    seen: set[Any] = set()
    for it in sorted(items, key=lambda s: s["dice"]):
        if it["key"] not in seen:
            seen.add(it["key"])
            out.append(it)
        if len(out) == k:
            break
    return out
