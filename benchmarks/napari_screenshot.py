"""Screenshot of the napari widget after a real 2-slice fine-tune on ISBI 2012.

    xvfb-run -a python benchmarks/napari_screenshot.py [--steps 100] [--out docs/figures/napari_widget.png]

What a microscopist does, driven through the widget's own methods: open ISBI's training
stack at 50 x 4 x 4 nm, paint the upper half of slices 0 and 1 from the ground truth (label 1
cell, 2 membrane; the rest unpainted, so ignored), Train from the shipped backbone, Predict a
slice the model never saw, Measure, and grab the window. Prints the time of each step and the
membrane Dice of the predicted slice against its ground truth. A napari window needs an X
display with OpenGL: run it under xvfb-run on a headless machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ISBI = ROOT.parent / "shared" / "data" / "isbi2012" / "train"
VOXEL = (50.0, 4.0, 4.0)


def wait(app, worker) -> None:
    """Run Qt's event loop until `worker` has finished (its signals reach the widget)."""
    done = []
    worker.finished.connect(lambda: done.append(True))
    while not done:
        app.processEvents()
        time.sleep(0.05)
    app.processEvents()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--slice", type=int, default=15, help="held-out slice to predict and show")
    parser.add_argument("--data", default=str(ISBI), help="ISBI 2012 train folder (image/, label/)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "figures" / "napari_widget.png"))
    args = parser.parse_args()

    # torch (its dynamo, which loads triton's LLVM where triton is installed) before napari's
    # OpenGL: on Mesa's software renderer (llvmpipe, as under xvfb) loading triton after the GL
    # context crashed the process (a segmentation fault in triton's import).
    import torch
    import torch._dynamo  # noqa: F401

    import ssl_em.finetune.cli  # noqa: F401
    import napari
    from qtpy.QtWidgets import QApplication

    from ssl_em.data.readers import open_volume
    from ssl_em.napari.widget import FinetuneWidget

    torch.set_num_threads(1)  # a shared CPU: one thread is faster than two fighting
    image = open_volume(Path(args.data) / "image").read()
    truth = np.where(open_volume(Path(args.data) / "label").read() > 127, 1, 2).astype(np.uint8)  # 1 cell, 2 membrane
    viewer = napari.Viewer(title="ssl_em: 2 painted slices of ISBI 2012")
    viewer.window.resize(1400, 900)
    viewer.add_image(image, name="isbi", scale=VOXEL)
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="ssl_em: fine-tune and predict", area="right")
    app = QApplication.instance()

    paint = widget.new_labels_layer()
    half = image.shape[1] // 2
    painted = np.zeros_like(truth)
    painted[:2, :half] = truth[:2, :half]
    paint.data = painted
    widget.classes.setText("cell,membrane")
    widget.steps.setValue(args.steps)

    t0 = time.time()
    wait(app, widget.train())
    t_train = time.time() - t0
    viewer.dims.set_point(0, args.slice * VOXEL[0])
    t0 = time.time()
    wait(app, widget.predict("current slice"))
    t_predict = time.time() - t0
    widget.measure()
    pred = viewer.layers["isbi prediction"].data[args.slice]
    p, g = pred == 2, truth[args.slice] == 2
    dice = 2 * (p & g).sum() / max(p.sum() + g.sum(), 1)
    paint.visible = False  # the picture shows the prediction over the held-out slice
    viewer.layers["isbi objects"].visible = False
    viewer.layers.selection.active = viewer.layers["isbi prediction"]
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(args.out, canvas_only=False)
    print(f"trained {args.steps} steps on slices 0-1 (upper halves painted) in {t_train:.0f} s ({widget.loss.text()}); "
          f"predicted slice {args.slice} in {t_predict:.1f} s; membrane Dice there {dice:.3f}; wrote {args.out}")
    viewer.close()


if __name__ == "__main__":
    main()
