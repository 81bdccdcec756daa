"""``medsa evaluate``: Dice / IoU / HD95 / NSD under the papers' prompt protocols.

For every case, class, protocol and seed a prompt is simulated from the ground truth
(:mod:`medsa.data.prompts`), the model predicts, and the metrics of :mod:`medsa.engine.metrics`
are computed -- on the whole volume for 3D data, where every slice that contains the class gets
its own prompt and the others stay empty (Med-SA prompts each slice). The image encoder runs once
per image / slice and is shared by all protocols, seeds and classes.

Outputs in ``--out``: ``metrics.csv`` (one row per case x class x protocol x seed),
``summary.json``, ``results.md`` (paper-style table), ``dice_per_class.png``, ``noc.png``
(Dice vs number of clicks) and ``worst_cases.png``. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsa.engine.inference import (
    PROTOCOLS,
    ChunkEncoder,
    add_click,
    as_predictor,
    best_overlap_mask,
    decode_prompts,
    model_input,
    segment_auto,
    segment_everything,
)
from medsa.engine.metrics import MetricConfig, compute_metrics
from medsa.engine.model_loading import RANDOM_WEIGHTS_HELP, load_model
from medsa.engine.outputs import OutputError, check_writable_dir, describe_os_error, refuse_existing
from medsa.engine.volume_protocols import KEYSLICE_PROTOCOLS, keyslice_predictions
from medsa.errors import ConfigError, DataError, PromptError

HELP = "Dice / IoU / HD95 / NSD of a model under the papers' prompt protocols"

__all__ = [
    "HELP",
    "EvalConfig",
    "EvalResults",
    "evaluate_model",
    "add_arguments",
    "load_model",
    "main",
]

DEFAULT_PROTOCOLS: tuple[str, ...] = ("1pt", "3pt", "bbox0.5", "bbox0.75")

#: what ``medsa evaluate`` writes into ``--out`` (existing ones need ``--overwrite``)
OUTPUT_FILES = (
    "metrics.csv",
    "summary.json",
    "results.md",
    "dice_per_class.png",
    "noc.png",
    "worst_cases.png",
)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings.

    Attributes:
        protocols: prompt protocols (``1pt``, ``3pt``, ``bbox0.5``, ``bbox0.75``, ``everything``).
        seeds: prompt-simulation seeds; results are ``mean ± std`` over seeds (paper Table 10).
        classes: class names to evaluate (None: all classes of the dataset).
        max_cases: evaluate only the first N cases (None: all).
        metrics: metric settings (NSD tolerance, HD95 empty policy).
        noc_clicks: clicks of the NoC curve (iterative clicks, first seed); 0 disables it.
        worst_k: number of worst cases drawn in ``worst_cases.png`` (0 disables).
        intensity: intensity scaling (``medsa.data.preprocess.scale_intensity``: ``auto``,
            ``none``, ``percentile``, ``ct:<preset>``, ``ct:<level>,<width>``); must match
            training.
        depth: 3D only: encode chunks of ``depth`` consecutive slices together
            (``image_encoder(chunk, depth=depth)``), needed for models with SD-Trans or MA-SAM
            3D adapters (use the training chunk depth); None encodes every slice alone (2D).
        resize_to: the model grid, ``(H, W)`` (2D images; volumes in-plane) or ``(D, H, W)``
            (volumes), as training's ``data.resize_to``: image linear, labels nearest; prompts
            are simulated there and the predictions resampled back (nearest), so metrics are
            computed on each case's original grid with its own spacing.
        everything: options of ``medsa.sam.automatic.AutomaticMaskConfig`` for the
            "everything" protocol (default: SAM's settings, a 32 x 32 point grid, as
            docs/data.md and the paper's "following the vanilla SAM setting"; pass e.g.
            ``{"points_per_side": 16}`` for a 4x quicker, coarser run).
    """

    protocols: tuple[str, ...] = DEFAULT_PROTOCOLS
    seeds: tuple[int, ...] = (0,)
    classes: tuple[str, ...] | None = None
    max_cases: int | None = None
    metrics: MetricConfig = field(default_factory=MetricConfig)
    noc_clicks: int = 5
    worst_k: int = 4
    intensity: str = "auto"
    depth: int | None = None
    resize_to: tuple[int, ...] | None = None
    everything: dict[str, Any] = field(default_factory=lambda: {"points_per_side": 32})

    def __post_init__(self) -> None:
        if not self.protocols:
            raise ConfigError("at least one protocol is needed")
        known = PROTOCOLS + KEYSLICE_PROTOCOLS
        bad = [p for p in self.protocols if p not in known]
        if bad:
            raise ConfigError(f"unknown protocol {bad[0]!r}; choose from {', '.join(known)}")
        if len(set(self.protocols)) != len(self.protocols):
            raise ConfigError(f"protocols are repeated: {', '.join(self.protocols)}")
        if not self.seeds:
            raise ConfigError("at least one seed is needed")
        if self.max_cases is not None and self.max_cases < 1:
            raise ConfigError(f"max_cases must be >= 1, got {self.max_cases}")
        if self.depth is not None and self.depth < 1:
            raise ConfigError(f"depth must be >= 1, got {self.depth}")
        if self.resize_to is not None:
            from medsa.data.preprocess import check_resize_to

            object.__setattr__(self, "resize_to", check_resize_to(self.resize_to))
        if self.noc_clicks < 0 or self.worst_k < 0:
            raise ConfigError("noc_clicks and worst_k must be >= 0")


