"""End-to-end example: zero-shot LiteMedSAM vs LiteMedSAM + Med-SA adapters on one dataset.

1. ``medsa train`` with ``examples/litemedsam_medsa_kvasir.yaml`` (writes the split it used);
2. evaluate the pre-trained model and the adapted one (best checkpoint) on the held-out *test*
   cases of that split with the same prompt protocols and seeds;
3. print a table and write ``<out_dir>/example_results.json``.

Run from the repository root (CPU, a few minutes)::

    python examples/adapt_litemedsam.py [--config CFG] [--set key=value ...] [--test-cases N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default=str(HERE / "litemedsam_medsa_kvasir.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--protocols", default="1pt,3pt,bbox0.75", help="evaluation protocols (comma-separated)"
    )
    p.add_argument("--seeds", default="0", help="prompt seeds for evaluation (comma-separated)")
    p.add_argument(
        "--test-cases", type=int, default=None, help="evaluate only the first N test cases"
    )
    p.add_argument("--skip-train", action="store_true", help="re-use an existing run's checkpoint")
    args = p.parse_args(argv)

    from medsa.adapters.io import load_adapter
    from medsa.cli import main as medsa_main
    from medsa.engine.config import load_config
    from medsa.engine.evaluate import EvalConfig, evaluate_model
    from medsa.sam import build_sam

    cfg = load_config(args.config, args.overrides)
    out = Path(cfg.train.out_dir)
    t0 = time.time()
    if not args.skip_train:
        cmd = ["train", "--config", args.config, "--overwrite"] + [
            a for o in args.overrides for a in ("--set", o)
        ]
        rc = medsa_main(cmd)
        if rc:
            return rc
    train_s = None if args.skip_train else time.time() - t0
    split = json.loads((out / "splits.json").read_text())
    test = split["test"][: args.test_cases] if args.test_cases else split["test"]
    protocols = args.protocols.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    ecfg = EvalConfig(protocols=tuple(protocols), seeds=tuple(seeds), noc_clicks=0, worst_k=0)

    results = {}
    models = {
        "zero-shot": lambda: build_sam(cfg.model.backbone, checkpoint=cfg.model.checkpoint),
        "Med-SA adapted": lambda: load_adapter(
            build_sam(cfg.model.backbone, checkpoint=cfg.model.checkpoint),
            out / "checkpoints" / "best",
        ),
    }
    for name, make in models.items():
        t = time.time()
        res = evaluate_model(make(), cfg.data.root, case_ids=test, config=ecfg)
        results[name] = {prot: res.mean_dice(prot) for prot in protocols}
        print(
            f"{name}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in results[name].items())
            + f" ({time.time() - t:.0f} s)",
            flush=True,
        )

    lines = [
        "| model | " + " | ".join(f"Dice {p}" for p in protocols) + " |",
        "|---|" + "---|" * len(protocols),
    ]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[p]:.4f}" for p in protocols) + " |")
    table = "\n".join(lines)
    print(f"\n{cfg.data.root}: {len(test)} test cases, seeds {seeds}\n{table}")
    summary = json.loads((out / "train_summary.json").read_text())
    (out / "example_results.json").write_text(
        json.dumps(
            {
                "dataset": cfg.data.root,
                "test_cases": len(test),
                "seeds": seeds,
                "dice": results,
                "train_seconds": train_s,
                "train_summary": summary,
                "config": args.config,
                "overrides": args.overrides,
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
