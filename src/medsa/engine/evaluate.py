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

import dataclasses
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsa.engine.eval_case import _worst_distinct
from medsa.engine.inference import (
    PROTOCOLS,
    as_predictor,
)
from medsa.engine.metrics import MetricConfig
from medsa.engine.model_loading import load_model
from medsa.engine.volume_protocols import KEYSLICE_PROTOCOLS
from medsa.errors import ConfigError, DataError

HELP = "Dice / IoU / HD95 / NSD of a model under the papers' prompt protocols"

__all__ = [
    "HELP",
    "EvalConfig",
    "EvalResults",
    "evaluate_model",
    "load_model",
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
