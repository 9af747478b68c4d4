"""The napari dock widget: paint a few slices, fine-tune, predict, measure, save.

The user picks an image layer, a backbone folder (the shipped EM backbone by default) and a
labels layer to paint. Painted value v (1..K) is class v - 1; 0, unpainted, is ignored by the
loss, not background; the slices that hold any paint are the training slices. Training is
ssl_em's own fine-tuning (`ssl_em.finetune.cli.finetune`, `SegmentationModule`, the
backbone's recorded recipe) in a background thread (napari's `thread_worker`): a progress bar,
the live loss, a cancel button, and the viewer stays responsive. Predict runs ssl_em's sliding
window (`predict_plane`) on the current slice or the whole volume into a labels layer that
uses the paint's values (so the paint's colours) at the image's scale, plus a probability
image per class on request; or on the visible region (the part of the current slice the
canvas shows) into layers of the region's size, translated onto it. Save writes the model folder `ssl-em predict` runs, with the paint
beside it (painted_labels.tif, painted_labels.json). Measure turns the prediction into a
labels layer of objects whose features are `ssl-em measure`'s table, in the image's units
(nm for ssl_em archives and predictions). Every error is one line in napari's notifications.

Data shapes: image and labels layers (Z, Y, X) or (Y, X) (taken as Z = 1); the prediction
layer has the labels' shape and dtype.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QProgressBar, QPushButton, QSpinBox,
                            QVBoxLayout, QWidget)

from ssl_em.data.volume import Volume, VoxelSize
from ssl_em.errors import UserError

#: What Predict covers: the slice shown, the part of it the canvas shows, or every slice.
SCOPES = ("current slice", "visible region", "whole volume")

HELP = ("Paint with label 1, 2, ... (label v is class v-1; name them below). Unpainted pixels (0) are ignored, "
        "not background: paint some background as a class too. Slices holding paint are the training slices.")


def default_backbone() -> str:
    """The shipped EM backbone beside the package (a source checkout), else empty."""
    from ssl_em.backbones import SHIPPED_BACKBONE

    return str(SHIPPED_BACKBONE) if (SHIPPED_BACKBONE / "ssl_em.json").is_file() else ""


class LayerVolume(Volume):
    """A napari layer's data (numpy, dask or zarr; level 0 of a multiscale) as a (Z, Y, X)
    Volume read region by region, with the layer's scale as voxel size."""

    def __init__(self, layer) -> None:
        super().__init__()
        data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
        if getattr(layer, "rgb", False) or data.ndim not in (2, 3):
            raise UserError(f"layer {layer.name!r}: shape {tuple(data.shape)}; the widget takes a grey 2D image or a (z, y, x) stack")
        self._data, self._flat = data, data.ndim == 2
        self.shape = (1, *data.shape) if self._flat else tuple(int(s) for s in data.shape)
        self.dtype = np.dtype(data.dtype)
        scale = [float(s) for s in layer.scale[-3:]]
        self.voxel_size = VoxelSize(*([1.0] + scale if self._flat else scale))
        self.voxel_size_known = True
        self.path = f"layer {layer.name!r}"

    def _open(self):
        return self._data

    def _read(self, zs, ys, xs) -> np.ndarray:
        return np.asarray(self._data[ys, xs])[None] if self._flat else np.asarray(self._data[zs, ys, xs])


def painted(labels: np.ndarray, names: list[str]) -> tuple[list[int], list[int], list[str]]:
    """(training slices, label values 1..K, class names) of painted labels (Z, Y, X).
    UserError when nothing, or a single value, is painted, or the names do not fit."""
    slices = [z for z in range(labels.shape[0]) if labels[z].any()]
    if not slices:
        raise UserError("nothing painted: paint a few pixels of every class (label 1, 2, ...) on one or two slices")
    values = np.unique(labels[slices])
    if values.min() < 0:
        raise UserError(f"painted labels hold negative values {values[values < 0][:5].tolist()}; paint with 1, 2, ...")
    k = int(values.max())
    if len(values[values > 0]) < 2:
        raise UserError(f"only label {k} is painted: paint at least two classes (say 1 background, 2 membrane)")
    if names and len(names) != k:
        raise UserError(f"{len(names)} class names {names} but labels 1..{k} painted: give one name per label value")
    return slices, list(range(1, k + 1)), names or [f"label {v}" for v in range(1, k + 1)]


