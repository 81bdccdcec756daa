"""End to end in headless Chromium: open an image, click, see the mask, save it (real medsa SAM)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import BrightPredictor

CHROMIUM = Path("/usr/bin/chromium")
KVASIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "Kvasir-SEG" / "images"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path("/tmp/medsa_serve_e2e.png")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium"),
]


@pytest.fixture
def browser_page():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 820})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        yield page, errors
        browser.close()


def _drag(page, box, f0, f1):
    page.mouse.move(box["x"] + box["width"] * f0[0], box["y"] + box["height"] * f0[1])
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * f1[0], box["y"] + box["height"] * f1[1], steps=6)
    page.mouse.up()


def test_click_mask_save_2d_and_3d(browser_page, make_app, roots):
    from PIL import Image
    from playwright.sync_api import expect

    from medsa.serve.server import ServerThread

    page, errors = browser_page
    # A real endoscopy image when the shared data is there, else the synthetic fixture image.
    kvasir = sorted(KVASIR.glob("*.jpg"))[:1] if KVASIR.is_dir() else []
    if kvasir:
        shutil.copy(kvasir[0], roots["root"] / kvasir[0].name)
        name = kvasir[0].name
    else:
        name = "rgb.png"
    with Image.open(roots["root"] / name) as im:
        width, height = im.size
    stem = name.rsplit(".", 1)[0]

    app = make_app()
    # Propagation uses the stub that follows the fixture's bright block (the random-weight tiny
    # model has no notion of an object); clicks use the real model.
    app.state.service.propagators.model = BrightPredictor()
    with ServerThread(app) as server:
        page.goto(server.url + "/")
        expect(page.locator("#model")).to_contain_text("vit_tiny")
        page.locator("#file-list li", has_text=name).click()
        expect(page.locator("#status")).to_contain_text("click on the image", timeout=20000)
        overlay = page.locator("#overlay")
        assert overlay.evaluate("c => [c.width, c.height]") == [width, height]
        box = overlay.bounding_box()
        assert box is not None and box["width"] > 100

        # positive click -> a mask overlay appears (DOM counter and actual canvas pixels)
        page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
        expect(overlay).not_to_have_attribute("data-mask-pixels", "0", timeout=20000)
        expect(page.locator("#candidates button")).to_have_count(3)  # single click: 3 candidates
        area = int(overlay.get_attribute("data-mask-pixels"))
        painted = overlay.evaluate(
            """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                      let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }"""
        )
        assert painted >= area > 0  # mask pixels plus the click marker

        # negative right-click, a box, then undo the box: the mask follows every prompt
        page.mouse.click(
            box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.1, button="right"
        )
        expect(page.locator("#status")).to_contain_text("cached embedding", timeout=20000)
        _drag(page, box, (0.25, 0.25), (0.75, 0.8))
        expect(page.locator("#candidates button")).to_have_count(0)  # several prompts: one mask
        page.keyboard.press("Control+z")
        expect(page.locator("body")).to_have_attribute("data-pending", "0", timeout=20000)
        expect(page.locator("#candidates button")).to_have_count(0)
        expect(overlay).not_to_have_attribute("data-mask-pixels", "0")
        area = int(overlay.get_attribute("data-mask-pixels"))

        # a file of that name that this session did not write: the page asks before replacing it
        roots["out"].mkdir(exist_ok=True)
        (roots["out"] / f"{stem}_mask.png").write_bytes(b"an older mask")
        dialogs: list[str] = []
        page.once("dialog", lambda d: (dialogs.append(d.message), d.accept()))
        page.locator("#save").click()
        expect(page.locator("body")).to_have_attribute(
            "data-saved", f"{stem}_mask.png", timeout=20000
        )
        assert len(dialogs) == 1 and "already exists" in dialogs[0]
        expect(page.locator("#download")).to_be_visible()
        page.screenshot(path=str(SCREENSHOT))
        saved = roots["out"] / f"{stem}_mask.png"
        mask = np.asarray(Image.open(saved))
        assert mask.shape == (height, width)
        assert int((mask > 0).sum()) == area > 0

        # 3D: browse into the sub-folder, change slice with the keyboard, draw a box, save NIfTI
        page.locator("#file-list li", has_text="sub").click()
        page.locator("#file-list li", has_text="vol.nii.gz").click()
        expect(page.locator("#status")).to_contain_text("click on the image", timeout=20000)
        expect(page.locator("#slice-bar")).to_be_visible()
        expect(page.locator("#slice-label")).to_have_text("slice 3 / 5")
        page.keyboard.press("ArrowUp")
        expect(page.locator("#slice-label")).to_have_text("slice 4 / 5")
        box = overlay.bounding_box()
        _drag(page, box, (0.2, 0.2), (0.8, 0.8))
        expect(page.locator("body")).to_have_attribute("data-pending", "0", timeout=20000)
        expect(overlay).not_to_have_attribute("data-mask-pixels", "0", timeout=20000)
        area3d = int(overlay.get_attribute("data-mask-pixels"))
        page.keyboard.press("s")
        expect(page.locator("body")).to_have_attribute("data-saved", "vol_mask.nii.gz")

        # a second object, named, segmented on the same slice (the box follows the previous
        # mask: feedback) and propagated through the volume
        page.locator("#obj-add").click()
        expect(page.locator("#objects li")).to_have_count(2)
        page.locator("#obj-name").fill("block")
        page.locator("#obj-name").press("Enter")
        expect(page.locator("#objects li.active")).to_contain_text("2: block")
        expect(overlay).to_have_attribute("data-mask-pixels", "0")  # object 2 has no mask yet
        _drag(page, box, (0.2, 0.2), (0.8, 0.8))
        expect(page.locator("body")).to_have_attribute("data-pending", "0", timeout=20000)
        expect(overlay).not_to_have_attribute("data-mask-pixels", "0", timeout=20000)
        page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
        expect(page.locator("body")).to_have_attribute("data-mask-input-used", "true",
                                                       timeout=20000)  # fmt: skip
        expect(page.locator("#propagate")).to_be_visible()
        page.locator("#propagate").click()
        # data-propagated is set when the job's masks are applied (at least one slice added)
        expect(page.locator("body")).to_have_attribute(
            "data-propagated", re.compile(r"^[1-9]\d*$"), timeout=60000
        )
        expect(page.locator("body")).to_have_attribute("data-propagating", "0")
        n_prop = int(page.locator("body").get_attribute("data-propagated"))
        page.screenshot(path=str(SCREENSHOT.with_name("medsa_serve_e2e_3d.png")))
        page.keyboard.press("ArrowDown")
        page.keyboard.press("ArrowDown")
        expect(page.locator("#slice-label")).to_have_text("slice 2 / 5")
        expect(overlay).not_to_have_attribute("data-mask-pixels", "0")  # a propagated mask
        page.keyboard.press("s")
        expect(page.locator("#save-info")).to_contain_text("2 object(s)", timeout=20000)

        # upload from the file picker opens the image too
        page.set_input_files("#upload", str(roots["root"] / "rgb.png"))
        expect(page.locator("#image-name")).to_have_text("rgb.png", timeout=20000)
        expect(page.locator("#slice-bar")).to_be_hidden()

    import nibabel as nib
    from serve_helpers import VOLUME_AFFINE

    nii = nib.load(roots["out"] / "vol_mask.nii.gz")
    np.testing.assert_allclose(nii.affine, VOLUME_AFFINE, atol=1e-5)
    data = np.transpose(np.asarray(nii.dataobj), (2, 1, 0))  # -> (D, H, W)
    # object 1 only on slice index 3 (possibly partly covered by object 2 there)
    assert set(np.unique(data).tolist()) <= {0, 1, 2}
    assert int((data == 1).sum()) <= area3d and int((data[:3] == 1).sum()) == 0
    # object 2: the key slice plus the propagated ones, far from the key slice too
    slices2 = sorted({int(z) for z in np.nonzero(data == 2)[0]})
    assert len(slices2) == n_prop + 1 and 3 in slices2 and min(slices2) <= 1
    side = json.loads((roots["out"] / "vol_mask.labels.json").read_text())
    assert side["labels"] == {"object 1": 1, "block": 2}
    # the browser logs the expected 409 of the first save attempt; nothing else may fail
    assert [e for e in errors if "409 (Conflict)" not in e] == []
