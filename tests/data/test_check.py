"""`medsa check-data` on deliberately broken datasets (and on the real ones, realdata)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_helpers import DATA, make_folder_dataset, make_nnunet_dataset

from medsa.cli import main as cli_main
from medsa.data.check import check_dataset
from medsa.data.io import Image, write_image


def _problems(report) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for i in report.issues:
        out.setdefault(Path(i["path"]).name, []).append((i["severity"], i["message"]))
    return out


def test_clean_datasets_pass(tmp_path, capsys):
    folder = make_folder_dataset(tmp_path / "f")
    nn = make_nnunet_dataset(tmp_path / "n")
    for root in (folder, nn):
        r = check_dataset(root)
        assert r.n_errors == 0 and r.n_warnings == 0, r.issues
        assert r.n_checked == r.n_cases > 0
    assert cli_main(["check-data", str(nn)]) == 0
    out = capsys.readouterr().out
    assert "0 error(s)" in out and "OK" in out and "RV=1" in out


def test_broken_folder_dataset(tmp_path):
    root = make_folder_dataset(tmp_path / "f", n=5)
    # truncated image, a mask of the wrong size, a non-binary mask, an empty mask, orphans
    p = root / "images" / "c0.jpg"
    p.write_bytes(p.read_bytes()[:100])
    write_image(np.zeros((21, 30), np.uint8), root / "masks" / "c1.png")
    grey = np.zeros((20, 30), np.uint8)
    grey[3:6, 3:6] = 128
    grey[10:12, 10:12] = 255
    write_image(grey, root / "masks" / "c2.png")
    write_image(np.zeros((20, 30), np.uint8), root / "masks_cup" / "c3.png")
    write_image(np.zeros((20, 30), np.uint8), root / "masks" / "lonely.png")
    write_image(np.zeros((20, 30, 3), np.uint8), root / "images" / "unlabelled.png")
    (root / "masks" / "c4.png").write_bytes(b"")
    r = check_dataset(root)
    pr = _problems(r)
    assert any(s == "error" and "c0.jpg" in k for k in pr for s, _ in pr[k])
    assert ("error", "label shape (21, 30) differs from image shape (20, 30)") in pr["c1.png"]
    assert any(s == "warning" and "not binary" in m for s, m in pr["c2.png"])
    assert any(s == "warning" and "empty" in m for s, m in pr["c3.png"])
    assert ("error", "mask has no matching image") in pr["lonely.png"]
    assert ("warning", "image has no mask") in pr["unlabelled.png"]
    assert any(s == "error" and "empty file" in m for s, m in pr["c4.png"])
    assert r.n_errors >= 4


def test_broken_nnunet_dataset_and_json(tmp_path, capsys):
    root = make_nnunet_dataset(tmp_path / "n", n=5)
    geo = Image(np.zeros((6, 10, 12)), spacing=(3.0, 1.0, 1.0))
    # NaN image, undeclared label value, spacing mismatch, origin mismatch, missing channel
    nan = np.zeros((6, 10, 12), np.float32)
    nan[0, 0, 0] = np.nan
    write_image(nan, root / "imagesTr" / "case0_0001.nii.gz", like=geo)
    lab = np.zeros((6, 10, 12), np.uint8)
    lab[2, 2, 2] = 7
    write_image(lab, root / "labelsTr" / "case1.nii.gz", like=geo)
    lab[2, 2, 2] = 1
    write_image(lab, root / "labelsTr" / "case2.nii.gz", spacing=(2.0, 1.0, 1.0))
    write_image(
        lab,
        root / "labelsTr" / "case3.nii.gz",
        like=Image(lab, spacing=(3.0, 1.0, 1.0), origin=(5, 0, 0)),
    )
    (root / "imagesTr" / "case4_0001.nii.gz").unlink()
    r = check_dataset(root)
    pr = _problems(r)
    assert any("NaN" in m for _, m in pr["case0_0001.nii.gz"])
    assert any(s == "error" and "not declared" in m for s, m in pr["case1.nii.gz"])
    assert any(s == "error" and "spacing" in m for s, m in pr["case2.nii.gz"])
    assert any(s == "warning" and "origin" in m for s, m in pr["case3.nii.gz"])
    assert any("missing channel" in m for _, m in pr["case4_0000.nii.gz"])
    out_json = tmp_path / "rep" / "report.json"
    assert cli_main(["check-data", str(root), "--json", str(out_json)]) == 1
    text = capsys.readouterr().out
    assert "FAILED" in text and "case1.nii.gz" in text and "Traceback" not in text
    data = json.loads(out_json.read_text(encoding="utf-8"))
    assert data["n_errors"] == r.n_errors and data["layout"] == "nnunet"
    assert {i["severity"] for i in data["issues"]} == {"error", "warning"}


def test_not_a_dataset_and_bad_dataset_json(tmp_path, capsys):
    assert cli_main(["check-data", str(tmp_path)]) == 1
    assert "unknown dataset layout" in capsys.readouterr().out
    root = make_nnunet_dataset(tmp_path / "n", n=1)
    (root / "dataset.json").write_text('{"labels": {"background": 0}}')
    r = check_dataset(root)
    assert r.n_errors == 1 and "no foreground class" in r.issues[0]["message"]
    assert cli_main(["check-data", str(tmp_path / "missing")]) == 1


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("name", ["Kvasir-SEG", "ACDC"])
def test_real_datasets_have_no_errors(name):
    if not (DATA / name).is_dir():
        pytest.skip("../shared/data not present")
    r = check_dataset(DATA / name)
    assert r.n_checked == r.n_cases > 0
    assert r.n_errors == 0, r.format_table(max_rows=20)


def test_ignore_label_value_is_allowed(tmp_path):
    root = make_nnunet_dataset(tmp_path / "n", n=1)
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    lab = np.zeros((6, 10, 12), np.uint8)
    lab[1, 1, 1], lab[2, 2, 2] = 1, 3
    write_image(lab, root / "labelsTr" / "case0.nii.gz", like=Image(lab, spacing=(3.0, 1.0, 1.0)))
    assert check_dataset(root).n_errors == 1  # 3 is undeclared
    meta["labels"]["ignore"] = 3
    (root / "dataset.json").write_text(json.dumps(meta))
    assert check_dataset(root).n_errors == 0