@dataclass
class EvalResults:
    """Result of :func:`evaluate_model`.

    Attributes:
        rows: one dict per case x class x protocol x seed with ``CSV_FIELDS`` keys.
        summary: :func:`medsa.engine.report.summarize` of the rows.
        noc: ``{class: [mean Dice after 1..K clicks]}`` (empty if disabled).
        worst: the worst (lowest Dice) cases, ``(case_id, class, protocol, seed, dice)``.
        config: the :class:`EvalConfig` used.
        seconds: wall time.
    """

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    noc: dict[str, list[float]]
    worst: list[tuple[str, str, str, int, float]]
    config: EvalConfig
    seconds: float = 0.0
    #: image / gt / pred slices of the worst cases (``keep_worst=True``), for the overlay plot
    worst_items: list[dict[str, Any]] = field(default_factory=list, repr=False)
    #: prompts that could not be simulated (that slice got no prompt), one message each
    prompt_failures: list[str] = field(default_factory=list)

    def mean_dice(self, protocol: str | None = None) -> float:
        """Average Dice over classes (and seeds) for ``protocol`` (default: the first one)."""
        prot = protocol or next(iter(self.summary))
        return float(self.summary[prot]["avg"]["dice"]["mean"])


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


def evaluate_model(
    model: Any,
    dataset: Any,
    protocols: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    case_ids: Iterable[str] | None = None,
    config: EvalConfig | None = None,
    progress: bool = False,
    keep_worst: bool = False,
    workers: int = 0,
    batch_size: int = 1,
    distributed: bool = False,
) -> EvalResults:
    """Evaluate ``model`` (a :class:`medsa.sam.Sam` or a ``SamPredictor``) on ``dataset``.

    Args:
        dataset: a ``medsa.data.datasets.DatasetInfo`` (``load_dataset``) or a dataset folder.
        protocols, seeds: override ``config.protocols`` / ``config.seeds``.
        case_ids: restrict to these cases (e.g. a validation fold); default all.
        progress: print one line per case.
        keep_worst: keep image / prediction of the worst cases for :func:`plot_overlays`.
        workers: processes that read cases ahead and compute metrics (0: inline).
        batch_size: images / slices per image-encoder pass.
        distributed: shard the cases over the ``torchrun`` ranks (every rank returns the
            results of all cases). These three change speed, never results
            (:mod:`medsa.engine.eval_pipeline`).
    Returns:
        :class:`EvalResults` (rows per case x class x protocol x seed, summary, NoC curve).
    """
    from medsa.engine.report import summarize

    cfg = config or EvalConfig()
    if protocols is not None or seeds is not None:
        cfg = dataclasses.replace(
            cfg,
            protocols=tuple(protocols or cfg.protocols),
            seeds=tuple(int(s) for s in (seeds or cfg.seeds)),
        )
    ds = _load_dataset(dataset)
    classes = _select_classes(ds, cfg.classes)
    cases = list(ds.cases)
    if case_ids is not None:
        wanted = list(dict.fromkeys(str(c) for c in case_ids))
        by_id = {c.id: c for c in cases}
        missing = [c for c in wanted if c not in by_id]
        if missing:
            raise DataError(f"case {missing[0]!r} is not in the dataset {ds.root}")
        cases = [by_id[c] for c in wanted]
    if cfg.max_cases is not None:
        cases = cases[: cfg.max_cases]
    if not cases:
        raise DataError("no cases to evaluate")

    predictor = as_predictor(model)
    model_obj = getattr(predictor, "model", model)
    was_training = bool(getattr(model_obj, "training", False))
    if hasattr(model_obj, "eval"):
        model_obj.eval()
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    noc_sum: dict[str, np.ndarray] = {}
    noc_n: dict[str, int] = {}
    worst_store: list[dict[str, Any]] = []
    failures: list[str] = []
    try:
        import torch

        from medsa.engine.eval_pipeline import run_cases

        with torch.inference_mode():
            for _, _, (case_rows, noc, store, fails) in run_cases(
                predictor, ds, cases, classes, cfg, keep_worst,
                workers=workers, batch_size=batch_size, distributed=distributed, progress=progress,
            ):  # fmt: skip
                rows += case_rows
                failures += fails
                for cls, curve in noc.items():
                    noc_sum[cls] = noc_sum.get(cls, 0) + np.asarray(curve)
                    noc_n[cls] = noc_n.get(cls, 0) + 1
                worst_store += store
                if keep_worst:  # keep memory bounded: only the current worst candidates
                    worst_store = _worst_distinct(worst_store, cfg.worst_k)
    finally:
        if was_training and hasattr(model_obj, "train"):
            model_obj.train()
    rows_sorted = sorted(rows, key=lambda r: r["dice"])
    worst = [
        (r["case_id"], r["class"], r["protocol"], r["seed"], r["dice"])
        for r in rows_sorted[: cfg.worst_k]
    ]
    res = EvalResults(
        rows=rows,
        summary=summarize(rows),
        noc={c: (noc_sum[c] / noc_n[c]).tolist() for c in noc_sum},
        worst=worst,
        config=cfg,
        seconds=time.perf_counter() - t0,
        worst_items=worst_store,
        prompt_failures=failures,
    )
    return res


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


