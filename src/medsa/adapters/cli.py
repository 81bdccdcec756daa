"""``medsa params``: total / tunable parameter counts of a backbone + method.

The model is built on the meta device: no weights are allocated or read, so even ViT-H is
counted instantly.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .config import METHODS, POSITIONS, PROMPT_CONDITIONINGS, SD_FUSIONS

HELP = "print total / tunable parameter counts of a backbone + method"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backbone",
        default="vit_h",
        help="vit_b | vit_l | vit_h | vit_tiny | lite_medsam (default vit_h)",
    )
    parser.add_argument("--method", default="medsa", choices=tuple(METHODS))
    parser.add_argument(
        "--rank",
        type=int,
        default=None,
        help="Med-SA adapter width (default 64), LoRA rank (default 4) or MA-SAM FacT rank (default 32)",
    )
    parser.add_argument(
        "--blocks", default=None, help="1-based encoder blocks, e.g. 17-32 (default all)"
    )
    parser.add_argument(
        "--positions",
        choices=POSITIONS,
        default=None,
        help="Med-SA adapter positions",
    )
    parser.add_argument(
        "--sd-trans", action="store_true", help="Med-SA: add the SD-Trans depth branch"
    )
    parser.add_argument("--sd-fusion", choices=SD_FUSIONS, default=None)
    parser.add_argument(
        "--prompt-conditioning",
        choices=PROMPT_CONDITIONINGS,
        default=None,
        help="Med-SA decoder HyP-Adpt mode",
    )
    parser.add_argument(
        "--no-decoder-adapters", action="store_true", help="Med-SA: encoder adapters only"
    )
    parser.add_argument(
        "--num-classes", type=int, default=None, help="MA-SAM: add the multi-class decoder head"
    )
    parser.add_argument(
        "--config", default=None, help="YAML method config (overrides --method and options)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _method_dict(args: argparse.Namespace) -> dict[str, Any]:
    d: dict[str, Any] = {"method": args.method}
    if args.rank is not None:
        d["fact_rank" if args.method == "masam" else "rank"] = args.rank
    if args.blocks is not None:
        d["blocks"] = args.blocks
    if args.method == "medsa":
        if args.positions:
            d["positions"] = args.positions
        if args.sd_trans or args.sd_fusion:
            d["sd_trans"] = True
        if args.sd_fusion:
            d["sd_fusion"] = args.sd_fusion
        if args.prompt_conditioning:
            d["prompt_conditioning"] = args.prompt_conditioning
        if args.no_decoder_adapters:
            d["decoder_adapters"] = False
    if args.method == "masam" and args.num_classes is not None:
        d["num_classes"] = args.num_classes
    if args.method in ("full", "zeroshot"):
        d.pop("rank", None)
        d.pop("blocks", None)
    return d


def main(args: argparse.Namespace) -> int:
    import torch

    from medsa.sam.build import build_sam_from_config, get_config

    from .apply import apply_method
    from .config import method_from_dict, method_from_yaml, method_to_dict
    from .params import count_parameters

    cfg = method_from_yaml(args.config) if args.config else method_from_dict(_method_dict(args))
    sam_cfg = get_config(args.backbone)
    with torch.device("meta"):
        model = build_sam_from_config(sam_cfg, name=args.backbone)
        apply_method(model, cfg)
    counts = count_parameters(model)
    if args.json:
        print(
            json.dumps(
                {
                    "backbone": args.backbone,
                    "method": method_to_dict(cfg),
                    "modules": {
                        k: {"total": t, "tunable": u} for k, (t, u) in counts.modules.items()
                    },
                    "adapters": {
                        k: {"total": t, "tunable": u} for k, (t, u) in counts.adapters.items()
                    },
                    "total": counts.total,
                    "tunable": counts.tunable,
                    "pretrained": counts.backbone,
                },
                indent=2,
            )
        )
        return 0
    opts = ", ".join(f"{k}={v}" for k, v in method_to_dict(cfg).items() if k != "method")
    print(f"backbone {args.backbone}, method {cfg.method}" + (f" ({opts})" if opts else ""))
    print(counts.format())
    return 0
