"""The napari plugin, headless: paint two slices, train a tiny model, predict, measure, save.

The widget runs on napari's `ViewerModel` (the layer model a napari window shows) under an
offscreen Qt platform, so it needs no display and no OpenGL; the one test that docks it into a
real napari window needs both (an X display such as xvfb-run's) and skips without them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

if not os.environ.get("DISPLAY"):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before Qt is imported
pytest.importorskip("napari", reason="napari (dev extra) hosts the widget")
pytest.importorskip("pytestqt", reason="pytest-qt (dev extra) runs Qt's event loop in tests")
pytest.importorskip("qtpy.QtWidgets", reason="a Qt binding (dev extra: PyQt6) draws the widget", exc_type=ImportError)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bad_input import tiny_models  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOXEL = (50.0, 4.0, 4.0)  # ISBI 2012: serial-section TEM
TIMEOUT_MS = 300_000  # a loaded 2-core machine; the steps themselves take seconds


@pytest.fixture(scope="module")
def em(tmp_path_factory, request):
    """(image (4, 96, 96) uint8, ground truth 1 cell / 2 membrane, backbone folder, image TIFF):
    a corner of ISBI 2012 where it is present, else the synthetic volume."""
    import tifffile

    from conftest import SHARED_DATA

    tmp = tmp_path_factory.mktemp("napari")
    isbi = SHARED_DATA / "isbi2012" / "train"
    if (isbi / "image").is_dir():
        from ssl_em.data.readers import open_volume

        image = open_volume(isbi / "image").read(slice(0, 4), slice(0, 96), slice(0, 96))
        truth = np.where(open_volume(isbi / "label").read(slice(0, 4), slice(0, 96), slice(0, 96)) > 127, 1, 2).astype(np.uint8)
    else:
        from ssl_em.synthetic import make_volume

        vol = make_volume(shape=(4, 96, 96), seed=0)
        image, truth = vol.image, np.where(vol.image > np.median(vol.image), 1, 2).astype(np.uint8)
    tiny_models(tmp / "backbone", tmp / "unused_model")  # a 2-block ViT, 32 px tiles
    tifffile.imwrite(tmp / "image.tif", image, photometric="minisblack")
    return image, truth, tmp / "backbone", tmp / "image.tif"


@pytest.fixture
def widget(qtbot, em):
    from napari.components import ViewerModel

    from ssl_em.napari.widget import FinetuneWidget

    viewer = ViewerModel()
    viewer.add_image(em[0], name="isbi", scale=VOXEL)
    w = FinetuneWidget(viewer)
    qtbot.addWidget(w)
    w.backbone.setText(str(em[2]))
    w.tile.setValue(32)
    w.classes.setText("cell,membrane")
    return w


def _wait(qtbot, worker) -> None:
    with qtbot.waitSignal(worker.finished, timeout=TIMEOUT_MS):
        pass


def test_paint_train_predict_measure_save(widget, em, qtbot, tmp_path):
    import tifffile
    import zarr

    from ssl_em.cli import main

    image, truth, _, image_tif = em
    viewer = widget.viewer
    paint = widget.new_labels_layer()
    assert paint.name == "isbi paint" and tuple(paint.scale) == VOXEL and paint.data.shape == image.shape
    painted = np.zeros_like(truth)
    painted[0, :48], painted[2, 48:] = truth[0, :48], truth[2, 48:]  # parts of two slices
    paint.data = painted

    worker = widget.train(steps=4, batch_size=2)
    _wait(qtbot, worker)
    assert widget.model is not None and widget.trained["training_slices"] == [0, 2]
    assert widget.trained["classes"] == ["cell", "membrane"] and widget.trained["label_values"] == [1, 2]
    assert widget.progress.value() == widget.progress.maximum() == 4
    loss = float(widget.loss.text().split()[-1])
    assert np.isfinite(loss) and loss > 0

    viewer.dims.set_point(0, 1 * VOXEL[0])  # the user looks at slice 1
    _wait(qtbot, widget.predict("current slice"))
    pred = viewer.layers["isbi prediction"]
    assert type(pred).__name__ == "Labels" and pred.visible and tuple(pred.scale) == VOXEL
    assert set(np.unique(pred.data[1])) <= {1, 2} and not pred.data[[0, 2, 3]].any()

    # The visible region: the canvas (800 x 600 px) at zoom 4 around world (y 100, x 200)
    # shows y 0-200, x 125-275 nm: rows 0-49, columns 31-68 of slice 1 (4 nm pixels).
    viewer.scene.camera.center, viewer.scene.camera.zoom = (0, 100, 200), 4.0
    assert tuple(viewer.canvas.viewbox_size(viewer.layers)) == (800, 600)
    _wait(qtbot, widget.predict("visible region"))
    region = viewer.layers["isbi prediction [1, 0:50, 31:69]"]
    assert type(region).__name__ == "Labels" and region.visible and tuple(region.scale) == VOXEL
    assert region.data.shape == (1, 50, 38) and tuple(region.translate) == (50.0, 0.0, 31 * 4.0)
    assert np.allclose(region.data_to_world((0, 0, 0)), viewer.layers["isbi"].data_to_world((1, 0, 31)))
    assert set(np.unique(region.data)) <= {1, 2}
    assert (region.data[0] == pred.data[1, :50, 31:69]).mean() > 0.9  # the slice's own prediction there
    assert not pred.data[[0, 2, 3]].any()  # the full prediction layer is left alone

    widget.with_probabilities.setChecked(True)
    _wait(qtbot, widget.predict("whole volume"))
    assert (pred.data > 0).all()
    probs = np.stack([viewer.layers[f"isbi p({c})"].data for c in ("cell", "membrane")])
    np.testing.assert_array_equal(pred.data, probs.argmax(0) + 1)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)

    objects = widget.measure()
    table = objects.features
    assert list(table["index"]) == sorted(np.unique(objects.data[objects.data > 0]).tolist())
    for cls, value in (("cell", 1), ("membrane", 2)):  # every predicted voxel is in one object of its class
        assert table.loc[table["class"] == cls, "volume_nm3"].sum() == pytest.approx((pred.data == value).sum() * np.prod(VOXEL))

    out = widget.save(tmp_path / "model")
    np.testing.assert_array_equal(tifffile.imread(out / "painted_labels.tif"), painted)
    record = json.loads((out / "painted_labels.json").read_text())
    assert record["training_slices"] == [0, 2] and record["classes"] == ["cell", "membrane"] and record["scale"] == list(VOXEL)
    assert (out / "objects.csv").read_text().splitlines()[0].startswith("index,class,volume_nm3")

    # The saved folder is a model `ssl-em predict` runs: same window, same argmax.
    assert main(["predict", str(out), str(image_tif), "--out", str(tmp_path / "p.zarr"), "--no-progress", "--accelerator", "cpu", "--voxel-size", "50,4,4"]) == 0
    stored = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")["labels/semantic/0"][:]
    assert (stored == pred.data).mean() > 0.999


def test_visible_region_follows_the_camera_and_the_layer_placement(widget):
    """The visible region is the camera's field of view in the image's data coordinates
    (scale and translation), clipped to the slice; off the image or in 3D it is refused."""
    from ssl_em.errors import UserError
    from ssl_em.napari.widget import visible_region

    viewer, image = widget.viewer, widget.viewer.layers["isbi"]
    viewer.scene.camera.center, viewer.scene.camera.zoom = (0, 100, 200), 4.0  # world y 0-200, x 125-275
    assert visible_region(viewer, image, (96, 96)) == (slice(0, 50), slice(31, 69))
    viewer.scene.camera.zoom = 1.0  # the whole slice and more: clipped to it
    assert visible_region(viewer, image, (96, 96)) == (slice(0, 96), slice(0, 96))
    image.translate = (0, 40, 0)  # the image moved 40 nm down: rows (y - 40) / 4
    viewer.scene.camera.zoom = 4.0
    assert visible_region(viewer, image, (96, 96)) == (slice(0, 40), slice(31, 69))
    viewer.scene.camera.center = (0, 5000, 5000)
    with pytest.raises(UserError, match="shows none"):
        visible_region(viewer, image, (96, 96))
    viewer.dims.ndisplay = 3
    with pytest.raises(UserError, match="2D view"):
        visible_region(viewer, image, (96, 96))


def test_cancel_keeps_the_steps_trained(widget, em, qtbot):
    widget.new_labels_layer().data = np.where(np.arange(4)[:, None, None] == 1, em[1], 0).astype(np.uint8)
    worker = widget.train(steps=10_000, batch_size=2)
    qtbot.waitUntil(lambda: widget.progress.value() >= 1, timeout=TIMEOUT_MS)
    widget.cancel()
    _wait(qtbot, worker)
    assert widget.model is not None and widget.progress.value() < 10_000
    assert widget.trained["training_slices"] == [1]


@pytest.mark.parametrize("paint, needle", [
    (lambda t: np.zeros_like(t), "nothing painted"),
    (lambda t: np.where(t == 1, 1, 0).astype(np.uint8), "only label 1"),
    (lambda t: np.where(t == 1, 1, 3).astype(np.uint8), "labels 1..3 painted"),  # two names for three values
])
def test_mistakes_are_one_line_notifications(widget, em, paint, needle):
    widget.new_labels_layer().data = paint(em[1])
    widget.train_button.click()  # through the button: an error must not escape as a traceback
    assert needle in widget.last_message and "\n" not in widget.last_message
    assert widget.worker is None and widget.train_button.isEnabled()
    widget.predict_button.click()
    assert widget.last_message.startswith("no model yet")


def test_reader_opens_a_prediction_shown_and_named(em, tmp_path):
    """`ssl-em predict` output through the plugin's reader: class labels shown, named by the
    store, coloured by class, at the voxel size; probabilities named per class."""
    from napari.components import ViewerModel

    from ssl_em.cli import main
    from ssl_em.napari.reader import get_reader

    tiny_models(tmp_path / "b", tmp_path / "m")
    assert main(["predict", str(tmp_path / "m"), str(em[3]), "--out", str(tmp_path / "pred.zarr"), "--no-progress", "--accelerator", "cpu", "--voxel-size", "50,4,4"]) == 0
    assert get_reader(str(tmp_path)) is None and get_reader(str(em[3])) is None
    viewer = ViewerModel()
    for data, meta, kind in get_reader(str(tmp_path / "pred.zarr"))(str(tmp_path / "pred.zarr")):
        viewer._add_layer_from_data(data, meta, kind)
    layers = {layer.name: layer for layer in viewer.layers}
    assert set(layers) == {"pred: p(dark)", "pred: p(bright)", "pred: classes"}
    labels = layers["pred: classes"]
    assert labels.visible and tuple(labels.scale) == VOXEL and list(labels.features["class"]) == ["dark", "bright"]
    assert labels.colormap.map(1).tolist() == pytest.approx([0xE6 / 255, 0x19 / 255, 0x4B / 255, 1.0])


def test_manifest_names_the_widget_and_reader_and_ships_with_the_package():
    import importlib
    import tomllib

    from npe2 import PluginManifest

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    entry = project["project"]["entry-points"]["napari.manifest"]["ssl_em"]
    package, file = entry.split(":")
    assert file in project["tool"]["setuptools"]["package-data"][package]
    manifest = PluginManifest.from_file(ROOT / package.replace(".", "/") / file)
    assert manifest.name == project["project"]["name"]
    for command in manifest.contributions.commands:
        module, attr = command.python_name.split(":")
        assert callable(getattr(importlib.import_module(module), attr))


@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="a napari window needs an X display with OpenGL (run under xvfb-run)")
def test_docks_in_a_napari_window(qtbot):
    import napari
    from npe2 import PluginManager, PluginManifest

    pm = PluginManager.instance()
    if "ssl_em" not in pm._manifests:  # a checkout not installed with this entry point yet
        pm.register(PluginManifest.from_file(ROOT / "ssl_em" / "napari" / "napari.yaml"))
    viewer = napari.Viewer(show=False)
    try:
        viewer.add_image(np.zeros((2, 32, 32), np.uint8), name="em")
        dock, w = viewer.window.add_plugin_dock_widget("ssl_em", "Fine-tune and predict")
        assert type(w).__name__ == "FinetuneWidget" and w.image_box.currentText() == "em"
    finally:
        viewer.close()