def _load_dataset(dataset: Any) -> Any:
    if isinstance(dataset, (str, Path)):
        from medsa.data.datasets import load_dataset

        return load_dataset(dataset)
    return dataset


def _select_classes(ds: Any, wanted: Sequence[str] | None) -> list[str]:
    names = list(ds.classes)
    if not wanted:
        return names
    bad = [c for c in wanted if c not in names]
    if bad:
        raise ConfigError(f"unknown class {bad[0]!r}; the dataset has {', '.join(names)}")
    return list(wanted)


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


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", required=True, type=Path, help="dataset folder (any layout medsa.data supports)"
    )
    p.add_argument(
        "--split",
        type=Path,
        help="splits JSON (from training / make_splits) or a text file of case ids",
    )
    p.add_argument(
        "--fold", type=int, help="fold of --split whose --subset cases are evaluated (default 0)"
    )
    p.add_argument(
        "--subset",
        choices=("val", "test", "train"),
        help="which list of the --split fold to evaluate (default val; needs --split)",
    )
    p.add_argument(
        "--backbone",
        help="SAM backbone: lite_medsam, vit_b, vit_l, vit_h, vit_tiny "
        "(default: the adapter's backbone, else lite_medsam)",
    )
    p.add_argument("--checkpoint", type=Path, help="backbone weights (default: the backbone's own)")
    p.add_argument("--random-weights", action="store_true", help=RANDOM_WEIGHTS_HELP)
    p.add_argument(
        "--adapter", type=Path, help="adapter file saved by 'medsa train' (.safetensors)"
    )
    p.add_argument(
        "--protocols",
        default=",".join(DEFAULT_PROTOCOLS),
        help="comma-separated: 1pt,3pt,bbox0.5,bbox0.75,box,everything (every target slice "
        "prompted), keyslice-box,keyslice-3pt (3D: one key slice, propagated; docs/evaluation.md) "
        "(default: the first four)",
    )
    p.add_argument(
        "--seeds", default="0", help="comma-separated prompt seeds, e.g. 0,1,2,3,4 (mean ± std)"
    )
    p.add_argument("--classes", help="comma-separated class names (default: all)")
    p.add_argument("--max-cases", type=int, help="evaluate only the first N cases")
    p.add_argument(
        "--intensity",
        help="intensity scaling: auto (uint8 kept, else 0.5-99.5 percentiles), none, percentile, "
        "ct:<preset> (e.g. ct:abdomen), ct:<level>,<width> (default: the adapter's, else auto)",
    )
    p.add_argument(
        "--depth",
        type=int,
        help="3D: encode chunks of N slices together (SD-Trans / MA-SAM 3D adapters); default: "
        "the adapter's training depth, else every slice alone",
    )
    p.add_argument(
        "--resize-to",
        metavar="D,H,W|H,W",
        help="run the model on this grid (training's data.resize_to); metrics stay on each "
        "case's own grid; default: the adapter's setting, else no resize",
    )
    p.add_argument(
        "--nsd-tolerance", type=float, default=2.0, help="NSD tolerance in mm (default 2)"
    )
    p.add_argument(
        "--hd-empty",
        choices=("nan", "diagonal"),
        default="nan",
        help="HD95 when exactly one mask is empty (default nan = skipped in means)",
    )
    p.add_argument(
        "--noc-clicks", type=int, default=5, help="clicks of the Dice-vs-clicks curve (0: off)"
    )
    p.add_argument(
        "--worst", type=int, default=4, help="worst cases drawn in worst_cases.png (0: off)"
    )
    p.add_argument("--name", help="method name in the table (default: backbone [+ adapter])")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace results already in --out (without it the command refuses before any work)",
    )
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N or auto (default: CUDA if available)"
    )
    p.add_argument("--quiet", action="store_true", help="no per-case progress lines")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes that read the next cases and compute metrics while the model runs "
        "(default 0: all in this process; use it where cores are idle, e.g. with a GPU). "
        "Results do not depend on it",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="images / slices per image-encoder pass (default 4). Results do not depend on it. "
        "Under torchrun every process evaluates its share of the cases; rank 0 writes the report",
    )


