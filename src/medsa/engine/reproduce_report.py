"""Outputs of ``medsa reproduce``: paper-style markdown table, CSV, JSON and two plots.

Aggregation: a cell (dataset, method, seed) has one mean Dice per protocol (over its test cases
and classes). The table shows, per method and dataset, the mean over seeds and ``± std``: the
sample standard deviation over seeds when there are several, else over the test cases of the one
seed (the caption says which). "Avg" is the mean over datasets.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .report import PROTOCOL_TITLES, _atomic_write_text, _plt, _save

__all__ = ["markdown", "write_reports"]

CSV_COLUMNS = (
    "dataset",
    "method",
    "seed",
    "protocol",
    "dice",
    "dice_case_std",
    "tunable_params",
    "train_steps",
    "batch_size",
    "train_seconds",
    "eval_seconds",
    "test_cases",
)


def _atomic(path: Path, text: str) -> Path:
    _atomic_write_text(path, text)  # the evaluate report's writer: no partial file left behind
    return path


def _order(records: list[dict[str, Any]], key: str, preferred: list[str]) -> list[str]:
    seen = list(dict.fromkeys(r[key] for r in records))
    return [k for k in preferred if k in seen] + [k for k in seen if k not in preferred]


def _cell_stats(recs: list[dict[str, Any]], protocol: str) -> tuple[float, float]:
    vals = [r["dice"][protocol] for r in recs]
    if len(vals) > 1:
        return float(np.mean(vals)), float(np.std(vals, ddof=1))
    return float(vals[0]), float(recs[0]["dice_case_std"][protocol])


def markdown(spec: Any, records: list[dict[str, Any]], seconds: float) -> str:
    """Paper-style tables, one per protocol: rows = methods (+ tunable parameters), columns =
    datasets + Avg, values Dice (%) mean ± std."""
    from .reproduce import METHOD_TITLES

    p = spec.preset
    methods = _order(records, "method", list(spec.methods))
    datasets = _order(records, "dataset", [d.name for d in spec.datasets])
    n_seeds = len(spec.seeds)
    over = "seeds" if n_seeds > 1 else "test cases (one seed)"
    steps = sorted({r["train_steps"] for r in records if r["method"] != "zero-shot"})
    lines = [
        f"# medsa reproduce: preset `{p.name}`",
        "",
        f"Budget: {p.note}. Trained cells ran {', '.join(map(str, steps)) or '0'} optimizer "
        f"steps of batch {records[0]['batch_size'] if records else '?'}; seeds "
        f"{', '.join(map(str, spec.seeds))}; identical splits (split seed {spec.split_seed}). "
        f"Wall time of this invocation: {seconds / 60:.1f} min (cached cells excluded).",
        "",
        f"Command: `{' '.join(['medsa', *sys.argv[1:]]) if sys.argv[1:] else 'medsa reproduce'}`",
        "",
        f"Dice (%), mean ± std over {over}; tunable parameters of the adapted model.",
    ]
    for prot in spec.protocols:
        lines += ["", f"## {PROTOCOL_TITLES.get(prot, prot)}", ""]
        lines.append("| method | tunable | " + " | ".join(datasets) + " | Avg |")
        lines.append("|---|---:|" + "---:|" * (len(datasets) + 1))
        for m in methods:
            mrec = [r for r in records if r["method"] == m]
            tun = mrec[0]["tunable_params"] if mrec else 0
            cells, means = [], []
            for d in datasets:
                recs = [r for r in mrec if r["dataset"] == d]
                if not recs:
                    cells.append("–")
                    continue
                mean, std = _cell_stats(recs, prot)
                means.append(mean)
                cells.append(f"{100 * mean:.1f} ± {100 * std:.1f}")
            avg = f"{100 * np.mean(means):.1f}" if means else "–"
            lines.append(
                f"| {METHOD_TITLES.get(m, m)} | {tun / 1e6:.3f}M | " + " | ".join(cells)
                + f" | {avg} |"
            )  # fmt: skip
    return "\n".join(lines) + "\n"


def _csv_text(records: list[dict[str, Any]], protocols: tuple[str, ...]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    w.writeheader()
    for r in records:
        for prot in protocols:
            w.writerow(
                {
                    **{k: r[k] for k in CSV_COLUMNS if k in r},
                    "protocol": prot,
                    "dice": f"{r['dice'][prot]:.6f}",
                    "dice_case_std": f"{r['dice_case_std'][prot]:.6f}",
                }
            )
    return buf.getvalue()


def plot_dice_per_dataset(spec: Any, records: list[dict[str, Any]], path: Path) -> Path:
    """One panel per protocol: grouped bars of Dice (%) per dataset, one bar per method."""
    plt = _plt()
    methods = _order(records, "method", list(spec.methods))
    datasets = _order(records, "dataset", [d.name for d in spec.datasets])
    n = len(spec.protocols)
    fig, axes = plt.subplots(
        n, 1, figsize=(max(6, 1.3 * len(datasets) + 2), 2.6 * n), squeeze=False
    )
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(datasets))
    for ax, prot in zip(axes[:, 0], spec.protocols, strict=True):
        for i, m in enumerate(methods):
            vals = []
            for d in datasets:
                recs = [r for r in records if r["method"] == m and r["dataset"] == d]
                vals.append(100 * np.mean([r["dice"][prot] for r in recs]) if recs else np.nan)
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, vals, width, label=m)
        ax.set_xticks(x, datasets, rotation=20 if len(datasets) > 4 else 0)
        ax.set_ylabel("Dice (%)")
        ax.set_ylim(0, 100)
        ax.set_title(PROTOCOL_TITLES.get(prot, prot), fontsize=9)
    axes[0, 0].legend(fontsize=7, ncol=min(len(methods), 4), loc="upper left")
    return _save(plt, fig, path)


def plot_dice_vs_params(spec: Any, records: list[dict[str, Any]], path: Path) -> Path:
    """Mean Dice over datasets against tunable parameters (log x): colour = protocol, marker =
    method (methods with nearly equal counts, e.g. LoRA and FacT, stay distinguishable without
    overlapping labels); zero-shot (0 parameters) is a dashed horizontal line per protocol."""
    from matplotlib.lines import Line2D

    plt = _plt()
    methods = _order(records, "method", list(spec.methods))
    shapes = "osD^vP*Xh<>"
    markers = {m: shapes[i % len(shapes)] for i, m in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k, prot in enumerate(spec.protocols):
        color = f"C{k}"
        for m in methods:
            recs = [r for r in records if r["method"] == m]
            dice = 100 * float(np.mean([r["dice"][prot] for r in recs]))
            tun = recs[0]["tunable_params"]
            if tun == 0:
                ax.axhline(dice, color=color, ls="--", lw=0.8)
            else:
                ax.scatter([tun], [dice], color=color, marker=markers[m], s=28)
    handles = [Line2D([], [], color=f"C{k}", marker="o", ls="", label=PROTOCOL_TITLES.get(p, p))
               for k, p in enumerate(spec.protocols)]  # fmt: skip
    tuned = {r["method"] for r in records if r["tunable_params"] > 0}
    handles += [Line2D([], [], color="0.3", marker=markers[m], ls="", label=m)
                for m in methods if m in tuned]  # fmt: skip
    if set(methods) - tuned:
        handles.append(Line2D([], [], color="0.3", ls="--", lw=0.8, label="zero-shot"))
    ax.set_xscale("log")
    ax.set_xlabel("tunable parameters")
    ax.set_ylabel("mean Dice over datasets (%)")
    ax.set_title("colour: protocol, marker: method; dashed: zero-shot", fontsize=8)
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(plt, fig, path)


def write_reports(
    spec: Any, records: list[dict[str, Any]], skipped: list[dict[str, Any]], seconds: float
) -> list[Path]:
    """Write ``table.md``, ``results.csv``, ``results.json`` and the two plots; returns paths."""
    out = spec.out
    out.mkdir(parents=True, exist_ok=True)
    files = [
        _atomic(
            out / "results.json",
            json.dumps(
                {
                    "preset": spec.preset.__dict__,
                    "protocols": list(spec.protocols),
                    "seeds": list(spec.seeds),
                    "split_seed": spec.split_seed,
                    "overrides": spec.overrides,
                    "seconds": seconds,
                    "records": records,
                    "skipped": skipped,
                },
                indent=2,
                default=str,
            )
            + "\n",
        ),  # fmt: skip
    ]
    if not records:
        return files
    files.append(_atomic(out / "results.csv", _csv_text(records, spec.protocols)))
    table = markdown(spec, records, seconds)
    if skipped:
        table += "\nSkipped: " + "; ".join(
            f"{s['dataset']} {s['method']} seed {s['seed']} ({s['why']})" for s in skipped
        ) + "\n"  # fmt: skip
    files.append(_atomic(out / "table.md", table))
    files.append(plot_dice_per_dataset(spec, records, out / "dice_per_dataset.png"))
    files.append(plot_dice_vs_params(spec, records, out / "dice_vs_params.png"))
    return files