class _Progress(QObject):
    """Training progress from the worker thread; Qt queues it to the widget's thread."""

    step = Signal(int, int, float)  # step, max steps, loss


def _progress_callback(signal: _Progress, stop: threading.Event, max_steps: int):
    import pytorch_lightning as pl

    class Report(pl.Callback):
        """Emit (step, max_steps, loss) after each step; stop the fit when cancelled."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            signal.step.emit(trainer.global_step, max_steps, float(loss.detach()) if loss is not None else float("nan"))
            if stop.is_set():
                trainer.should_stop = True

    return Report()


class FinetuneWidget(QWidget):
    """One dock widget; `napari_viewer` is a napari Viewer (or a ViewerModel in tests)."""

    def __init__(self, napari_viewer, parent=None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.model = None  # the trained SegmentationModule
        self.trained: dict = {}  # what Save records: label values, classes, slices, tile size, stats
        self.worker, self._training = None, False
        self._stop = threading.Event()
        self._progress = _Progress()
        self._progress.step.connect(self._on_step)

        self.image_box, self.labels_box = QComboBox(), QComboBox()
        self.backbone = QLineEdit(default_backbone())
        self.backbone.setPlaceholderText("exported backbone folder (ssl-em export)")
        browse = QPushButton("...")
        browse.clicked.connect(self._browse_backbone)
        self.classes = QLineEdit()
        self.classes.setPlaceholderText("names of labels 1, 2, ... e.g. cytoplasm,membrane")
        self.steps, self.tile = QSpinBox(), QSpinBox()
        self.steps.setRange(1, 100_000)
        self.steps.setValue(200)
        self.tile.setRange(32, 1024)
        self.tile.setSingleStep(32)
        self.tile.setValue(128)
        new_labels = QPushButton("New labels layer to paint")
        new_labels.clicked.connect(self._reported(self.new_labels_layer))
        help_text = QLabel(HELP)
        help_text.setWordWrap(True)

        self.train_button, self.cancel_button = QPushButton("Train"), QPushButton("Cancel")
        self.train_button.clicked.connect(self._reported(self.train))
        self.cancel_button.clicked.connect(self.cancel)
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.loss = QLabel("loss: -")
        self.scope = QComboBox()
        self.scope.addItems(list(SCOPES))
        self.with_probabilities = QCheckBox("probabilities")
        self.predict_button = QPushButton("Predict")
        self.predict_button.clicked.connect(self._reported(lambda: self.predict(self.scope.currentText())))
        self.measure_button, self.save_button = QPushButton("Measure"), QPushButton("Save model...")
        self.measure_button.clicked.connect(self._reported(self.measure))
        self.save_button.clicked.connect(self._reported(self._save_dialog))

        form = QFormLayout()
        form.addRow("image", self.image_box)
        form.addRow("painted labels", self.labels_box)
        row = QHBoxLayout()
        row.addWidget(self.backbone)
        row.addWidget(browse)
        form.addRow("backbone", row)
        form.addRow("class names", self.classes)
        form.addRow("steps", self.steps)
        form.addRow("tile size", self.tile)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(new_labels)
        layout.addWidget(help_text)
        for widgets in ((self.train_button, self.cancel_button), (self.progress, self.loss), (self.scope, self.with_probabilities, self.predict_button),
                        (self.measure_button, self.save_button)):
            row = QHBoxLayout()
            for w in widgets:
                row.addWidget(w)
            layout.addLayout(row)
        layout.addStretch()

        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()

    # -- layers ----------------------------------------------------------------------------------

    def _refresh_layers(self, event=None) -> None:
        for box, kind in ((self.image_box, "Image"), (self.labels_box, "Labels")):
            current = box.currentText()
            names = [layer.name for layer in self.viewer.layers if type(layer).__name__ == kind and not layer.name.endswith((" prediction", " objects"))]
            box.clear()
            box.addItems(names)
            if current in names:
                box.setCurrentText(current)

    def _layer(self, box: QComboBox, what: str):
        name = box.currentText()
        if not name or name not in self.viewer.layers:
            raise UserError(f"choose the {what} layer (none open)" if not name else f"layer {name!r} is gone; choose the {what} layer again")
        return self.viewer.layers[name]

    def new_labels_layer(self):
        """An empty labels layer over the image (same shape, scale and translation) to paint."""
        image = self._layer(self.image_box, "image")
        data = image.data[0] if image.multiscale else image.data
        layer = self.viewer.add_labels(np.zeros(data.shape, np.uint8), name=f"{image.name} paint", scale=image.scale, translate=image.translate)
        self.labels_box.setCurrentText(layer.name)
        return layer

    def _browse_backbone(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Backbone folder", self.backbone.text())
        if folder:
            self.backbone.setText(folder)

    # -- train -----------------------------------------------------------------------------------

    def train(self, steps: int | None = None, **finetune_kwargs):
        """Fine-tune on the painted slices in a background thread; returns the started worker.
        finetune_kwargs go to `ssl_em.finetune.cli.finetune` (tests pass a small batch)."""
        from napari.qt.threading import create_worker

        from ssl_em.finetune.cli import backbone_recipe, finetune

        if self.worker is not None and self.worker.is_running:
            raise UserError("busy: wait for the running job or cancel it")
        image, labels = self._layer(self.image_box, "image"), self._layer(self.labels_box, "painted labels")
        volume = LayerVolume(image)
        paint = np.asarray(labels.data[0] if labels.multiscale else labels.data)
        paint = paint[None] if paint.ndim == 2 else paint
        if paint.shape != volume.shape:
            raise UserError(f"labels {labels.name!r} shape {paint.shape} differs from image {image.name!r} shape {volume.shape}")
        names = [n.strip() for n in self.classes.text().split(",") if n.strip()]
        slices, values, classes = painted(paint, names)
        backbone = self.backbone.text().strip()
        if not backbone:
            raise UserError("backbone: give an exported backbone folder (ssl-em export) or a timm name")
        steps = int(steps or self.steps.value())
        tile = self.tile.value()
        # The settings an exported backbone's scores were measured with, as `ssl-em finetune` applies them.
        recipe = backbone_recipe(backbone, False, {f"model.{k}" for k in finetune_kwargs}) if Path(backbone).is_dir() else {}
        kwargs = {"tile_size": tile, "holdout": 0.0, "accelerator": "cpu" if not _cuda() else "auto"} | recipe | finetune_kwargs
        data_kwargs = {"classes": classes, "label_values": values, "ignore_value": 0} | kwargs.pop("data_kwargs", {})
        self._stop.clear()
        report = _progress_callback(self._progress, self._stop, steps)
        # Copies: the user may keep painting while the worker trains.
        train_paint = paint.copy()
        job = lambda: finetune(backbone, volume, train_paint, slices, None, max_steps=steps, data_kwargs=data_kwargs, callbacks=[report], **kwargs)  # noqa: E731
        self.worker, self._training = create_worker(job, _start_thread=False), True
        self.worker.returned.connect(lambda result: self._trained(result, slices, values, classes, tile, train_paint, image.name, labels))
        self._run(self.worker, steps, f"training on slices {slices}, {len(classes)} classes {classes}")
        return self.worker

    def _trained(self, result, slices, values, classes, tile, paint, image_name, labels_layer) -> None:
        from ssl_em.data.normalize import sample_stats

        self.model, metrics = result
        self.model.eval()
        self.trained = {"image": image_name, "training_slices": slices, "label_values": values, "classes": classes, "tile_size": tile,
                        "steps": metrics.get("steps"), "paint": paint, "labels_layer": labels_layer, "stats": sample_stats(LayerVolume(self.viewer.layers[image_name]))}
        self._notify(f"trained {metrics.get('steps')} steps on slices {slices}; Predict, Measure or Save next")

    def cancel(self) -> None:
        """Stop training after the current step (the weights so far are kept), or stop predicting."""
        self._stop.set()  # training: the fit stops after this step and returns its model
        if self.worker is not None and not self._training:
            self.worker.quit()  # a generator stops at its next slice (quitting a fit would drop its result)

    def _on_step(self, step: int, total: int, loss: float) -> None:
        self.progress.setMaximum(total)
        self.progress.setValue(step)
        self.loss.setText(f"loss: {loss:.4f}")

    # -- predict ---------------------------------------------------------------------------------

    def predict(self, scope: str = "current slice"):
        """Predict the current slice, the visible region of it or the whole volume (`SCOPES`)
        in a background thread; returns the started worker. Slices go into the layer
        "<image> prediction" (values 1..K like the paint); the visible region into a layer of
        its own, "<image> prediction [z, y0:y1, x0:x1]", the region's size, translated onto
        it (a quick look at a part of a large slice, which leaves the full layer alone)."""
        from napari.qt.threading import create_worker

        from ssl_em.data.normalize import normalize_numpy
        from ssl_em.inference.window import predict_plane

        if scope not in SCOPES:
            raise UserError(f"predict {scope!r}: choose one of {', '.join(SCOPES)}")
        if self.model is None:
            raise UserError("no model yet: paint, then Train")
        if self.worker is not None and self.worker.is_running:
            raise UserError("busy: wait for the running job or cancel it")
        image = self._layer(self.image_box, "image")
        volume = LayerVolume(image)
        _, H, W = volume.shape
        region = None
        if scope == "whole volume":
            zs = list(range(volume.shape[0]))
        else:
            z = int(round(image.world_to_data(self.viewer.dims.point)[0])) if len(volume.shape) == 3 and image.ndim == 3 else 0
            zs = [min(max(z, 0), volume.shape[0] - 1)]
            if scope == "visible region":
                region = visible_region(self.viewer, image, (H, W))
        net, stats, norm = self.model.net, self.trained["stats"], self.model.normalization
        tile = self.trained["tile_size"]
        device = next(net.parameters()).device
        # The region's windows see a margin of context around it where the slice has one,
        # so its border is predicted as it would be within the whole slice.
        ys, xs = region if region is not None else (slice(0, H), slice(0, W))
        margin = tile // 4 if region is not None else 0
        read_y, read_x = slice(max(ys.start - margin, 0), min(ys.stop + margin, H)), slice(max(xs.start - margin, 0), min(xs.stop + margin, W))
        crop = (slice(None), slice(ys.start - read_y.start, ys.stop - read_y.start), slice(xs.start - read_x.start, xs.stop - read_x.start))

        def job():
            for z in zs:
                plane = normalize_numpy(volume.read(z, read_y, read_x)[0], stats, norm)
                yield z, predict_plane(net, plane, tile, tile // 4, device=device)[crop]  # (K, y, x)

        self._stop.clear()
        self.worker, self._training = create_worker(job, _start_thread=False), False
        if region is None:
            self.worker.yielded.connect(lambda zp: self._show_plane(image, volume, *zp))
        else:
            self.worker.yielded.connect(lambda zp: self._show_region(image, zp[0], ys, xs, zp[1]))
        what = f"slice {zs[0]}, rows {ys.start}-{ys.stop - 1}, columns {xs.start}-{xs.stop - 1}" if region is not None else f"{len(zs)} slice{'s' * (len(zs) > 1)}"
        self.worker.finished.connect(lambda: self._notify(f"predicted {what}"))
        self._run(self.worker, len(zs), f"predicting {what}")
        return self.worker

    def _show_region(self, image, z: int, ys: slice, xs: slice, probs: np.ndarray) -> None:
        """Layers of one region's prediction (K, y, x): labels (and probabilities on
        request) the region's size, at the image's scale, translated onto the region."""
        classes = self.trained["classes"]
        flat = image.ndim == 2
        where = f"[{ys.start}:{ys.stop}, {xs.start}:{xs.stop}]" if flat else f"[{z}, {ys.start}:{ys.stop}, {xs.start}:{xs.stop}]"
        offset = np.array([z, ys.start, xs.start][-image.ndim :], float)
        translate = np.asarray(image.translate, float) + offset * np.asarray(image.scale, float)
        place = lambda a: a if flat else a[None]  # noqa: E731 - one slice of a stack keeps the z axis
        name = f"{image.name} prediction {where}"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        paint = self.trained["labels_layer"]
        features = {"index": list(self.trained["label_values"]), "class": classes}
        self.viewer.add_labels(place((probs.argmax(0) + 1).astype(np.uint8)), name=name, scale=image.scale, translate=translate,
                               colormap=paint.colormap, features=features, visible=True)
        if self.with_probabilities.isChecked():
            for k, cls in enumerate(classes):
                pname = f"{image.name} p({cls}) {where}"
                if pname in self.viewer.layers:
                    self.viewer.layers.remove(pname)
                self.viewer.add_image(place(probs[k].astype(np.float32)), name=pname, scale=image.scale, translate=translate, contrast_limits=(0, 1),
                                      colormap="magma", blending="additive", visible=True)
        self.progress.setValue(self.progress.value() + 1)

    def _show_plane(self, image, volume: LayerVolume, z: int, probs: np.ndarray) -> None:
        classes = self.trained["classes"]
        name = f"{image.name} prediction"
        flat = image.ndim == 2
        if name not in self.viewer.layers:
            paint = self.trained["labels_layer"]
            features = {"index": list(self.trained["label_values"]), "class": classes}
            self.viewer.add_labels(np.zeros(volume.shape[1:] if flat else volume.shape, np.uint8), name=name, scale=image.scale, translate=image.translate,
                                   colormap=paint.colormap, features=features, visible=True)
        layer = self.viewer.layers[name]
        region = slice(None) if flat else z
        layer.data[region] = probs.argmax(0) + 1  # class k is label k + 1, as painted
        layer.refresh()
        if self.with_probabilities.isChecked():
            for k, cls in enumerate(classes):
                pname = f"{image.name} p({cls})"
                if pname not in self.viewer.layers:
                    self.viewer.add_image(np.zeros(layer.data.shape, np.float32), name=pname, scale=image.scale, translate=image.translate,
                                          contrast_limits=(0, 1), colormap="magma", blending="additive", visible=False)
                self.viewer.layers[pname].data[region] = probs[k]
                self.viewer.layers[pname].refresh()
        self.progress.setValue(self.progress.value() + 1)

    # -- measure and save --------------------------------------------------------------------------

    def measure(self):
        """Objects of every class in "<image> prediction" (3D components; 2D for one image)
        as the layer "<image> objects", with `ssl-em measure`'s columns as its features."""
        from ssl_em.measure import object_table

        if not self.trained:
            raise UserError("no prediction to measure: Train, then Predict")
        image = self._layer(self.image_box, "image")
        name = f"{image.name} prediction"
        if name not in self.viewer.layers:
            raise UserError(f"no layer {name!r}: Predict first")
        volume = LayerVolume(image)
        labels = np.asarray(self.viewer.layers[name].data).reshape(volume.shape)
        classes = dict(zip(self.trained["label_values"], self.trained["classes"]))
        ids, table = object_table(labels, volume.voxel_size.as_tuple(), classes, volume.read())
        objects = f"{image.name} objects"
        if objects in self.viewer.layers:
            self.viewer.layers.remove(objects)
        layer = self.viewer.add_labels(ids.reshape(np.shape(self.viewer.layers[name].data)), name=objects, scale=image.scale, translate=image.translate,
                                       features=table, visible=False)
        self._notify(f"{len(table['index'])} objects measured (layer {objects!r}, its features; Save writes objects.csv)")
        return layer

    def _save_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save the model into (an empty or earlier model folder)")
        if folder:
            self.save(folder)

    def save(self, folder: str | Path) -> Path:
        """The model folder `ssl-em predict` runs, plus the paint beside it: painted_labels.tif
        (the labels as painted) and painted_labels.json (values, classes, slices, scale); with a
        measurement, objects.csv."""
        import tifffile

        from ssl_em.atomic import check_out_folder
        from ssl_em.finetune.model_folder import META
        from ssl_em.measure import write_csv

        if self.model is None:
            raise UserError("no model to save: paint, then Train")
        folder = Path(folder)
        check_out_folder(folder, META)
        t = self.trained
        out = self.model.export(folder, t["tile_size"], {"steps": t["steps"]}, t["label_values"])
        tifffile.imwrite(out / "painted_labels.tif", t["paint"], photometric="minisblack")
        image = self.viewer.layers[t["image"]] if t["image"] in self.viewer.layers else None
        record = {k: t[k] for k in ("image", "training_slices", "label_values", "classes", "tile_size", "steps")}
        record |= {"ignored_value": 0, "scale": [float(s) for s in image.scale] if image is not None else None,
                   "source": str(image.source.path) if image is not None and image.source.path else None}
        (out / "painted_labels.json").write_text(json.dumps(record, indent=2) + "\n")
        objects = f"{t['image']} objects"
        if objects in self.viewer.layers:
            feats = self.viewer.layers[objects].features
            write_csv(out / "objects.csv", feats.to_dict("records"), tuple(feats.columns))
        self._notify(f"saved {out} (ssl-em predict {out} IMAGE --out OUT.zarr)")
        return out

    # -- plumbing -------------------------------------------------------------------------------

    def _run(self, worker, total: int, what: str) -> None:
        """Start `worker` with the bar, the buttons and one-line errors wired up."""
        self.progress.setMaximum(max(total, 1))
        self.progress.setValue(0)
        self.train_button.setEnabled(False)
        self.predict_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        worker.errored.connect(self._error)
        worker.finished.connect(self._idle)
        self._notify(what)
        worker.start()

    def _idle(self) -> None:
        self.train_button.setEnabled(True)
        self.predict_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def _error(self, err: BaseException) -> None:
        from ssl_em.errors import find_user_error, one_line

        cause = find_user_error(err)
        self._notify(one_line(cause) if cause is not None else f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}", error=True)

    def _reported(self, fn):
        """A button handler whose exceptions become one-line notifications."""

        def handler(*_):
            try:
                fn()
            except Exception as err:  # noqa: BLE001 - shown to the user, never a traceback dialog
                self._error(err)

        return handler

    def _notify(self, text: str, error: bool = False) -> None:
        from napari.utils.notifications import show_error, show_info

        self.last_message = text
        (show_error if error else show_info)(text)


