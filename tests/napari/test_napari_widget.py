"""The medsa dock widget end to end in a headless napari (tiny random-weight model).

Open a NIfTI volume through the plugin's reader, draw a box on one slice, get a mask in the
Labels layer, click on it (decoder only: the slice is cached), propagate through the volume in a
worker thread, add a second object, save, and reload the file with the source's geometry.
Set ``MEDSA_DOCS_SCREENSHOT=1`` to also write docs/images/napari.png (the docs' one was made with
``MEDSA_NAPARI_BACKBONE=lite_medsam``, the pretrained LiteMedSAM, instead of the random tiny model).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medsa.data.io import Image, read_image, write_image

DOCS_PNG = Path(__file__).resolve().parents[2] / "docs" / "images" / "napari.png"
SPACING = (2.5, 0.8, 0.7)


def _phantom(tmp_path: Path) -> Path:
    """A (8, 64, 80) volume with a bright ellipsoid, non-trivial geometry."""
    d, h, w = 8, 64, 80
    z, y, x = np.mgrid[:d, :h, :w]
    blob = ((z - 4) / 3.5) ** 2 + ((y - 30) / 14) ** 2 + ((x - 38) / 18) ** 2 < 1
    rng = np.random.default_rng(0)
    vol = (blob * 300 + rng.normal(0, 20, (d, h, w)) - 100).astype(np.float32)
    img = Image(
        vol, spacing=SPACING, origin=(10.0, -5.0, 3.0),
        direction=np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]]),
    )  # fmt: skip
    return write_image(img, tmp_path / "phantom.nii.gz")


def _wait(qtbot, widget, job: str, start) -> None:
    """Run ``start()`` and wait until the widget reports ``job`` done (fail on an error)."""
    errors: list[str] = []
    done: list[str] = []
    widget.failed.connect(errors.append)
    widget.done.connect(done.append)
    start()
    # a failure ends the wait at once (with its message) instead of running into the timeout
    qtbot.waitUntil(lambda: job in done or bool(errors), timeout=300_000)
    widget.failed.disconnect(errors.append)
    widget.done.disconnect(done.append)
    assert not errors, errors


def _box(z: int, r0: float, c0: float, r1: float, c1: float) -> np.ndarray:
    return np.array([[z, r0, c0], [z, r0, c1], [z, r1, c1], [z, r1, c0]], float)


def test_widget_segments_propagates_and_saves_with_the_source_geometry(
    viewer, qtbot, tmp_path: Path, one_thread
):
    from qtpy.QtCore import QTimer

    path = _phantom(tmp_path)
    [image] = viewer.open(str(path), plugin="medsa")
    np.testing.assert_allclose(image.scale, SPACING, rtol=1e-6)  # physical scale = spacing
    assert image.metadata["medsa_source"].format == "nifti"

    _, widget = viewer.window.add_plugin_dock_widget("medsa", "Segment")
    assert widget.image_layer is image
    assert widget.labels.data.shape == (8, 64, 80)
    np.testing.assert_allclose(widget.points.scale, SPACING, rtol=1e-6)
    widget.backbone.setCurrentText(os.environ.get("MEDSA_NAPARI_BACKBONE", "vit_tiny"))
    widget.device.setCurrentText("cpu")
    widget.random_weights.setChecked(os.environ.get("MEDSA_NAPARI_BACKBONE") is None)
    _wait(qtbot, widget, "model", widget.load_model)

    viewer.dims.set_point(0, 4 * SPACING[0])  # world z of slice 4
    assert widget.current_slice() == 4
    seg = widget._ensure_segmenter()
    assert not seg.is_embedded(4)
    # drawing a box segments the slice at once; the slice is not encoded yet -> worker thread
    _wait(qtbot, widget, "segment", lambda: widget.shapes.add_rectangles(_box(4, 16, 20, 46, 58)))
    lab = widget.labels.data
    assert lab[4].any() and set(np.unique(lab)) == {0, 1}
    assert not lab[[0, 1, 2, 3, 5, 6, 7]].any()
    assert seg.is_embedded(4)

    # a click on the now cached slice is decoded synchronously: no worker, and fast
    widget.positive.setChecked(True)
    n_encoded = seg.prop.n_encoded
    widget.points.add(np.array([[4, 30, 38]], float))
    assert widget.worker is None and lab[4].any()
    assert seg.prop.n_encoded == n_encoded  # no encoder pass for a click on a cached slice
    assert list(widget.points.features["positive"]) == [True]
    assert list(widget.points.features["object"]) == [1]
    prompt = widget.prompts()[4]
    np.testing.assert_allclose(prompt.points, [[38, 30]])  # (x = col, y = row)
    np.testing.assert_allclose(prompt.box, [20, 16, 58, 46])

    # propagation runs in a worker: progress arrives and the event loop keeps running meanwhile
    ticks, progress = [], []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(5)
    widget._relay.progress.connect(lambda d, t: progress.append((d, t)))
    widget.min_score.setValue(0.0)  # "off": random weights predict IoUs < 0, stop on empty only
    _wait(qtbot, widget, "propagate", widget.propagate)
    timer.stop()
    assert len(progress) >= 2 and progress[-1][0] == progress[-1][1]
    assert ticks, "the GUI event loop did not run during propagation"
    assert widget.progress.value() == widget.progress.maximum()
    propagated = np.flatnonzero(lab.reshape(8, -1).any(1))
    assert 4 in propagated and len(propagated) >= 2
    assert seg.prop.embedded >= set(propagated.tolist())

    # a second object gets its own label and keeps the first intact
    first = lab == 1
    assert widget.new_object() == 2
    widget.obj_name.setText("second")
    widget.obj_name.textEdited.emit("second")
    _wait(qtbot, widget, "segment", lambda: widget.shapes.add_rectangles(_box(4, 2, 2, 14, 20)))
    assert (lab == 2).any() and list(widget.shapes.features["object"]) == [1, 2]
    np.testing.assert_array_equal(lab == 1, first)
    assert widget.names == {2: "second"}

    # save and reload: identical data and geometry
    [saved] = widget.save(tmp_path / "out" / "phantom_mask.nii.gz")
    src, back = read_image(path), read_image(saved)
    np.testing.assert_array_equal(back.array, lab)
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-6)
    np.testing.assert_allclose(back.spacing, src.spacing, rtol=1e-6)
    np.testing.assert_allclose(back.origin, src.origin, atol=1e-6)
    np.testing.assert_allclose(back.direction, src.direction, atol=1e-6)

    viewer.window._qt_window.resize(1500, 900)
    viewer.layers.selection.active = widget.labels
    viewer.reset_view()
    shot = viewer.screenshot(str(tmp_path / "napari.png"), canvas_only=False, flash=False)
    assert shot.shape[0] > 300 and shot.shape[1] > 500
    if os.environ.get("MEDSA_DOCS_SCREENSHOT") == "1":
        DOCS_PNG.parent.mkdir(parents=True, exist_ok=True)
        viewer.screenshot(str(DOCS_PNG), canvas_only=False, flash=False)


def test_widget_on_a_2d_image_and_napari_save_through_the_plugin_writer(
    viewer, qtbot, tmp_path: Path, one_thread
):
    import napari
    import torch

    from medsa.sam import build_sam

    rng = np.random.default_rng(1)
    rgb = (rng.random((48, 64, 3)) * 60).astype(np.uint8)
    rgb[10:30, 20:50] += 150
    path = write_image(rgb, tmp_path / "photo.png")
    [image] = viewer.open(str(path), plugin="medsa")
    assert image.rgb
    _, widget = viewer.window.add_plugin_dock_widget("medsa", "Segment")
    assert widget.labels.data.shape == (48, 64) and not widget.propagate_btn.isEnabled()
    torch.manual_seed(0)
    widget.set_model(build_sam("vit_tiny").eval())
    box = np.array([[8, 18], [8, 52], [32, 52], [32, 18]], float)  # (row, col) vertices
    _wait(qtbot, widget, "segment", lambda: widget.shapes.add_rectangles(box))
    np.testing.assert_allclose(widget.prompts()[0].box, [18, 8, 52, 32])
    assert widget.labels.data.any() and widget.segmenter.is_embedded(0)
    # napari's own "save layer" goes through the plugin's writer (manifest 'writers')
    out = tmp_path / "photo_mask.png"
    written = napari.save_layers(str(out), [widget.labels], plugin="medsa")
    assert [Path(w) for w in written] == [out]
    np.testing.assert_array_equal(read_image(out).array, widget.labels.data)
