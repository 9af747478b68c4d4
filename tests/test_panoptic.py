"""Panoptic quality of instances: a hand-worked case and torchmetrics' PanopticQuality as reference."""

from __future__ import annotations

import numpy as np
import pytest

from ssl_em.inference.metrics import instance_iou, instance_scores, panoptic_quality


def test_pq_hand_worked():
    """True A (10 px) is found by a 8 px prediction inside it: IoU 0.8, a match. True B (10 px)
    is met by a 4 px prediction inside it: IoU 0.4, no match (FP + FN). A 4 px prediction on
    background is a FP. TP 1, FP 2, FN 1: SQ 0.8, RQ 1 / (1 + 1 + 0.5) = 0.4, PQ 0.32."""
    gt = np.zeros((20, 20), int)
    gt[0:5, 0:2], gt[10:15, 0:2] = 1, 2
    pred = np.zeros((20, 20), int)
    pred[0:4, 0:2], pred[10:12, 0:2], pred[18:20, 18:20] = 7, 3, 9
    s = instance_scores(pred, gt)
    assert (s["pq"], s["sq"], s["rq"]) == pytest.approx((0.32, 0.8, 0.4))
    assert s["rq"] == pytest.approx(s["f1_50"])  # RQ is F1 at IoU 0.5 (no IoU is exactly 0.5 here)


def test_iou_of_exactly_one_half_is_not_a_match():
    """The paper's criterion is IoU > 0.5 (AP here counts >= 0.5)."""
    gt = np.zeros((4, 4), int)
    gt[0, 0:4] = 1
    pred = np.zeros((4, 4), int)
    pred[0, 0:2] = 1  # IoU 2 / 4
    assert panoptic_quality(instance_iou(pred, gt)[0]) == (0.0, 0.0, 0.0)
    assert instance_scores(pred, gt)["ap50"] == pytest.approx(1.0)


def test_perfect_and_empty():
    gt = np.zeros((6, 6), int)
    gt[1:3, 1:3], gt[4:6, 4:6] = 1, 2
    assert instance_scores(np.where(gt > 0, 10 - gt, 0), gt)["pq"] == 1.0  # ids need not agree
    assert instance_scores(np.zeros_like(gt), gt)["pq"] == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pq_matches_torchmetrics(seed):
    """torchmetrics' PanopticQuality with the instances as the one "thing" class (and
    background as "stuff") gives the same PQ, SQ and RQ for the thing class."""
    torch = pytest.importorskip("torch")
    from scipy import ndimage
    from torchmetrics.detection import PanopticQuality

    rng = np.random.default_rng(seed)
    gt = ndimage.label(ndimage.gaussian_filter(rng.random((96, 96)), 3) > 0.5)[0]
    noisy = 0.6 * ndimage.gaussian_filter((gt > 0).astype(float), 1.5) + 0.4 * ndimage.gaussian_filter(rng.random((96, 96)), 2)
    pred = ndimage.label(noisy > 0.42)[0]
    assert gt.max() >= 3 and pred.max() >= 3

    def panoptic(ids):  # (1, H, W, 2): category (1 = thing, 0 = background), instance id
        return torch.from_numpy(np.stack([(ids > 0).astype(np.int64), ids.astype(np.int64)], -1))[None]

    ref = PanopticQuality(things={1}, stuffs={0}, return_sq_and_rq=True, return_per_class=True)(panoptic(pred), panoptic(gt))
    s = instance_scores(pred, gt)
    assert (s["pq"], s["sq"], s["rq"]) == pytest.approx(ref[0].tolist())  # row 0: the thing class


def test_evaluate_prints_pq(tmp_path, capsys):
    import tifffile

    from ssl_em.cli import main

    gt = np.zeros((2, 20, 20), np.uint16)
    gt[:, 0:5, 0:2], gt[:, 10:15, 0:2] = 1, 2
    pred = gt.copy()
    pred[:, 4, :] = 0  # A shrinks to 8 px per slice: IoU 0.8
    tifffile.imwrite(tmp_path / "gt.tif", gt, photometric="minisblack")
    tifffile.imwrite(tmp_path / "pred.tif", pred, photometric="minisblack")
    assert main(["evaluate", str(tmp_path / "pred.tif"), str(tmp_path / "gt.tif"), "--task", "instance"]) == 0
    rows = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert float(rows["sq"]) == pytest.approx(0.9) and float(rows["rq"]) == 1.0 and float(rows["pq"]) == pytest.approx(0.9)
