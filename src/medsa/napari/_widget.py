"""The medsa dock widget: prompt SAM with napari Points / Shapes layers, masks in a Labels layer.

Layers the widget makes for the chosen image ``<name>`` (same scale, so data coordinates are
voxel indices): ``<name> prompts`` (Points; feature ``positive`` True / False, ``object``),
``<name> boxes`` (Shapes, rectangles; feature ``object``) and ``<name> masks`` (Labels; label k =
object k). Each prompt change re-segments the current slice for the current object. Long work
(loading a model, encoding a volume, encoding a new slice, propagating) runs in a napari worker
thread with the progress bar; the viewer stays responsive and a click that arrives meanwhile is
handled when the worker is done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from medsa.napari._io import SOURCE_KEY, save_labels
from medsa.napari._session import Segmenter, apply_propagation, paint, prompts_by_slice

__all__ = ["MedsaWidget", "BACKBONES"]

BACKBONES = ("lite_medsam", "vit_b", "vit_l", "vit_h", "vit_tiny")
_GREEN, _RED = np.array([0.2, 1.0, 0.2, 1.0]), np.array([1.0, 0.2, 0.2, 1.0])


class _Relay(QObject):
    """Carries progress from a worker thread to the GUI thread (queued signal)."""

    progress = Signal(int, int)


class MedsaWidget(QWidget):
    """Dock widget; ``napari_viewer`` is injected by napari (npe2 ``widgets`` contribution).

    Programmatic use (tests, scripts): :meth:`load_model` / :meth:`set_model`, :meth:`set_image`,
    :meth:`encode`, :meth:`segment_current`, :meth:`propagate`, :meth:`save`; the :attr:`done`
    signal carries the name of each finished job ("model", "encode", "segment", "propagate").
    """

    done = Signal(str)
    failed = Signal(str)

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.model: Any = None
        self.segmenter: Segmenter | None = None
        self.image_layer: Any = None
        self.points: Any = None
        self.shapes: Any = None
        self.labels: Any = None
        self.names: dict[int, str] = {}
        self.worker: Any = None
        self._pending = False
        self._relay = _Relay()
        self._build_ui()
        self._relay.progress.connect(self._on_progress)
        self.viewer.layers.events.inserted.connect(self._refresh_images)
        self.viewer.layers.events.removed.connect(self._refresh_images)
        self._refresh_images()

    # ------------------------------------------------------------------ UI

    def _build_ui(self) -> None:
        lay = QVBoxLayout(self)
        mbox = QGroupBox("model")
        form = QFormLayout(mbox)
        self.backbone = QComboBox()
        self.backbone.addItems(BACKBONES)
        self.checkpoint = QLineEdit()
        self.checkpoint.setPlaceholderText("backbone weights (default: its own)")
        self.adapter = QLineEdit()
        self.adapter.setPlaceholderText("adapter from 'medsa train' (optional)")
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda"])
        self.intensity = QLineEdit("auto")
        self.depth = QSpinBox()
        self.depth.setRange(0, 64)
        self.depth.setSpecialValueText("none")  # 0: slices encoded alone (2D encoders)
        self.depth.setToolTip("SD-Trans / MA-SAM chunk depth (none: slices encoded alone)")
        # the CLI's --random-weights: a backbone without weights is refused unless asked for
        self.random_weights = QCheckBox("allow random weights (meaningless masks; tests only)")
        self.load_btn = QPushButton("Load model")
        self.load_btn.clicked.connect(lambda: self.load_model())
        form.addRow("backbone", self.backbone)
        form.addRow("checkpoint", self._with_browse(self.checkpoint))
        form.addRow("adapter", self._with_browse(self.adapter))
        form.addRow("device", self.device)
        form.addRow("intensity", self.intensity)
        form.addRow("depth", self.depth)
        form.addRow(self.random_weights)
        form.addRow(self.load_btn)
        lay.addWidget(mbox)

        ibox = QGroupBox("image")
        iform = QFormLayout(ibox)
        self.image_combo = QComboBox()
        self.image_combo.currentTextChanged.connect(self._on_image_chosen)
        self.encode_btn = QPushButton("Encode volume")
        self.encode_btn.clicked.connect(lambda: self.encode())
        iform.addRow("layer", self.image_combo)
        iform.addRow(self.encode_btn)
        lay.addWidget(ibox)

        obox = QGroupBox("object")
        oform = QFormLayout(obox)
        self.obj = QSpinBox()
        self.obj.setRange(1, 65535)
        self.obj.valueChanged.connect(self._on_object_changed)
        self.new_obj_btn = QPushButton("New object")
        self.new_obj_btn.clicked.connect(self.new_object)
        self.obj_name = QLineEdit("object 1")
        self.obj_name.textEdited.connect(self._on_name_edited)
        row = QHBoxLayout()
        row.addWidget(self.obj)
        row.addWidget(self.new_obj_btn)
        oform.addRow("label", row)
        oform.addRow("name", self.obj_name)
        self.positive = QRadioButton("positive")
        self.negative = QRadioButton("negative")
        self.positive.setChecked(True)
        self.positive.toggled.connect(self._on_polarity)
        prow = QHBoxLayout()
        prow.addWidget(self.positive)
        prow.addWidget(self.negative)
        oform.addRow("points", prow)
        self.auto = QCheckBox("segment after each prompt")
        self.auto.setChecked(True)
        oform.addRow(self.auto)
        self.segment_btn = QPushButton("Segment slice")
        self.segment_btn.clicked.connect(lambda: self.segment_current())
        self.min_score = QDoubleSpinBox()
        self.min_score.setRange(0.0, 1.0)
        self.min_score.setSingleStep(0.05)
        self.min_score.setValue(0.5)
        self.min_score.setSpecialValueText("off")  # 0: only an empty / tiny mask ends the object
        self.min_score.setToolTip("propagation stops at a slice whose predicted IoU is lower")
        oform.addRow("stop below IoU", self.min_score)
        self.propagate_btn = QPushButton("Propagate through volume")
        self.propagate_btn.clicked.connect(lambda: self.propagate())
        oform.addRow(self.segment_btn)
        oform.addRow(self.propagate_btn)
        lay.addWidget(obox)

        self.save_btn = QPushButton("Save masks...")
        self.save_btn.clicked.connect(lambda: self.save())
        lay.addWidget(self.save_btn)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        lay.addWidget(self.progress)
        self.status = QLabel("load a model, choose an image, then click or draw a box")
        self.status.setWordWrap(True)
        lay.addWidget(self.status)
        lay.addStretch(1)

    def _with_browse(self, edit: QLineEdit) -> QWidget:
        w = QWidget()
        h = QHBoxLayout(w)
        h.setContentsMargins(0, 0, 0, 0)
        h.addWidget(edit)
        b = QPushButton("...")
        b.setMaximumWidth(30)
        b.clicked.connect(lambda: edit.setText(QFileDialog.getOpenFileName(self)[0] or edit.text()))
        h.addWidget(b)
        return w

    def _say(self, text: str) -> None:
        self.status.setText(text)

    # ------------------------------------------------------------------ workers

    @property
    def busy(self) -> bool:
        return self.worker is not None

    def _run(self, job: str, fn: Any, on_result: Any, *args: Any) -> Any:
        """Run ``fn(*args, progress)`` in a napari worker thread; ``on_result(value)`` in the GUI."""
        from napari.qt.threading import create_worker

        relay = self._relay.progress

        def work() -> Any:
            return fn(*args, lambda done, total: relay.emit(int(done), int(total)))

        self.progress.setRange(0, 0)  # busy until the first progress report
        w = create_worker(work, _start_thread=False)
        w.returned.connect(lambda value: self._finish(job, on_result, value))
        w.errored.connect(lambda exc: self._fail(job, exc))
        self.worker = w
        self._set_enabled(False)
        self._say(f"{job}...")
        w.start()
        return w

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done)

    def _finish(self, job: str, on_result: Any, value: Any) -> None:
        self.worker = None
        self._set_enabled(True)
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        try:
            on_result(value)
        except Exception as e:  # a result that cannot be shown is reported, not raised in Qt
            self._fail(job, e)
            return
        self.done.emit(job)
        if self._pending:
            self._pending = False
            self.segment_current()

    def _fail(self, job: str, exc: BaseException) -> None:
        self.worker = None
        self._set_enabled(True)
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        msg = f"{job} failed: {exc}"
        self._say(msg)
        self.failed.emit(msg)

    def _set_enabled(self, on: bool) -> None:
        for b in (self.load_btn, self.encode_btn, self.propagate_btn, self.save_btn):
            b.setEnabled(on)

    # ------------------------------------------------------------------ model

    def load_model(self) -> Any:
        """Build backbone + checkpoint + adapter (``medsa.engine.model_loading.load_model``, which
        refuses a backbone without weights unless "allow random weights" is checked) in a worker."""
        from medsa.engine.model_loading import load_model
        from medsa.engine.perf import resolve_device

        ck = Path(self.checkpoint.text()) if self.checkpoint.text().strip() else None
        ad = Path(self.adapter.text()) if self.adapter.text().strip() else None
        name, device = self.backbone.currentText(), self.device.currentText()
        random_weights = self.random_weights.isChecked()

        def build(progress: Any) -> Any:
            import torch

            torch.manual_seed(0)  # a random-init backbone (vit_tiny tests) is reproducible
            return load_model(name, ck, ad, resolve_device(device), random_weights=random_weights)

        return self._run("model", build, self.set_model)

    def set_model(self, model: Any) -> None:
        """Use ``model`` (a medsa ``Sam``); drops cached embeddings."""
        self.model = model
        self._reset_segmenter()
        self._say(f"model ready ({self.backbone.currentText()})")

    # ------------------------------------------------------------------ image and layers

    def _image_layers(self) -> list[Any]:
        from napari.layers import Image

        return [ly for ly in self.viewer.layers if isinstance(ly, Image)]

    def _refresh_images(self, *_: Any) -> None:
        names = [ly.name for ly in self._image_layers()]
        current = self.image_combo.currentText()
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        self.image_combo.blockSignals(False)
        if self.image_combo.currentText() != (self.image_layer.name if self.image_layer else ""):
            self._on_image_chosen(self.image_combo.currentText())

    def _on_image_chosen(self, name: str) -> None:
        layer = next((ly for ly in self._image_layers() if ly.name == name), None)
        if layer is not None and layer is not self.image_layer:
            self.set_image(layer)

    def _geometry(self, layer: Any) -> tuple[int, tuple[int, ...], tuple[float, ...]]:
        """``(spatial_ndim, spatial shape, spatial scale)`` of an image layer."""
        src = layer.metadata.get(SOURCE_KEY)
        data = layer.data
        if src is not None:
            n = int(src.spatial_ndim)
        elif layer.rgb or data.ndim == 2:
            n = 2
        else:
            n = 3
        shape = tuple(int(s) for s in (data.shape[:2] if layer.rgb else data.shape[-n:]))
        scale = tuple(float(s) for s in (layer.scale[:2] if layer.rgb else layer.scale[-n:]))
        return n, shape, scale

    def set_image(self, layer: Any) -> None:
        """Segment on ``layer``: (re)uses its prompt / box / mask layers, drops old embeddings."""
        self.image_layer = layer
        self._reset_segmenter()
        n, shape, scale = self._geometry(layer)
        base = layer.name
        self.labels = self._layer(f"{base} masks", "labels", shape, scale)
        self.labels.metadata[SOURCE_KEY] = layer.metadata.get(SOURCE_KEY)
        self.labels.metadata["medsa_names"] = self.names
        self.points = self._layer(f"{base} prompts", "points", shape, scale)
        self.shapes = self._layer(f"{base} boxes", "shapes", shape, scale)
        self.encode_btn.setEnabled(n == 3)
        self.propagate_btn.setEnabled(n == 3)
        self._on_object_changed(self.obj.value())
        self.viewer.layers.selection.active = self.points

    def _layer(self, name: str, kind: str, shape: tuple[int, ...], scale: tuple[float, ...]) -> Any:
        if name in self.viewer.layers:
            return self.viewer.layers[name]
        n = len(shape)
        if kind == "labels":
            return self.viewer.add_labels(np.zeros(shape, np.uint16), name=name, scale=scale)
        if kind == "points":
            ly = self.viewer.add_points(
                np.zeros((0, n)), name=name, scale=scale, ndim=n, size=max(shape[-1] / 60, 2),
                features={"positive": np.zeros(0, bool), "object": np.zeros(0, int)},
            )  # fmt: skip
            ly.events.data.connect(self._on_prompt_event)
            return ly
        ly = self.viewer.add_shapes(
            name=name, scale=scale, ndim=n, face_color="transparent", edge_color="yellow",
            edge_width=max(shape[-1] / 200, 1), features={"object": np.zeros(0, int)},
        )  # fmt: skip
        ly.mode = "add_rectangle"
        ly.events.data.connect(self._on_prompt_event)
        return ly

    def _reset_segmenter(self) -> None:
        if self.segmenter is not None:
            self.segmenter.close()
        self.segmenter = None

    def _ensure_segmenter(self) -> Segmenter:
        from medsa.errors import PromptError

        if self.model is None:
            raise PromptError("load a model first")
        if self.image_layer is None:
            raise PromptError("open an image first")
        if self.segmenter is None:
            n, _, _ = self._geometry(self.image_layer)
            data = np.asarray(self.image_layer.data)
            self.segmenter = Segmenter(
                self.model, data, n, intensity=self.intensity.text().strip() or "auto",
                depth=self.depth.value() or None,
            )  # fmt: skip
        return self.segmenter

    # ------------------------------------------------------------------ objects and prompts

    def new_object(self) -> int:
        """Switch to a fresh label: one more than the largest used."""
        used = int(self.labels.data.max()) if self.labels is not None else 0
        k = max([used, self.obj.value(), *self.names]) + 1
        self.obj.setValue(k)
        return k

    def _on_object_changed(self, k: int) -> None:
        self.obj_name.setText(self.names.get(k, f"object {k}"))
        if self.labels is not None:
            self.labels.selected_label = k
        for ly in (self.points, self.shapes):
            if ly is not None:
                ly.feature_defaults["object"] = k
        self._on_polarity()

    def _on_name_edited(self, text: str) -> None:
        self.names[self.obj.value()] = text

    def _on_polarity(self, *_: Any) -> None:
        if self.points is not None:
            pos = self.positive.isChecked()
            self.points.feature_defaults["positive"] = pos
            self.points.current_face_color = "lime" if pos else "red"

    def current_slice(self) -> int:
        """The slice shown in the viewer (data index of the image layer's z axis; 0 in 2D)."""
        n, shape, _ = self._geometry(self.image_layer)
        if n == 2:
            return 0
        coords = self.image_layer.world_to_data(self.viewer.dims.point)
        return int(np.clip(round(float(coords[-3])), 0, shape[0] - 1))

    def prompts(self, obj: int | None = None) -> dict[int, Any]:
        """``{z: Prompt}`` of object ``obj`` (default: current) from the Points / Shapes layers."""
        obj = self.obj.value() if obj is None else obj
        _, shape, _ = self._geometry(self.image_layer)
        pf, sf = self.points.features, self.shapes.features
        return prompts_by_slice(
            self.points.data, list(pf["positive"]), list(pf["object"]),
            list(self.shapes.data), list(sf["object"]), shape, obj,
        )  # fmt: skip

    def _on_prompt_event(self, event: Any) -> None:
        if getattr(event, "action", "added") in ("adding", "removing", "changing"):
            return  # napari announces a change before making it
        self._color_points()
        if self.auto.isChecked() and self.model is not None:
            self.segment_current()

    def _color_points(self) -> None:
        if self.points is None or not len(self.points.data):
            return
        pos = np.asarray(self.points.features["positive"], bool)
        self.points.face_color = np.where(pos[:, None], _GREEN, _RED)

    # ------------------------------------------------------------------ segmentation

    def encode(self) -> Any:
        """Encode every slice of the volume in a worker (then every click is decoder-only)."""
        try:
            seg = self._ensure_segmenter()
        except Exception as e:
            self._say(str(e))
            return None
        if self.busy:
            self._say("busy: wait for the running job")
            return None
        return self._run("encode", lambda progress: seg.embed(None, progress), lambda _: None)

    def segment_current(self, z: int | None = None) -> Any:
        """Segment the current object on slice ``z`` (default: the slice shown) from its prompts.

        Decoder-only (in the GUI thread) if the slice is already encoded, else in a worker.
        Returns the worker, or None when done synchronously / nothing to do.
        """
        if self.busy:
            self._pending = True  # handled when the running job ends
            return None
        try:
            seg = self._ensure_segmenter()
        except Exception as e:
            self._say(str(e))
            return None
        z = self.current_slice() if z is None else int(z)
        obj = self.obj.value()
        prompt = self.prompts(obj).get(z)
        if prompt is None or prompt.empty:
            self._paint_slice(z, None, obj)  # its prompts were removed
            self.done.emit("segment")
            return None
        if seg.is_embedded(z):
            mask, score = seg.segment(z, prompt)
            self._paint_slice(z, mask, obj, score)
            self.done.emit("segment")
            return None
        return self._run(
            "segment",
            lambda progress: seg.segment(z, prompt),
            lambda r: self._paint_slice(z, r[0], obj, r[1]),
        )

    def _paint_slice(self, z: int, mask: np.ndarray | None, obj: int, score: float = 0.0) -> None:
        lab = self.labels.data
        target = lab if lab.ndim == 2 else lab[z]
        paint(target, np.zeros(target.shape, bool) if mask is None else mask, obj)
        self.labels.refresh()
        if mask is not None:
            self._say(f"object {obj}, slice {z}: {int(mask.sum())} px, predicted IoU {score:.2f}")

    def propagate(self) -> Any:
        """Propagate the current object from its prompted key slices through the volume."""
        if self.busy:
            self._say("busy: wait for the running job")
            return None
        try:
            seg = self._ensure_segmenter()
        except Exception as e:
            self._say(str(e))
            return None
        obj = self.obj.value()
        keys = self.prompts(obj)
        if not seg.is_3d or not keys:
            self._say("propagation needs a volume and a prompt on at least one slice")
            return None

        def show(res: Any) -> None:
            apply_propagation(self.labels.data, res.masks, obj)
            self.labels.refresh()
            rng = res.z_range
            self._say(f"object {obj}: slices {rng[0]}..{rng[1]}" if rng else "object not found")

        min_score = float(self.min_score.value()) or -np.inf
        return self._run(
            "propagate",
            lambda progress: seg.propagate(keys, progress, min_score=min_score),
            show,
        )

    # ------------------------------------------------------------------ saving

    def save(self, path: str | Path | None = None) -> list[Path]:
        """Save the masks with the source geometry (``.dcm``: DICOM-SEG, DICOM sources only)."""
        if self.labels is None:
            self._say("nothing to save")
            return []
        src = self.labels.metadata.get(SOURCE_KEY)
        if path is None:
            stem = self.image_layer.name if self.image_layer is not None else "masks"
            default = (
                f"{stem}_seg.dcm"
                if getattr(src, "format", "") == "dicom"
                else f"{stem}_mask.nii.gz"
            )
            path, _ = QFileDialog.getSaveFileName(self, "Save masks", default)
            if not path:
                return []
        values = [int(k) for k in np.unique(self.labels.data) if k]
        names = {k: self.names.get(k, f"object {k}") for k in values}
        try:
            written = save_labels(self.labels.data, path, src, names, self.labels.scale)
        except Exception as e:
            self._fail("save", e)
            return []
        self._say("saved " + ", ".join(str(w) for w in written))
        return written
