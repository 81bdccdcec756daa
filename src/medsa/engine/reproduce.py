"""``medsa reproduce``: the papers' comparisons as one command.

Runs every cell of methods x datasets x seeds on **identical splits** (the split depends only on
the dataset and ``data.split_seed``, never on the method or the seed) and **equal step budgets**
(every trained method gets the same optimizer steps, batch size, prompt mix and learning-rate
schedule), evaluates each trained model on the held-out *test* cases under every protocol, and
writes a paper-style markdown table (mean ± std), CSV / JSON and plots.

Training goes through the ``medsa train`` functions (:func:`medsa.engine.train.build_model`,
:func:`~medsa.engine.train.build_datasets`, :class:`~medsa.engine.train.Trainer`) and evaluation
through :func:`medsa.engine.evaluate.evaluate_model`; nothing is re-implemented here.

Resumable: each finished cell writes ``<out>/cells/<dataset>/<method>/seed<k>.json`` (atomic);
a later run with the same settings loads it instead of training again. A cell interrupted in
training (or in its evaluation) continues from its run folder's last checkpoint when that was
written with the same config.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medsa.errors import ConfigError, DataError

if TYPE_CHECKING:
    from medsa.sam.prefix_cache import PrefixCache

HELP = "compare methods x datasets x seeds at equal budgets; paper-style table, CSV/JSON, plots"

__all__ = [
    "PRESETS",
    "Preset",
    "ReproduceSpec",
    "cell_train_config",
    "finished_cell",
    "method_configs",
    "new_prefix_cache",
    "run_reproduce",
]

DEFAULT_DATA = Path("../shared/data")
PROTOCOLS_DEFAULT = ("1pt", "3pt", "bbox0.5", "bbox0.75")
METHOD_TITLES = {
    "zero-shot": "Zero-shot SAM",
    "medsa": "Med-SA (encoder adapters)",
    "medsa-hyp": "Med-SA + HyP-Adpt",
    "lora": "LoRA (SAMed)",
    "fact": "MA-SAM FacT",
    "full": "Full fine-tuning",
    "sdtrans": "Med-SA + SD-Trans (3D)",
    "sdtrans-literal": "Med-SA + SD-Trans, paper's literal add (3D)",
}
METHODS_2D = ("zero-shot", "medsa", "medsa-hyp", "lora", "fact", "full")
METHODS_3D_ONLY = ("sdtrans", "sdtrans-literal")


@dataclass(frozen=True)
class Preset:
    """Shared training recipe of one ``reproduce`` run (every trained method gets the same).

    ``base`` is a packaged training config; ``overrides`` are ``--set`` style changes on top.
    ``blocks`` selects the encoder blocks of every encoder-adapting method (same layers for all).
    """

    name: str
    base: str
    overrides: tuple[str, ...]
    steps: int | None  #: optimizer steps per trained cell; None = the base config's epochs
    rank: int
    blocks: str | None
    depth: int  #: slices per chunk for SD-Trans cells on 3D datasets
    test_cases: int | None  #: evaluate the first N test cases (None = all)
    hyper_shapes: str = "square"
    note: str = ""
    #: method -> extra ``--set`` overrides of that method only (e.g. full fine-tuning's lr)
    method_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)


#: Full fine-tuning moves every pre-trained weight, so it gets MedSAM's fine-tuning learning
#: rate (1e-4, AdamW) instead of the adapters' 1e-3 / 8e-4: the same steps and batches, a
#: learning rate of its own, as LoRA and FacT have their own ranks. Chosen from the literature
#: before any full fine-tuning cell ran, not tuned on these data.
FULL_FT_LR: tuple[str, ...] = ("optim.lr=1.0e-4",)

PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        name="cpu",
        base="lite_medsam_medsa_2d",
        overrides=(
            "prompts.protocols={1pt: 0.4, 3pt: 0.3, bbox0.75: 0.3}",
            "prompts.clicks=1",
            "train.batch_size=2",
            "optim.lr=1.0e-3",
            "optim.warmup_steps=5",
        ),
        steps=40,
        rank=16,
        blocks="9-10",
        depth=4,
        test_cases=20,
        note="LiteMedSAM (TinyViT, 256 px, shipped weights), 40 steps x batch 2 per trained "
        "cell, adapters in TinyViT blocks 9-10, first 20 test cases per dataset",
        method_overrides={"full": FULL_FT_LR},
    ),
    "paper": Preset(
        name="paper",
        base="medsa_paper_2d",
        overrides=(),
        steps=None,
        rank=64,
        blocks=None,
        depth=8,
        test_cases=None,
        hyper_shapes="paper",
        note="ViT-H (set --set model.checkpoint=sam_vit_h_4b8939.pth), the paper's recipe "
        "(medsa_paper_2d: 40 epochs, SAM's loss and AdamW settings), all test cases; for GPUs",
        method_overrides={"full": FULL_FT_LR},
    ),
}


def method_configs(preset: Preset) -> dict[str, dict[str, Any]]:
    """Method name -> ``method`` section for ``preset`` (same rank and blocks for all)."""
    enc = {"rank": preset.rank, "blocks": preset.blocks}
    medsa = {"method": "medsa", **enc, "decoder_adapters": False}
    hyp = {
        "method": "medsa",
        **enc,
        "decoder_adapters": True,
        "prompt_conditioning": "hyper",
        "hyper_shapes": preset.hyper_shapes,
    }
    return {
        "zero-shot": {"method": "zeroshot"},
        "medsa": medsa,
        "medsa-hyp": hyp,
        "lora": {"method": "lora", "rank": 4, "blocks": preset.blocks},  # SAMed: rank 4, q/v
        "fact": {
            "method": "masam",
            "fact_rank": min(32, preset.rank),
            "adapters_3d": False,  # FacT only: 3D adapters would change the 2D comparison
            "blocks": preset.blocks,
        },
        "full": {"method": "full"},
        "sdtrans": {**medsa, "sd_trans": True},
        "sdtrans-literal": {**medsa, "sd_trans": True, "depth_residual": True},
    }


@dataclass
class ReproduceSpec:
    """What one ``reproduce`` run covers."""

    preset: Preset
    datasets: list[Path]
    methods: list[str]
    protocols: tuple[str, ...] = PROTOCOLS_DEFAULT
    seeds: tuple[int, ...] = (0,)
    out: Path = Path("runs/reproduce")
    overrides: list[str] = field(default_factory=list)  #: applied to every training config
    split_seed: int = 0
    progress: bool = True
    prefix_cache_mb: float = 2048.0  #: per dataset, for the frozen encoder prefix (0 = off)
    report_only: bool = False  #: write the reports from finished cells, run nothing


# ---------------------------------------------------------------------------------- one cell


def _group_pattern(case_ids: list[str]) -> str | None:
    # keep the frames of one patient together (ACDC-style ids); otherwise one case per group
    pat = r"^(patient\d+)"
    return pat if case_ids and all(re.match(pat, c) for c in case_ids) else None


def cell_train_config(
    spec: ReproduceSpec, root: Path, method: str, seed: int, run_dir: Path, info: Any
) -> Any:
    """The training config of one cell (a :class:`~medsa.engine.config.TrainConfig`): the
    preset's base config and overrides, the method's own overrides, ``spec.overrides``, and the
    method section; ``run_dir`` is its ``train.out_dir``, ``info`` the loaded dataset."""
    from .config import load_config

    p = spec.preset
    sets = [
        *p.overrides,
        f"data.root={root}",
        f"data.split_seed={spec.split_seed}",
        f"train.seed={seed}",
        f"train.out_dir={run_dir}",
        "train.val_every=0",
        "logging.tensorboard=false",
        "logging.progress=false",
    ]
    gp = _group_pattern(info.case_ids)
    if gp:
        sets.append(f"data.group_pattern={gp}")
    if p.steps is not None:
        sets.append(f"train.max_steps={p.steps}")
    if method in METHODS_3D_ONLY:
        sets.append(f"data.depth={p.depth}")
    sets += p.method_overrides.get(method, ())
    sets += spec.overrides
    import dataclasses

    # replace() re-runs TrainConfig's validation of the method section
    return dataclasses.replace(load_config(p.base, sets), method=method_configs(p)[method])


def _signature(spec: ReproduceSpec, root: Path, method: str, seed: int) -> str:
    blob = json.dumps(
        {
            # a method's own overrides enter only its cells' signatures
            "preset": {k: v for k, v in spec.preset.__dict__.items() if k != "method_overrides"},
            **(
                {"method_overrides": list(mo)}
                if (mo := spec.preset.method_overrides.get(method))
                else {}
            ),
            "overrides": spec.overrides,
            "root": str(root.resolve()),
            "method": method_configs(spec.preset)[method],
            "protocols": spec.protocols,
            "seed": seed,
            "split_seed": spec.split_seed,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write_json_atomic(path: Path, obj: Any) -> None:
    from medsa._fs import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _cell_file(spec: ReproduceSpec, root: Path, method: str, seed: int) -> Path:
    """``<out>/cells/<dataset>/<method>/seed<k>.json``, the cell's record (its run folder is
    ``seed<k>_run/`` beside it)."""
    return spec.out / "cells" / root.name / method / f"seed{seed}.json"


def _stored_cell(cell_file: Path, signature: str) -> dict[str, Any] | None:
    if not cell_file.exists():
        return None
    try:
        old = json.loads(cell_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if old.get("signature") != signature:
        return None
    old["cached"] = True
    return old


def finished_cell(spec: ReproduceSpec, root: Path, method: str, seed: int) -> dict[str, Any] | None:
    """The stored record of a cell finished with exactly these settings (``"cached": True``),
    else None."""
    cell_file = _cell_file(spec, root, method, seed)
    return _stored_cell(cell_file, _signature(spec, root, method, seed))


def run_cell(
    spec: ReproduceSpec,
    root: Path,
    method: str,
    seed: int,
    prefix_cache: PrefixCache | None = None,
) -> dict[str, Any]:
    """Train (unless zero-shot) and evaluate one cell; returns its record (also on disk).

    ``prefix_cache`` is shared by the cells of one dataset: every method starts from the same
    frozen encoder prefix, so its output per training / test image is computed once (exact; the
    cache checks the weights, see :mod:`medsa.sam.prefix_cache`)."""
    import torch

    from medsa.adapters import count_parameters
    from medsa.data.datasets import load_dataset

    from .evaluate import EvalConfig, evaluate_model
    from .train import Trainer, build_datasets, build_model, make_split

    name = root.name
    sig = _signature(spec, root, method, seed)
    cell_file = _cell_file(spec, root, method, seed)
    old = _stored_cell(cell_file, sig)
    if old is not None:
        return old
    info = load_dataset(root)
    run_dir = cell_file.with_name(f"seed{seed}_run")
    cfg = cell_train_config(spec, root, method, seed, run_dir, info)
    torch.manual_seed(seed)
    model = build_model(cfg)
    train_s = 0.0
    steps = 0
    if method == "zero-shot":
        split = make_split(cfg, list(info.case_ids))
    else:
        train_set, _val, split = build_datasets(cfg, model)
        trainer = Trainer(cfg, train_set, None, model=model, prefix_cache=prefix_cache)
        train_s = _resume_interrupted(trainer, run_dir, cfg)
        if trainer.step < trainer.total_steps:  # else trained before an interrupted evaluation
            train_s += float(trainer.fit()["seconds"])
        model, steps = trainer.model, trainer.step
    if prefix_cache is not None:
        from .perf import attach_prefix_cache

        attach_prefix_cache(model, 0, prefix_cache)
    test = list(split["test"])
    if spec.preset.test_cases is not None:
        test = test[: spec.preset.test_cases]
    if not test:
        raise DataError(f"{root}: the split has no test cases")
    depth = cfg.data.depth if info.dim == 3 and method in METHODS_3D_ONLY else None
    ecfg = EvalConfig(protocols=spec.protocols, seeds=(seed,), noc_clicks=0, worst_k=0, depth=depth)
    t0 = time.perf_counter()
    res = evaluate_model(model.eval(), info, case_ids=test, config=ecfg)
    rec = {
        "dataset": name,
        "root": str(root),
        "dim": info.dim,
        "method": method,
        "seed": seed,
        "signature": sig,
        "tunable_params": int(count_parameters(model).tunable),
        "train_steps": steps,
        "batch_size": cfg.train.batch_size,
        "train_seconds": round(train_s, 2),
        "eval_seconds": round(time.perf_counter() - t0, 2),
        "test_cases": len(test),
        "test_ids": test,
        # fingerprint of the whole split (train / val / test ids): equal across methods and seeds
        "split_sha": hashlib.sha256(json.dumps(split, sort_keys=True).encode()).hexdigest()[:16],
        "dice": {p: res.mean_dice(p) for p in spec.protocols},
        "dice_case_std": {p: _case_std(res.rows, p) for p in spec.protocols},
        "method_config": cfg.method,
    }
    _write_json_atomic(cell_file, rec)
    return rec


def _resume_interrupted(trainer: Any, run_dir: Path, cfg: Any) -> float:
    """Continue a cell whose training was interrupted (or finished before its evaluation was):
    load ``run_dir``'s last checkpoint when it was written with exactly this cell's config.
    Returns the training seconds already spent (0.0 when starting afresh)."""
    from .checkpoint import load_train_state
    from .config import config_to_yaml

    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        return 0.0
    try:
        state = load_train_state(last)
    except Exception:  # corrupt / foreign: train again (the run folder is the cell's own)
        return 0.0
    if state.get("config") != config_to_yaml(cfg):
        return 0.0
    trainer.load_state(state)
    return _spent_seconds(run_dir)


def _spent_seconds(run_dir: Path) -> float:
    """Training seconds of an earlier (partial) run of a cell: the finished run's summary, or
    the last ``seconds`` of its log (a lower bound: up to the last logged step)."""
    try:
        return float(json.loads((run_dir / "train_summary.json").read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        rows = (run_dir / "log.csv").read_text().splitlines()
        head = rows[0].split(",")
        return float(rows[-1].split(",")[head.index("seconds")])
    except (OSError, ValueError, IndexError):
        return 0.0


def _case_std(rows: list[dict[str, Any]], protocol: str) -> float:
    vals = [float(r["dice"]) for r in rows if r["protocol"] == protocol]
    if len(vals) < 2:
        return 0.0
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


# ---------------------------------------------------------------------------------- whole run


def new_prefix_cache(spec: ReproduceSpec) -> PrefixCache | None:
    """One dataset's cache of the encoder prefix before the preset's first adapted block."""
    from medsa.adapters.config import parse_blocks
    from medsa.sam.prefix_cache import PrefixCache

    if spec.preset.blocks is None or spec.prefix_cache_mb <= 0:
        return None
    # 0-based index of the first adapted block; the bound only validates (any encoder depth)
    first = parse_blocks(spec.preset.blocks, 1 << 16)[0]
    if first < 1:
        return None
    return PrefixCache(first, int(spec.prefix_cache_mb * 2**20))


def plan(spec: ReproduceSpec) -> tuple[list[tuple[Path, str, int]], list[dict[str, Any]]]:
    """The cells to run, in order: (dataset folder, method, seed), and the datasets that cannot
    be used (unreadable, or too few cases for the split). 3D-only methods skip 2D sets."""
    from medsa.data.datasets import load_dataset

    from .train import make_split

    cells, skipped = [], []
    for root in spec.datasets:
        try:
            info = load_dataset(root)
            cfg = cell_train_config(spec, root, "zero-shot", 0, spec.out / "_plan", info)
            make_split(cfg, list(info.case_ids))
        except (ConfigError, DataError) as e:
            skipped.append({"dataset": root.name, "method": "*", "seed": "*", "why": str(e)})
            continue
        for m in spec.methods:
            if m in METHODS_3D_ONLY and info.dim != 3:
                continue
            for s in spec.seeds:
                cells.append((root, m, s))
    return cells, skipped


def run_reproduce(spec: ReproduceSpec) -> dict[str, Any]:
    """Run (or load) every cell, then write the table, CSV / JSON and plots under ``spec.out``."""
    t0 = time.perf_counter()
    spec.out.mkdir(parents=True, exist_ok=True)
    records = []
    cells, skipped = plan(spec)
    cache: PrefixCache | None = None
    for i, (root, method, seed) in enumerate(cells):
        if spec.report_only:
            done = finished_cell(spec, root, method, seed)
            if done is None:
                why = "not run yet (--report-only)"
                skipped.append({"dataset": root.name, "method": method, "seed": seed, "why": why})
            else:
                records.append(done)
            continue
        if cache is None or cells[i - 1][0] != root:  # cells are dataset-major
            cache = new_prefix_cache(spec)
        try:
            rec = run_cell(spec, root, method, seed, cache)
        except DataError as e:  # e.g. a dataset too small to split: report it, go on
            skipped.append({"dataset": root.name, "method": method, "seed": seed, "why": str(e)})
            continue
        records.append(rec)
        if spec.progress:
            how = (
                "cached"
                if rec.get("cached")
                else f"{rec['train_seconds']:.0f}+{rec['eval_seconds']:.0f} s"
            )
            dice = ", ".join(f"{p} {v:.3f}" for p, v in rec["dice"].items())
            print(f"[{i + 1}/{len(cells)}] {root.name} {method} seed {seed}: {dice} ({how})",
                  flush=True)  # fmt: skip
    from .reproduce_report import write_reports

    out = write_reports(spec, records, skipped, time.perf_counter() - t0)
    return {"records": records, "skipped": skipped, "files": out}


# ---------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=list(PRESETS), default="cpu",
                   help="cpu: LiteMedSAM, short equal budgets (default); paper: ViT-H, the "
                   "paper's recipe (GPUs)")  # fmt: skip
    p.add_argument("--datasets", help="comma-separated dataset folders (default: every dataset "
                   f"folder under {DEFAULT_DATA})")  # fmt: skip
    p.add_argument("--methods", help="comma-separated, from: " + ", ".join(METHOD_TITLES)
                   + " (default: all; sdtrans* only on 3D sets)")  # fmt: skip
    p.add_argument("--protocols", default=",".join(PROTOCOLS_DEFAULT))
    p.add_argument("--seeds", default="0", help="comma-separated training / prompt seeds")
    p.add_argument("--steps", type=int, help="optimizer steps per trained cell (preset's budget)")
    p.add_argument("--test-cases", type=int, help="evaluate the first N test cases of each split")
    p.add_argument("--out", help="output folder (default runs/reproduce_<preset>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="training-config override applied to every cell (repeatable)")  # fmt: skip
    p.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=2048.0,
        help="memory per dataset for the frozen encoder blocks' output, shared by "
        "the methods (0 = off; results are the same either way)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="write table / CSV / JSON / plots from the finished cells only; cells "
        "not run yet are listed as skipped (e.g. while another process runs them)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the cells and exit")


def _csv(text: str | None, what: str) -> list[str]:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if text is not None and not items:
        raise ConfigError(f"--{what} is empty")
    return items


def spec_from_args(args: argparse.Namespace) -> ReproduceSpec:
    import dataclasses

    from medsa.engine.inference import PROTOCOLS

    preset = PRESETS[args.preset]
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError("--steps must be >= 1")
        preset = dataclasses.replace(preset, steps=args.steps)
    if args.test_cases is not None:
        if args.test_cases < 1:
            raise ConfigError("--test-cases must be >= 1")
        preset = dataclasses.replace(preset, test_cases=args.test_cases)
    if args.datasets:
        roots = [Path(d) for d in _csv(args.datasets, "datasets")]
    else:
        if not DEFAULT_DATA.is_dir():
            raise ConfigError(f"no --datasets given and {DEFAULT_DATA} does not exist")
        roots = sorted(d for d in DEFAULT_DATA.iterdir() if d.is_dir())
    for r in roots:
        if not r.is_dir():
            raise ConfigError(f"dataset folder {r} does not exist")
    methods = _csv(args.methods, "methods") if args.methods else list(METHOD_TITLES)
    for m in methods:
        if m not in METHOD_TITLES:
            raise ConfigError(f"unknown method {m!r}; choose from {', '.join(METHOD_TITLES)}")
    protocols = tuple(_csv(args.protocols, "protocols"))
    for pr in protocols:
        if pr not in PROTOCOLS or pr in ("everything", "auto"):
            raise ConfigError(f"unknown protocol {pr!r}; use 1pt, 3pt, bbox0.5, bbox0.75, box")
    try:
        seeds = tuple(int(s) for s in _csv(args.seeds, "seeds"))
    except ValueError:
        raise ConfigError(f"--seeds must be integers, got {args.seeds!r}") from None
    out = Path(args.out or f"runs/reproduce_{preset.name}")
    if not args.prefix_cache_mb >= 0:
        raise ConfigError("--prefix-cache-mb must be >= 0")
    return ReproduceSpec(
        preset,
        roots,
        methods,
        protocols,
        seeds,
        out,
        list(args.overrides),
        prefix_cache_mb=args.prefix_cache_mb,
        report_only=args.report_only,
    )


def main(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    print(f"preset {spec.preset.name}: {spec.preset.note}", flush=True)
    if args.dry_run:
        cells, skipped = plan(spec)
        for root, m, s in cells:
            print(f"{root.name}\t{m}\tseed {s}")
        for sk in skipped:
            print(f"skipped {sk['dataset']}: {sk['why']}")
        return 0
    result = run_reproduce(spec)
    for sk in result["skipped"]:
        print(f"skipped {sk['dataset']} {sk['method']} seed {sk['seed']}: {sk['why']}")
    print("wrote " + ", ".join(str(p) for p in result["files"]))
    return 0