def visible_region(viewer, layer, shape: tuple[int, int]) -> tuple[slice, slice]:
    """(rows, columns) of `layer`'s (y, x) data that the canvas shows: the camera's field of
    view, centre +- the viewbox's size / zoom / 2 in world units (napari's `camera.center`,
    `camera.zoom` and `canvas.viewbox_size`, which the Qt canvas keeps current), taken into
    the layer's data coordinates by `layer.world_to_data` (scale, translation, affine: the
    bounding box of the four corners) and clipped to the slice's `shape` (H, W). UserError
    in a 3D view or when the view shows none of the layer."""
    if viewer.dims.ndisplay != 2:
        raise UserError("the visible region is a part of one slice: switch the viewer to its 2D view first")
    displayed = list(viewer.dims.displayed)
    # napari 0.9 moved the camera to viewer.scene and the canvas size to viewer.canvas;
    # before, they were viewer.camera and viewer._canvas_size.
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    size = viewer.canvas.viewbox_size(viewer.layers) if hasattr(viewer, "canvas") else viewer._canvas_size
    half = np.asarray(size, float) / float(camera.zoom) / 2  # (h, w), world units
    centre = np.asarray(camera.center, float)[-2:]
    corners = []
    for dy in (-1, 1):
        for dx in (-1, 1):
            point = np.asarray(viewer.dims.point, float).copy()
            point[displayed] = centre + half * (dy, dx)
            corners.append(np.asarray(layer.world_to_data(point), float)[-2:])
    lo, hi = np.floor(np.min(corners, 0)).astype(int), np.ceil(np.max(corners, 0)).astype(int)
    lo, hi = np.clip(lo, 0, shape), np.clip(hi, 0, shape)
    if (hi <= lo).any():
        raise UserError(f"the canvas shows none of layer {layer.name!r}: pan or zoom onto it, or predict the current slice")
    return slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1]))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
