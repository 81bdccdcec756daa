"""Evaluation reports: CSV rows, JSON summary, paper-style markdown table, PNG plots.

Aggregation (as the Med-SA paper's Table 10, "repeated five times"): for every seed, a metric is
averaged over cases (per class); the table shows the mean over seeds and, with more than one seed,
``± the sample standard deviation`` over seeds. "Avg" is the mean over classes of the per-class
means; "HD95" is the mean over classes of the per-class mean HD95, where undefined HD95 values
(exactly one mask empty, under the default ``"nan"`` policy) are skipped and counted in the
summary as ``hd95_undefined``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsa._fs import atomic_write, atomic_write_text

__all__ = [
    "CSV_FIELDS",
    "PROTOCOL_TITLES",
    "write_csv",
    "summarize",
    "write_json",
    "markdown_table",
    "plot_class_dice",
    "plot_noc",
    "plot_overlays",
]

#: columns of ``metrics.csv`` (one row per case x class x protocol x seed)
CSV_FIELDS: tuple[str, ...] = ("case_id", "class", "protocol", "seed", "dice", "iou", "hd95", "nsd")

#: protocol -> row title used in the paper's tables
PROTOCOL_TITLES: dict[str, str] = {
    "1pt": "1-point",
    "3pt": "3-points",
    "bbox0.5": "BBox 0.5",
    "bbox0.75": "BBox 0.75",
    "box": "BBox (tight)",
    "everything": "Everything",
    "auto": "(no prompt)",
}


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write the per-case rows (``CSV_FIELDS``; NaN HD95 written as empty) atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(CSV_FIELDS), extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow(
                    {k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                )

    return atomic_write(path, write)


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0}


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate rows into ``{protocol: {"classes": {class: {metric: {mean, std}}}, "avg": ...}}``.

    ``mean``/``std`` are over seeds of the per-seed case means (std = 0 with one seed).
    """
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    classes = list(dict.fromkeys(r["class"] for r in rows))
    seeds = list(dict.fromkeys(r["seed"] for r in rows))
    metrics = ("dice", "iou", "hd95", "nsd")
    out: dict[str, Any] = {}
    for prot in protocols:
        per_class: dict[str, Any] = {}
        # per_seed[metric][seed] = list of per-class means (for the "avg" row)
        per_seed_avg: dict[str, dict[Any, list[float]]] = {
            m: {s: [] for s in seeds} for m in metrics
        }
        for cls in classes:
            sel = [r for r in rows if r["protocol"] == prot and r["class"] == cls]
            if not sel:
                continue
            entry: dict[str, Any] = {"n_cases": len({r["case_id"] for r in sel})}
            for m in metrics:
                seed_means = []
                for s in seeds:
                    vals = [float(r[m]) for r in sel if r["seed"] == s]
                    vals = [v for v in vals if not math.isnan(v)]
                    sm = float(np.mean(vals)) if vals else float("nan")
                    seed_means.append(sm)
                    per_seed_avg[m][s].append(sm)
                entry[m] = _mean_std(seed_means)
            entry["hd95_undefined"] = sum(1 for r in sel if math.isnan(float(r["hd95"])))
            per_class[cls] = entry
        avg = {
            m: _mean_std(
                [
                    float(np.nanmean(v)) if not all(math.isnan(x) for x in v) else float("nan")
                    for v in per_seed_avg[m].values()
                    if v
                ]
            )
            for m in metrics
        }
        avg["hd95_undefined"] = sum(c["hd95_undefined"] for c in per_class.values())
        out[prot] = {"classes": per_class, "avg": avg}
    return out


def write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as JSON (NaN -> null) atomically."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, Mapping):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, (np.floating, np.integer)):
            return clean(x.item())
        if isinstance(x, Path):
            return str(x)
        return x

    path = Path(path)
    _atomic_write_text(path, json.dumps(clean(obj), indent=2) + "\n")
    return path


def _fmt(stat: Mapping[str, float], scale: float, digits: int, with_std: bool) -> str:
    m = stat["mean"]
    if math.isnan(m):
        return "–"
    s = f"{m * scale:.{digits}f}"
    if with_std:
        s += f" ± {stat['std'] * scale:.{digits}f}"
    return s


