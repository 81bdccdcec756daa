"""How much the paper's 3D grid costs by itself: labels resized to ``--size`` and back.

Each class's binary label volume is resized to the model grid (nearest, as ``data.resize_to``
does in training) and back to its own grid (nearest, as ``medsa evaluate`` / ``medsa predict`` do
with predictions); the Dice against the original label is the best any model on that grid can
reach. Usage (ACDC needs its class names, it has no dataset.json)::

    python examples/resize_roundtrip.py ../shared/data/ACDC --classes RV=1,MYO=2,LV=3 --cases 40
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from medsa.data.datasets import load_dataset
from medsa.data.preprocess import resize_spatial, resized_shape, resized_spacing
from medsa.engine.metrics import dice


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="3D dataset folder")
    p.add_argument("--size", default="128,128,128", help="resize_to, D,H,W or H,W")
    p.add_argument("--classes", help="NAME=VALUE,... for datasets without dataset.json")
    p.add_argument("--cases", type=int, default=20, help="first N cases")
    a = p.parse_args()
    size = tuple(int(v) for v in a.size.split(","))
    classes = None
    if a.classes:
        classes = {k: int(v) for k, v in (kv.split("=") for kv in a.classes.split(","))}
    info = load_dataset(a.data, classes=classes)
    scores: dict[str, list[float]] = {c: [] for c in info.classes}
    t0 = time.time()
    first = None
    for case in info.cases[: a.cases]:
        img, targets = info.load_case(case)
        grid = resized_shape(img.spatial_shape, size)
        if first is None:
            sp = resized_spacing(img.spacing, img.spatial_shape, grid)
            first = (
                f"{case.id}: {img.spatial_shape} at {img.spacing} mm -> {grid} at "
                + ", ".join(f"{s:.3g}" for s in sp)
                + " mm"
            )
        for c, t in targets.items():
            if t.any():
                back = resize_spatial(resize_spatial(t, grid, kind="label"), t.shape, kind="label")
                scores[c].append(dice(back, t))
    print(f"{min(a.cases, len(info.cases))} cases in {time.time() - t0:.0f} s; e.g. {first}")
    for c, v in scores.items():
        if v:
            print(f"{c}: Dice after the {a.size} round trip: mean {np.mean(v):.3f}, "
                  f"min {np.min(v):.3f} (n={len(v)})")  # fmt: skip


if __name__ == "__main__":
    main()
