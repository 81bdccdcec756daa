"""``medsa train``: adapt SAM with a parameter-efficient method (Med-SA, MA-SAM, LoRA, full FT).

One optimizer step (per micro-batch of ``B`` images ``(B, 3, S, S)``, or 3D chunks
``(B, D, 3, S, S)`` fed as ``(B*D, 3, S, S)`` with ``depth=D``):

1. a prompt protocol is drawn from ``prompts.protocols`` (weights) and simulated on each target;
2. the image encoder runs once, with gradients (the adapters inside it train);
3. iterative clicks (``prompts.clicks``): ``k ~ U{0..clicks}`` decoder passes without gradients
   on the detached embeddings each add one click in the largest error region of the model's own
   prediction (SAM / RITM click simulation, :func:`medsa.data.prompts.next_click`);
4. the final decoder pass with all prompts is trained with Dice + BCE at the input resolution
   (Dice + CE on MA-SAM's prompt-free multi-class head).

Only the parameters the method marks trainable are in the AdamW optimizer (linear warm-up, then
cosine decay per optimizer step). Checkpoints (``<out_dir>/checkpoints/{last,best}.pt`` plus
adapter ``.safetensors``/``.json``) are written atomically by rank 0; ``--resume`` continues
bit-exactly because every random draw is derived from ``(seed, epoch, batch, rank)`` and the
loop position, optimizer and schedule are restored.

This module is the ``medsa train`` command (config resolution, CLI) and re-exports the public
API; the parts live in :mod:`~medsa.engine.train_step` (schedule, prompts, the differentiable
step, model), :mod:`~medsa.engine.trainer` (the loop), :mod:`~medsa.engine.train_state`
(checkpoints), :mod:`~medsa.engine.train_validate` (validation) and
:mod:`~medsa.engine.train_data` (datasets from the config).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from medsa.errors import CheckpointError, ConfigError

from .config import TrainConfig, config_from_dict, config_to_yaml, load_config
from .distributed import cleanup_distributed, init_distributed
from .outputs import OutputError, check_writable_dir, describe_os_error
from .train_data import ModelInputTransform, build_datasets, make_split
from .train_step import PromptBatch, SegmentationStep, WarmupCosine, build_model, sample_prompts
from .trainer import Trainer

HELP = "adapt SAM on a dataset (Med-SA, MA-SAM, LoRA, full fine-tuning)"

__all__ = [
    "HELP",
    "ModelInputTransform",
    "PromptBatch",
    "SegmentationStep",
    "Trainer",
    "WarmupCosine",
    "add_arguments",
    "build_datasets",
    "build_model",
    "main",
    "make_split",
    "sample_prompts",
]


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        help="YAML config (sections: model, method, data, prompts, loss, optim, train, logging), "
        "or the name of a packaged one: lite_medsam_medsa_2d, medsa_vit_b_2d, medsa_sdtrans_3d, "
        "medsa_paper_2d, medsa_paper_3d, masam_3d, lora_vit_b_2d",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=3e-4 --set method.rank=16 (repeatable)",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR|CKPT",
        help="continue a run: its folder (uses checkpoints/last.pt) or a .pt checkpoint; the "
        "config comes from the checkpoint unless --config is given (--set still applies)",
    )
    parser.add_argument("--out-dir", help="shortcut for --set train.out_dir=...")
    parser.add_argument("--device", help="shortcut for --set train.device=... (cpu, cuda, cuda:1)")
    parser.add_argument(
        "--stop-after-steps",
        type=int,
        metavar="N",
        help="stop (and save last) after optimizer step N, as an interruption would",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run even if train.out_dir already holds one (its checkpoints and log "
        "are replaced); without it such a run must be continued with --resume",
    )


def _resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any] | None]:
    import yaml

    overrides = list(args.overrides or [])
    if args.out_dir:
        overrides.append(f"train.out_dir={args.out_dir}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    state = None
    if args.resume:
        from .checkpoint import load_train_state, resolve_resume_path

        state = load_train_state(resolve_resume_path(args.resume))
        if not args.config:
            from .config import apply_overrides

            try:
                raw = yaml.safe_load(state["config"])
            except yaml.YAMLError as e:
                raise CheckpointError(
                    f"the config stored in the checkpoint is unreadable: {e}"
                ) from None
            return config_from_dict(apply_overrides(raw, overrides)), state
    elif not args.config:
        raise ConfigError("give --config cfg.yaml (or --resume RUN_DIR)")
    return load_config(args.config, overrides), state


def main(args: argparse.Namespace) -> int:
    cfg, state = _resolve_config(args)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        raise ConfigError("--stop-after-steps must be >= 1")
    out = Path(cfg.train.out_dir)
    # before the model is built: an out_dir that cannot be written is one line, not a traceback
    check_writable_dir(out, "train.out_dir (--out-dir)")
    if state is None and (out / "checkpoints" / "last.pt").exists():
        if not args.overwrite:
            raise ConfigError(
                f"{out} already holds a training run; continue it with --resume {out}, "
                "choose another train.out_dir, or pass --overwrite to start over"
            )
        (out / "log.csv").unlink(missing_ok=True)  # a new run gets a new log
    from .perf import resolve_device

    info = init_distributed(resolve_device(cfg.train.device))
    try:
        torch.manual_seed(cfg.train.seed)  # random-init parts (adapters; tiny test backbones)
        model = build_model(cfg)
        train_set, val_set, split = build_datasets(cfg, model)
        if info.is_main:
            from medsa.data.datasets import save_splits

            save_splits(split, Path(cfg.train.out_dir) / "splits.json")
        trainer = Trainer(cfg, train_set, val_set, model=model, dist=info)
        if state is not None:
            trainer.load_state(state)
        try:
            summary = trainer.fit(stop_at_step=args.stop_after_steps)
        except OSError as e:  # log / config / summary writes (checkpoints raise OutputError)
            where = f" {e.filename}" if getattr(e, "filename", None) else f" in {out}"
            raise OutputError(
                f"cannot write{where}: {describe_os_error(e)}; " + trainer._kept_checkpoint_note()
            ) from None
    finally:
        cleanup_distributed()
    if info.is_main:
        best = summary["best_val_dice"]
        print(
            f"trained {summary['steps']} steps in {summary['seconds']:.0f} s; "
            + (
                f"best val Dice {best:.4f} (step {summary['best_step']}); "
                if best is not None
                else ""
            )
            + f"checkpoints in {Path(cfg.train.out_dir) / 'checkpoints'}"
        )
    return 0
