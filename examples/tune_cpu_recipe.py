"""CPU recipe tuning on the train / validation split of ONE 2D dataset (never its test split).

For each candidate recipe, Med-SA is trained on LiteMedSAM for ``--steps`` optimizer steps
(one cosine schedule over the whole run) and evaluated on the first ``--val-cases``
*validation* cases under 1pt / 3pt / bbox0.75 at the checkpoints ``--at`` (step 0 is zero-shot).
Training and evaluation use ``medsa.engine.train`` and ``evaluate_model``. Results go to
``<out>/<recipe>.json`` after every checkpoint, so a partial run is still readable.

The ``preset_*`` recipes are the ``medsa reproduce --preset cpu`` cell of a method (``--method``,
default ``medsa-hyp``: the same config ``reproduce`` trains) with one change each; the recipes
share one frozen-prefix cache, so only the first computes the frozen encoder blocks.

    nice -n 10 python examples/tune_cpu_recipe.py --data ../shared/data/BUSI --out runs/tune_cpu
    python examples/tune_cpu_recipe.py --data ../shared/data/Kvasir-SEG --out runs/tune_kvasir \
        --recipes preset,preset_lr3e-3,preset_1pt-heavy --steps 80 --at 0,40,80
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

#: recipe name -> --set overrides on top of the packaged lite_medsam_medsa_2d config
RECIPES: dict[str, list[str]] = {
    "points_lr1e-3": ["prompts.protocols={1pt: 0.5, 3pt: 0.5}", "optim.lr=1.0e-3"],
    "mixed_lr1e-3": ["prompts.protocols={1pt: 0.4, 3pt: 0.3, bbox0.75: 0.3}", "optim.lr=1.0e-3"],
    "mixed_lr3e-3": ["prompts.protocols={1pt: 0.4, 3pt: 0.3, bbox0.75: 0.3}", "optim.lr=3.0e-3"],
    # the reproduce cpu preset (its overrides and --method's config), then one change
    "preset": [],
    "preset_lr3e-3": ["optim.lr=3.0e-3"],
    "preset_1pt-heavy": ["prompts.protocols={1pt: 0.6, 3pt: 0.2, bbox0.75: 0.2}"],
    # "method.<field>=<value>" changes the method section that reproduce builds for the cell
    "preset_decoder-rank64": ["method.decoder_rank=64"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="runs/tune_cpu")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--steps", type=int, default=96)
    p.add_argument("--at", default="0,24,48,96", help="steps at which to evaluate")
    p.add_argument("--val-cases", type=int, default=24)
    p.add_argument("--method", default="medsa-hyp", help="reproduce method of preset_* recipes")
    p.add_argument("--blocks", help="encoder blocks with adapters in preset_* recipes (1-based, "
                   "e.g. 5-10; default: the preset's); one frozen-prefix cache per run")  # fmt: skip
    args = p.parse_args(argv)

    import torch
    import yaml

    from medsa.data.datasets import load_dataset
    from medsa.engine.config import load_config
    from medsa.engine.evaluate import EvalConfig, evaluate_model
    from medsa.engine.reproduce import PRESETS, ReproduceSpec, cell_train_config, new_prefix_cache
    from medsa.engine.train import Trainer, build_datasets, build_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    at = sorted({int(s) for s in args.at.split(",")})
    protocols = ("1pt", "3pt", "bbox0.75")
    ecfg = EvalConfig(protocols=protocols, seeds=(0,), noc_clicks=0, worst_k=0)
    info = load_dataset(args.data)
    root = Path(args.data)
    preset = dataclasses.replace(PRESETS["cpu"], steps=args.steps)
    if args.blocks:
        preset = dataclasses.replace(preset, blocks=args.blocks)
    cache = new_prefix_cache(ReproduceSpec(preset, [root], [args.method], out=out))
    for name in args.recipes.split(","):
        if name.startswith("preset"):  # exactly reproduce's cell, with the recipe's overrides
            sets = RECIPES[name]
            method_sets = dict(m.removeprefix("method.").split("=", 1) for m in sets
                               if m.startswith("method."))  # fmt: skip
            config_sets = [m for m in sets if not m.startswith("method.")]
            spec = ReproduceSpec(preset, [root], [args.method], out=out, overrides=config_sets)
            cfg = cell_train_config(spec, root, args.method, 0, out / name, info)
            if method_sets:  # replace() validates the changed method section
                changed = {k: yaml.safe_load(v) for k, v in method_sets.items()}
                cfg = dataclasses.replace(cfg, method={**cfg.method, **changed})
        else:
            sets = [*RECIPES[name], "train.batch_size=2", "prompts.clicks=1",
                    "optim.warmup_steps=5", "train.val_every=0", "logging.tensorboard=false",
                    "logging.progress=false", f"data.root={args.data}",
                    f"train.max_steps={args.steps}", f"train.out_dir={out / name}"]  # fmt: skip
            cfg = load_config("lite_medsam_medsa_2d", sets)
        torch.manual_seed(0)
        model = build_model(cfg)
        train_set, _, split = build_datasets(cfg, model)
        val = split["val"][: args.val_cases]
        assert not set(val) & set(split["test"])
        tr = Trainer(cfg, train_set, None, model=model, prefix_cache=cache)
        rec = {"recipe": name, "overrides": sets, "method": cfg.method, "val_cases": val,
               "blocks": preset.blocks, "curve": []}  # fmt: skip
        t0 = time.time()
        for s in at:
            if s > tr.step:
                tr.fit(stop_at_step=s)
            res = evaluate_model(tr.model, info, case_ids=val, config=ecfg)
            rec["curve"].append({"step": tr.step, "seconds": round(time.time() - t0, 1),
                                 **{pr: round(res.mean_dice(pr), 4) for pr in protocols}})  # fmt: skip
            tr.model.train()
            (out / f"{name}.json").write_text(json.dumps(rec, indent=2) + "\n")
            print(name, rec["curve"][-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