def _csv_list(s: str | None, what: str) -> list[str]:
    if s is None:
        return []
    items = [x.strip() for x in s.split(",") if x.strip()]
    if not items:
        raise ConfigError(f"--{what} is empty")
    return items


def _case_ids_from_split(path: Path, fold: int | None, ds: Any, subset: str = "val") -> list[str]:
    if not path.exists():
        raise DataError(f"split file {path} does not exist")
    if path.suffix.lower() == ".json":
        from medsa.data.datasets import load_splits

        splits = load_splits(path, known_ids=ds.case_ids)  # list of folds
        f = 0 if fold is None else fold
        if not 0 <= f < len(splits):
            raise ConfigError(f"--fold {f} is out of range: {path} has {len(splits)} folds")
        if subset not in splits[f]:
            raise ConfigError(f"{path}: fold {f} has no {subset!r} list ({', '.join(splits[f])})")
        return list(splits[f][subset])
    if fold is not None:
        raise ConfigError("--fold needs a JSON splits file")
    ids = [
        ln.strip()
        for ln in path.read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    unknown = [i for i in ids if i not in set(ds.case_ids)]
    if unknown:
        raise DataError(f"{path}: case {unknown[0]!r} is not in the dataset")
    return ids


def main(args: argparse.Namespace) -> int:
    from medsa.engine import report

    protocols = tuple(_csv_list(args.protocols, "protocols"))
    try:
        seeds = tuple(int(s) for s in _csv_list(args.seeds, "seeds"))
    except ValueError as e:
        raise ConfigError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from e
    classes = tuple(_csv_list(args.classes, "classes")) or None
    from medsa.engine.model_loading import build_inference_model, resolve_inference

    # the adapter's recorded depth / resize / intensity unless given (contradictions: error)
    settings = resolve_inference(
        args.adapter,
        backbone=args.backbone,
        checkpoint=args.checkpoint,
        depth=args.depth,
        resize_to=args.resize_to,
        intensity=args.intensity,
    )
    cfg = EvalConfig(
        protocols=protocols,
        seeds=seeds,
        classes=classes,
        max_cases=args.max_cases,
        metrics=MetricConfig(nsd_tolerance_mm=args.nsd_tolerance, hd_one_empty=args.hd_empty),
        noc_clicks=args.noc_clicks,
        worst_k=args.worst,
        intensity=settings.intensity,
        depth=settings.depth,
        resize_to=settings.resize_to,
    )
    if not args.data.exists():
        raise DataError(f"dataset folder {args.data} does not exist")
    out: Path = args.out
    from medsa.data.datasets import load_dataset

    ds = load_dataset(args.data)
    if settings.classes and ds.layout == "imagesTr" and not ds.label_values_declared:
        # no dataset.json: name the label values as training did (e.g. ACDC {RV: 1, MYO: 2, LV: 3})
        ds = load_dataset(args.data, classes=settings.classes)
    if args.fold is not None and args.split is None:
        raise ConfigError("--fold needs --split FILE")
    if args.subset is not None and args.split is None:
        # without a split there are no subsets: every case would be scored
        raise ConfigError(f"--subset {args.subset} needs --split FILE (the splits JSON)")
    subset = args.subset or "val"
    case_ids = _case_ids_from_split(args.split, args.fold, ds, subset) if args.split else None
    from medsa.engine.eval_pipeline import check_run_args, distributed_run
    from medsa.engine.perf import resolve_device

    check_run_args(args.workers, args.batch_size)
    # before the model is loaded and anything is computed
    check_writable_dir(out, "--out")
    refuse_existing([out / name for name in OUTPUT_FILES], "--out", args.overwrite)
    with distributed_run(resolve_device(args.device)) as dist_info:  # torchrun: this rank's share
        model = build_inference_model(
            settings, dist_info.device, random_weights=args.random_weights
        )
        res = evaluate_model(
            model,
            ds,
            case_ids=case_ids,
            config=cfg,
            progress=not args.quiet,
            keep_worst=cfg.worst_k > 0,
            workers=args.workers,
            batch_size=args.batch_size,
            distributed=dist_info.distributed,
        )
    if not dist_info.is_main:  # every rank has all rows; rank 0 alone writes the report
        return 0
    backbone = getattr(model, "name", None) or settings.backbone
    method = args.name or (backbone + (f" + {args.adapter.stem}" if args.adapter else ""))
    print(report.markdown_table(res.summary, method, len(cfg.seeds)))  # also if writing fails
    try:
        written = write_outputs(res, out, method)
    except OSError as e:
        name = Path(e.filename).name if getattr(e, "filename", None) else "the results"
        raise OutputError(
            f"--out {out}: cannot write {name}: {describe_os_error(e)}; the table above is all "
            "that was kept"
        ) from None
    print(
        f"{len(res.rows)} rows in {res.seconds:.1f} s; wrote " + ", ".join(p.name for p in written)
    )
    if res.prompt_failures:
        import sys

        print(
            f"warning: {len(res.prompt_failures)} prompt(s) could not be simulated; those slices "
            f"got no prompt (listed in summary.json), e.g. {res.prompt_failures[0]}",
            file=sys.stderr,
        )
    return 0


def write_outputs(res: EvalResults, out: Path, method: str) -> list[Path]:
    """Write metrics.csv, summary.json, results.md and the PNG plots into ``out``."""
    from medsa.engine import report

    out.mkdir(parents=True, exist_ok=True)
    cfg = res.config
    written = [report.write_csv(res.rows, out / "metrics.csv")]
    written.append(
        report.write_json(
            {
                "method": method,
                "config": {**asdict(cfg)},
                "n_cases": len({r["case_id"] for r in res.rows}),
                "seconds": res.seconds,
                "summary": res.summary,
                "noc": res.noc,
                "prompt_failures": res.prompt_failures,
                "worst": [
                    dict(zip(("case_id", "class", "protocol", "seed", "dice"), w, strict=True))
                    for w in res.worst
                ],
            },
            out / "summary.json",
        )
    )
    md = out / "results.md"
    md.write_text(
        f"# {method}\n\nDice (%) per class, mean over cases"
        + (f"; mean ± std over {len(cfg.seeds)} seeds" if len(cfg.seeds) > 1 else "")
        + "; HD95 in mm.\n\n"
        + report.markdown_table(res.summary, method, len(cfg.seeds)),
        encoding="utf-8",
    )
    written.append(md)
    written.append(report.plot_class_dice(res.summary, out / "dice_per_class.png", method))
    if res.noc:
        written.append(report.plot_noc(res.noc, out / "noc.png", method))
    if res.worst_items:
        written.append(report.plot_overlays(res.worst_items, out / "worst_cases.png"))
    return written