def markdown_table(summary: Mapping[str, Any], method: str, n_seeds: int = 1) -> str:
    """Paper-style table: rows ``method protocol``, columns classes + Avg + HD95.

    Dice in %, HD95 in mm; ``mean ± std`` over seeds when ``n_seeds > 1``.
    """
    classes: list[str] = []
    for prot in summary.values():
        for c in prot["classes"]:
            if c not in classes:
                classes.append(c)
    with_std = n_seeds > 1
    head = ["Model", *classes, "Avg", "HD95 ↓"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + [":---:"] * (len(head) - 1)) + "|",
    ]
    for prot, entry in summary.items():
        title = f"{method} {PROTOCOL_TITLES.get(prot, prot)}"
        cells = [
            _fmt(entry["classes"][c]["dice"], 100, 1, with_std) if c in entry["classes"] else "–"
            for c in classes
        ]
        cells.append(_fmt(entry["avg"]["dice"], 100, 1, with_std))
        cells.append(_fmt(entry["avg"]["hd95"], 1, 2, with_std))
        lines.append("| " + " | ".join([title, *cells]) + " |")
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless; no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path) -> Path:
    """Lay out, write (100 dpi) and close a figure; returns the path."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_class_dice(summary: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """Grouped bars: Dice (%) per class, one bar per protocol, error bars = std over seeds."""
    plt = _plt()
    protocols = list(summary)
    classes = list(dict.fromkeys(c for p in summary.values() for c in p["classes"]))
    x = np.arange(len(classes))
    width = 0.8 / max(len(protocols), 1)
    fig, ax = plt.subplots(figsize=(max(5.5, 1.2 * len(classes) + 2), 3.8))
    for i, prot in enumerate(protocols):
        cl = summary[prot]["classes"]
        means = [cl[c]["dice"]["mean"] * 100 if c in cl else np.nan for c in classes]
        stds = [cl[c]["dice"]["std"] * 100 if c in cl else 0 for c in classes]
        ax.bar(
            x + (i - (len(protocols) - 1) / 2) * width,
            means,
            width,
            yerr=stds,
            label=PROTOCOL_TITLES.get(prot, prot),
            capsize=2,
        )
    ax.set_xticks(x, classes, rotation=30 if len(classes) > 4 else 0)
    ax.set_ylabel("Dice (%)")
    ax.set_ylim(0, 125)  # headroom for the legend above the 100 % line
    ax.set_yticks(range(0, 101, 20))
    ax.legend(loc="upper center", fontsize=7, ncol=min(len(protocols), 3))
    if title:
        ax.set_title(title)
    return _save(plt, fig, path)


def plot_noc(noc: Mapping[str, Sequence[float]], path: str | Path, title: str = "") -> Path:
    """Dice (%) vs number of clicks, one line per class (``noc[class][k-1]`` = Dice after k clicks)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for cls, curve in noc.items():
        ax.plot(np.arange(1, len(curve) + 1), np.asarray(curve) * 100, marker="o", label=cls)
    n_max = max((len(c) for c in noc.values()), default=1)
    ax.set_xticks(range(1, n_max + 1))  # clicks are integers
    ax.set_xlabel("number of clicks")
    ax.set_ylabel("mean Dice (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(plt, fig, path)


def plot_overlays(items: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Overlays of cases: each item has ``image (H, W[, 3])``, ``gt (H, W)``, ``pred (H, W)``, ``title``.

    Ground-truth contour in green, prediction filled in red.
    """
    plt = _plt()
    n = max(len(items), 1)
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.2), squeeze=False)
    for ax, it in zip(axes[0], items, strict=False):
        img = np.asarray(it["image"])
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        pred = np.asarray(it["pred"], dtype=bool)
        overlay = np.zeros((*pred.shape, 4))
        overlay[pred] = (1.0, 0.0, 0.0, 0.4)
        ax.imshow(overlay)
        gt = np.asarray(it["gt"], dtype=bool)
        if gt.any() and not gt.all():
            ax.contour(gt.astype(float), levels=[0.5], colors="lime", linewidths=1)
        ax.set_title(str(it.get("title", "")), fontsize=8)
        ax.axis("off")
    for ax in axes[0][len(items) :]:
        ax.axis("off")
    return _save(plt, fig, path)
